"""Which of a model's targets to try first: the routing policies, over a snapshot of load.

Pure: each function takes the candidates, what the gateway knows of each backend now (a
`Load` per backend) and, for the random choices, an `rng`; it returns the candidates in the
order to try them and the reason the first one was chosen (a `proxy_routing_decisions_total`
label). Backends that are down or ejected never come first; they are tried only when nothing
else is left (a health check may lag the truth in both directions).

- `weighted`: a random split by weight (the MLflow style of traffic split).
- `least_loaded`: the power of two random choices, weighted: of two targets drawn by weight,
  the one with fewer requests in flight per unit of weight (plus what the backend itself
  reports queued, from a fresh scrape of its `/metrics`; a full KV cache puts it last); the
  rest by the same measure.
- `affinity`: requests with the same key (an `X-Session-ID`, else the prompt's first bytes)
  go to the same replica. A key's home is its rendezvous hash over the targets that are up:
  every gateway computes the same one without talking to the others, and a replica that goes
  away moves only its own keys. On top of that the gateway keeps a bounded index of where it
  placed each key lately (proxy/prefix_index.py: `routing.prefix_index_size` entries, LRU),
  and `place` decides with it, as consistent hashing with bounded loads (Mirrokni et al.)
  does, over the keys each replica holds: a key the index does not hold goes to its home
  unless the home already holds more than `key_factor` times its (weighted) share of the
  indexed keys, this one counted, rounded up; then to the next replica in the key's
  rendezvous order that does not. A placed key sticks to its replica while that one is up,
  so the replica's prefix cache keeps serving it; a replica that goes away loses its keys to
  the next placement. Why: a hash alone spreads a few dozen keys unevenly (48 tenants fell
  21/19/8 on 3 replicas in bench/README.md's prefix run), and a replica whose cache cannot
  hold its share evicts while the others have room. KV-cache room is a hard capacity, not a
  queue that drains, so the key bound defaults to an even split (1: at most one key above
  the share); `load_factor`'s 1.25 would let that hash's own 20/20/8 through.
  The price: each gateway bounds the keys it indexed, so two gateways agree on a new key
  whenever its home has room in both (the first keys of a fresh fleet, every key when they
  see the same keys in the same order), and may place a key past its home differently;
  that key's prefix is then cached on two replicas.
  Per request, the load is bounded as before: the key's replica is passed over
  (`rebalanced`; the key stays placed) for the next one in the key's rendezvous order while
  its load (in flight here, plus what it reports queued) is above `load_factor` times its
  share and above a floor, or while it reports a full KV cache. The index lives at the edge
  (serve.affinity_of); its choice reaches `order` pinned in the key (`pin`), so `order` stays
  a function of values, and a pinned key within its bound is not hashed again.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence

import msgspec

from proxy.config import Policy
from proxy.routing import Target


class Load(msgspec.Struct, frozen=True):
    """One backend as routing sees it at this instant."""

    in_flight: int
    limit: int | None  # max_in_flight
    up: bool  # healthy and not ejected
    queued: float = 0.0  # requests the backend itself says it queues (fresh scrapes only)
    kv: float = 0.0  # its KV-cache use, 0-1 (fresh scrapes only)

    @property
    def full(self) -> bool:
        return self.limit is not None and self.in_flight >= self.limit


# Why a target was tried (proxy_routing_decisions_total): the policy's first choice, the
# next target after a failure, a fallback model's target, or the slot a queued request got.
REASONS = (
    "weighted", "least_loaded", "affinity", "rebalanced", "only", "retry", "fallback", "queued"
)  # fmt: skip


def order(
    policy: Policy,
    candidates: Sequence[Target],
    loads: Mapping[str, Load],
    rng: random.Random,
    key: bytes = b"",
    load_factor: float = 1.25,
) -> tuple[list[Target], str]:
    """The candidates in the order to try them, and why the first one leads; `key` is the
    request's `affinity` key, pinned (`pin`) to its placed backend or not."""
    up = [t for t in candidates if loads[t.backend].up]
    down = [t for t in candidates if not loads[t.backend].up]
    if not up:  # every one down (probes failing fleet-wide, or none passed yet): still spread
        up, down = down, []
    if len(up) <= 1:
        return up + down, "only"
    if policy == "weighted":
        return _by_weight(up, rng) + down, "weighted"
    if policy == "affinity" and key:
        ranked, reason = _affinity(up, loads, key, load_factor)
        return ranked + down, reason
    return _least_loaded(up, loads, rng) + down, "least_loaded"


