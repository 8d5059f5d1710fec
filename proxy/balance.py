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
  go to the same replica: rendezvous hashing over the targets that are up, so two gateways
  in front of the same replicas agree without talking to each other, and a replica that goes
  away moves only its own keys. The load is bounded as in consistent hashing with bounded
  loads (Mirrokni et al.): a replica is passed over while its load (in flight here, plus what
  it reports queued) is above `load_factor` times the mean and above a floor (`rebalanced`),
  or while it reports a full KV cache. No index of keys is kept, so nothing grows with
  traffic; the flip side is that keys spread over the replicas as a hash spreads them (with
  few keys, unevenly), not by what each replica holds.
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
    """The candidates in the order to try them, and why the first one leads."""
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
    """Rendezvous order for `key`; replicas over the load bound move behind the others."""
    keyed = hashlib.blake2b(key, digest_size=8)  # the key hashed once, each target added on
    if all(t.weight == targets[0].weight for t in targets):  # the highest digest wins
        ranked = sorted(targets, key=lambda t: _digest(keyed, t), reverse=True)
    else:
        ranked = sorted(targets, key=lambda t: _score(keyed, t), reverse=True)
    total = weight = 0.0
    for t in targets:
        total += loads[t.backend].in_flight + loads[t.backend].queued
        weight += t.weight

    def over(t: Target) -> bool:
        # its share of the load with this request counted, times the factor, rounded up;
        # never below the floor, so a nearly idle fleet keeps every key at home
        load = loads[t.backend]
        if load.kv >= KV_FULL:  # it would queue or preempt the request: the next one takes it
            return True
        floor = AFFINITY_FLOOR if load.limit is None else min(AFFINITY_FLOOR, load.limit)
        share = math.ceil(load_factor * (total + 1) * t.weight / weight)
        return load.in_flight + load.queued + 1 > max(share, floor)

    if not over(ranked[0]):  # the common case: the key's home takes it
        return ranked, "affinity"
    passed = [over(t) for t in ranked]
    if all(passed):  # every replica over its bound: the key stays at home
        return ranked, "affinity"
    within = [t for t, o in zip(ranked, passed, strict=True) if not o]
    return within + [t for t, o in zip(ranked, passed, strict=True) if o], "rebalanced"


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
