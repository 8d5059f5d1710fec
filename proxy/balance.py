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
  that key's prefix is then cached on two replicas. `routing.key_placement: agreed` places
  keys by the keys held instead of their order (proxy/key_matching.py, over
  `rendezvous_scores`), and `place` is then not used.
  Per request, the load is bounded as before: the key's replica is passed over
  (`rebalanced`; the key stays placed) for the next one in the key's rendezvous order while
  its load (in flight here, plus what it reports queued) is above `load_factor` times its
  share and above a floor, or while it reports a full KV cache. What `order` gets of a key
  is an `Affinity`: the targets in the key's rendezvous order and the backend it lives on,
  made by the index (which keeps one per key, so a key it holds is not hashed again) or,
  with no index, from the key's hash (`affinity`); `order` itself hashes nothing.
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
    up: bool  # healthy, not ejected and not shedding load (a 429 or 503 just now)
    queued: float = 0.0  # requests the backend itself says it queues (fresh scrapes only)
    kv: float = 0.0  # its KV-cache use, 0-1 (fresh scrapes only)
    healthy: bool = True  # probed up and not ejected, shedding load or not: where keys live

    @property
    def full(self) -> bool:
        return self.limit is not None and self.in_flight >= self.limit


class Affinity(msgspec.Struct, frozen=True, gc=False):
    """One key of the `affinity` policy for one model's targets: `ranked`, those targets in
    the key's rendezvous order (its home first), and `home`, the backend the key lives on
    (the index's placement; else the first of `ranked`). `of`: the targets it was made for."""

    home: str
    ranked: tuple[Target, ...]
    of: tuple[Target, ...]


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
    key: Affinity | None = None,
    load_factor: float = 1.25,
) -> tuple[list[Target], str]:
    """The candidates in the order to try them, and why the first one leads; `key`: the
    request's `affinity` key (None: it has none)."""
    up = [t for t in candidates if loads[t.backend].up]
    down = [t for t in candidates if not loads[t.backend].up]
    if not up:  # every one down (probes failing fleet-wide, or none passed yet): still spread
        up, down = down, []
    if len(up) <= 1:
        return up + down, "only"
    if policy == "weighted":
        return _by_weight(up, rng) + down, "weighted"
    if policy == "affinity" and key is not None:
        ranked = list(key.ranked) if not down else [t for t in key.ranked if t in up]
        ordered, reason = _affinity(ranked, loads, key.home, load_factor)
        return ordered + down, reason
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
    if len(targets) == 2:  # both are the two choices: the less loaded, a tie drawn by weight
        a, b = targets
        busy_a, busy_b = _pressure(a, loads), _pressure(b, loads)
        if busy_a == busy_b:
            a_first = rng.random() * (a.weight + b.weight) < a.weight
        else:
            a_first = busy_a < busy_b
        return [a, b] if a_first else [b, a]
    first, second = _by_weight(targets, rng)[:2]
    lead = second if _pressure(second, loads) < _pressure(first, loads) else first
    rest = sorted((t for t in targets if t is not lead), key=lambda t: _pressure(t, loads))
    return [lead, *rest]


def _affinity(
    ranked: list[Target], loads: Mapping[str, Load], home: str, load_factor: float
) -> tuple[list[Target], str]:
    """The key's replica first (`home` where it is one of `ranked`, else the first of them),
    the rest in the key's rendezvous order; replicas over the load bound move behind the others."""
    total = weight = 0.0
    lead = ranked[0]
    for t in ranked:
        load = loads[t.backend]
        total += load.in_flight + load.queued
        weight += t.weight
        if t.backend == home:
            lead = t
    if not _over(lead, loads[lead.backend], total, weight, load_factor):  # the common case
        if lead is ranked[0]:
            return ranked, "affinity"
        return [lead, *(t for t in ranked if t is not lead)], "affinity"
    within = [t for t in ranked if not _over(t, loads[t.backend], total, weight, load_factor)]
    if not within:  # every replica over its bound: the key stays where it lives
        return [lead, *(t for t in ranked if t is not lead)], "affinity"
    passed = (t for t in ranked if t is not lead and t not in within)
    return [*within, lead, *passed], "rebalanced"


def _over(target: Target, load: Load, total: float, weight: float, load_factor: float) -> bool:
    """Whether `target` is past the load bound: its share of the load (`total` over `weight`)
    with this request counted, times the factor, rounded up, and never below the floor (a
    nearly idle fleet keeps every key where it lives); or its KV cache is full (it would
    queue or preempt the request: the next one takes it)."""
    if load.kv >= KV_FULL:
        return True
    floor = AFFINITY_FLOOR if load.limit is None else min(AFFINITY_FLOOR, load.limit)
    share = math.ceil(load_factor * (total + 1) * target.weight / weight)
    return load.in_flight + load.queued + 1 > max(share, floor)


def place(
    ranked: Sequence[Target],
    loads: Mapping[str, Load],
    placed: str | None,
    counts: Mapping[str, int],
    key_factor: float,
) -> str:
    """The backend a key lives on, of `ranked` (its targets in the key's rendezvous order):
    `placed`, where the index has it, while that one is healthy and a target; else the first
    healthy target whose indexed keys, this one counted, are within `key_factor` times its
    share by weight, rounded up (with `key_factor` >= 1 one always is). `counts`: keys per
    backend. With every target down, as if every one were up (as `order` spreads then)."""
    live = [t for t in ranked if loads[t.backend].healthy] or list(ranked)
    if placed is not None and any(t.backend == placed for t in live):
        return placed
    total = sum(counts.get(backend, 0) for backend in {t.backend for t in live}) + 1
    weight = sum(t.weight for t in live)
    roomy = (
        t
        for t in live
        if counts.get(t.backend, 0) + 1 <= math.ceil(key_factor * total * t.weight / weight)
    )
    return next(roomy, live[0]).backend


def affinity(key: bytes, targets: tuple[Target, ...]) -> Affinity:
    """The key's `Affinity` for `targets` with no index: its rendezvous home leads."""
    ranked = tuple(rendezvous(targets, key_hash(key)))
    return Affinity(ranked[0].backend, ranked, targets)


def key_hash(key: bytes) -> hashlib.blake2b:
    """The key hashed once; each target's rendezvous digest (and the index's entry) is made
    from a copy of it."""
    return hashlib.blake2b(key, digest_size=8)


def rendezvous(targets: Sequence[Target], keyed: hashlib.blake2b) -> list[Target]:
    """The targets by their rendezvous score for the key `keyed` hashed, the key's home first."""
    if all(t.weight == targets[0].weight for t in targets):  # the highest digest wins
        return sorted(targets, key=lambda t: _digest(keyed, t), reverse=True)
    return sorted(targets, key=lambda t: _score(keyed, t), reverse=True)


def rendezvous_scores(
    targets: Sequence[Target], keyed: hashlib.blake2b
) -> tuple[tuple[Target, ...], tuple[float, ...]]:
    """The targets in the key's rendezvous order (as `rendezvous` gives them), each with its
    score, highest first (what proxy/key_matching.py ranks keys and replicas by)."""
    scored = sorted(((_score(keyed, t), t) for t in targets), key=lambda p: p[0], reverse=True)
    return tuple(t for _, t in scored), tuple(s for s, _ in scored)


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