def _by_weight(targets: list[Target], rng: random.Random) -> list[Target]:
    """A weighted random order, as if each place were drawn by weight among those left.

    One draw per target (Efraimidis and Spirakis' weighted sampling without replacement):
    target i gets the key log(u_i) / w_i for u_i uniform in (0, 1], and the order is by key,
    highest first; the logarithm keeps tiny weights from underflowing to ties.
    """
    return sorted(targets, key=lambda t: math.log(1.0 - rng.random()) / t.weight, reverse=True)


# Requests in flight a replica may always hold for its `affinity` keys, whatever the mean
# (or up to its `max_in_flight`, when that is lower): the load bound is for hot spots, not
# for a fleet with almost nothing to do. Kept rather than scaled down to a backend's batch
# size: a key passed over pays its whole prefill again on the next replica, and there takes
# cache room a second time, which costs more than a short wait in the home replica's batch
# (bench/README.md, "What limits `affinity` under cache pressure").
AFFINITY_FLOOR = 8

# A backend whose KV cache is this full would preempt or queue a new request: tried last.
KV_FULL = 0.98


def _pressure(target: Target, loads: Mapping[str, Load]) -> float:
    """Requests in flight through this gateway plus those the backend queues, per unit of
    weight; a backend with a full KV cache after every other."""
    load = loads[target.backend]
    busy = (load.in_flight + load.queued) / target.weight
    return busy + (1e9 if load.kv >= KV_FULL else 0.0)


def _least_loaded(
    targets: list[Target], loads: Mapping[str, Load], rng: random.Random
) -> list[Target]:
    """Power of two choices by weight for the first; the rest by load per unit of weight."""
    first, second = _by_weight(targets, rng)[:2]
    lead = second if _pressure(second, loads) < _pressure(first, loads) else first
    rest = sorted((t for t in targets if t is not lead), key=lambda t: _pressure(t, loads))
    return [lead, *rest]


def _affinity(
    targets: list[Target], loads: Mapping[str, Load], key: bytes, load_factor: float
) -> tuple[list[Target], str]:
    """The key's replica first (where it is pinned, else its rendezvous home), the rest in
    the key's rendezvous order; replicas over the load bound move behind the others."""
    pinned, key = unpin(key)
    total = weight = 0.0
    for t in targets:
        total += loads[t.backend].in_flight + loads[t.backend].queued
        weight += t.weight

    def over(t: Target) -> bool:
        # its share of the load with this request counted, times the factor, rounded up;
        # never below the floor, so a nearly idle fleet keeps every key where it lives
        load = loads[t.backend]
        if load.kv >= KV_FULL:  # it would queue or preempt the request: the next one takes it
            return True
        floor = AFFINITY_FLOOR if load.limit is None else min(AFFINITY_FLOOR, load.limit)
        share = math.ceil(load_factor * (total + 1) * t.weight / weight)
        return load.in_flight + load.queued + 1 > max(share, floor)

    lead = next((t for t in targets if t.backend == pinned), None)
    if lead is not None and not over(lead):  # the common case: no hashing here at all
        return [lead, *(t for t in targets if t is not lead)], "affinity"
    ranked = rendezvous(targets, key_hash(key))
    if lead is not None:
        ranked.sort(key=lambda t: t is not lead)  # stable: the rest keep their order
    elif not over(ranked[0]):  # an unpinned key's home takes it
        return ranked, "affinity"
    passed = [over(t) for t in ranked]
    if all(passed):  # every replica over its bound: the key stays where it lives
        return ranked, "affinity"
    within = [t for t, o in zip(ranked, passed, strict=True) if not o]
    return within + [t for t, o in zip(ranked, passed, strict=True) if o], "rebalanced"


