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
  loads (Mirrokni et al.): a replica is passed over while its load is above `load_factor`
  times the mean (`rebalanced`). No index of keys is kept, so nothing grows with traffic.
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
    """A weighted random order: each place drawn by weight among those left."""
    left, out = list(targets), []
    while left:
        pick = rng.choices(left, weights=[t.weight for t in left])[0]
        left.remove(pick)
        out.append(pick)
    return out


# Requests in flight a replica may always hold for its `affinity` keys, whatever the mean:
# the load bound is for hot spots, not for a fleet with almost nothing to do.
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
    ranked = sorted(targets, key=lambda t: _score(key, t), reverse=True)
    total = sum(loads[t.backend].in_flight for t in targets)
    weight = sum(t.weight for t in targets)

    def over(t: Target) -> bool:
        # its share of the load with this request counted, times the factor, rounded up;
        # never below AFFINITY_FLOOR, so a nearly idle fleet keeps every key at home
        share = math.ceil(load_factor * (total + 1) * t.weight / weight)
        return loads[t.backend].in_flight + 1 > max(share, AFFINITY_FLOOR)

    within = [t for t in ranked if not over(t)]
    if not within or within[0] is ranked[0]:
        return ranked if not within else within + [t for t in ranked if over(t)], "affinity"
    return within + [t for t in ranked if over(t)], "rebalanced"


def _score(key: bytes, target: Target) -> float:
    """The target's rendezvous score for `key`, weighted (highest random weight hashing)."""
    digest = hashlib.blake2b(key + b"\0" + target.backend.encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -target.weight / math.log(unit)


def affinity_key(session: str | None, prompt: bytes, prefix_bytes: int) -> bytes:
    """What keys a request for `affinity`: its session id, else its prompt's first bytes."""
    if session:
        return b"session:" + session.encode("utf-8", "replace")[:256]
    return b"prefix:" + prompt[:prefix_bytes] if prompt else b""