def place(
    targets: Sequence[Target],
    up: Mapping[str, bool],
    keyed: hashlib.blake2b,
    placed: str | None,
    counts: Mapping[str, int],
    key_factor: float,
) -> str:
    """The backend a key (`keyed`: its hash) lives on: `placed`, where the index has it,
    while that one is up and a target; else the first up target in the key's rendezvous
    order whose indexed keys, this one counted, are within `key_factor` times its share by
    weight, rounded up (with `key_factor` >= 1 one always is). `counts`: keys per backend.
    With every target down, as if every one were up (as `order` spreads then)."""
    if placed is not None and up.get(placed) and any(t.backend == placed for t in targets):
        return placed  # the common case, checked before anything is built
    live = [t for t in targets if up.get(t.backend)] or list(targets)
    if placed is not None and any(t.backend == placed for t in live):
        return placed  # every target down: keys stay where they are
    ranked = rendezvous(live, keyed)
    total = sum(counts.get(backend, 0) for backend in {t.backend for t in live}) + 1
    weight = sum(t.weight for t in live)
    roomy = (
        t
        for t in ranked
        if counts.get(t.backend, 0) + 1 <= math.ceil(key_factor * total * t.weight / weight)
    )
    return next(roomy, ranked[0]).backend


def key_hash(key: bytes) -> hashlib.blake2b:
    """The key hashed once; each target's rendezvous digest (and the index's entry) is made
    from a copy of it."""
    return hashlib.blake2b(key, digest_size=8)


def rendezvous(targets: Sequence[Target], keyed: hashlib.blake2b) -> list[Target]:
    """The targets by their rendezvous score for the key `keyed` hashed, the key's home first."""
    if all(t.weight == targets[0].weight for t in targets):  # the highest digest wins
        return sorted(targets, key=lambda t: _digest(keyed, t), reverse=True)
    return sorted(targets, key=lambda t: _score(keyed, t), reverse=True)


_PIN = b"@"  # affinity_key's keys start with "session:" or "prefix:", never with this


def pin(key: bytes, backend: str) -> bytes:
    """`key` with the backend the gateway's index placed it on, for `order` to lead with."""
    return _PIN + backend.encode() + b"\0" + key


def unpin(key: bytes) -> tuple[str | None, bytes]:
    """The backend a key is pinned to (None: not pinned) and the key itself."""
    if not key.startswith(_PIN):
        return None, key
    backend, _, bare = key[1:].partition(b"\0")
    return backend.decode(errors="replace"), bare


def _digest(keyed: hashlib.blake2b, target: Target) -> bytes:
    """The target's hash for the key `keyed` has hashed: blake2b over the key, a zero byte and
    the backend's name (compared as bytes, in the order of the numbers they spell)."""
    mixed = keyed.copy()
    mixed.update(b"\0" + target.backend.encode())
    return mixed.digest()


def _score(keyed: hashlib.blake2b, target: Target) -> float:
    """The target's rendezvous score, weighted (highest random weight hashing): its hash as a
    number in (0, 1), u, gives -weight / ln(u); with equal weights it orders as the hash."""
    unit = (int.from_bytes(_digest(keyed, target), "big") + 1) / (2**64 + 1)
    return -target.weight / math.log(unit)


def affinity_key(session: str | None, prompt: bytes, prefix_bytes: int) -> bytes:
    """What keys a request for `affinity`: its session id, else its prompt's first bytes."""
    if session:
        return b"session:" + session.encode("utf-8", "replace")[:256]
    return b"prefix:" + prompt[:prefix_bytes] if prompt else b""
