"""The routing policies over a snapshot of load: weighted, least_loaded, affinity."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import pytest

from proxy.balance import Affinity, Load, affinity, affinity_key, order
from proxy.routing import Target

A, B, C = Target("a", None, 1.0), Target("b", None, 1.0), Target("c", None, 1.0)


def keyed(key: bytes, targets: list[Target]) -> Affinity | None:
    """What `order` gets of a request's key with no index: its hash's `Affinity`."""
    return affinity(key, tuple(targets)) if key else None


def loads(**in_flight: int) -> dict[str, Load]:
    return {name: Load(in_flight=n, limit=None, up=True) for name, n in in_flight.items()}


def test_down_targets_come_last() -> None:
    """A backend that is down or ejected is tried only when nothing else is left."""
    snapshot = {**loads(a=0, c=5), "b": Load(0, None, up=False)}
    ranked, _ = order("least_loaded", [A, B, C], snapshot, random.Random(1))
    assert B == ranked[-1]
    assert ([A, B], "only") == order("least_loaded", [B, A], snapshot, random.Random(1))


def test_weighted_splits_by_weight() -> None:
    """`weighted` leads with each target about as often as its weight says (3:1)."""
    heavy = Target("a", None, 3.0)
    rng = random.Random(20240601)
    counts = Counter(
        order("weighted", [heavy, B], loads(a=0, b=0), rng)[0][0].backend for _ in range(4000)
    )
    assert abs(counts["a"] - 3000) < 150  # the standard deviation is about 27


def test_least_loaded_prefers_fewer_in_flight() -> None:
    """Of two drawn targets the less loaded leads; the rest follow by load per weight."""
    snapshot = loads(a=10, b=0, c=5)
    leads = Counter(
        order("least_loaded", [A, B, C], snapshot, random.Random(seed))[0][0].backend
        for seed in range(300)
    )
    assert 0 == leads["a"]  # the busiest never wins a pair
    assert leads["b"] > leads["c"] > 0
    ranked, reason = order("least_loaded", [A, B, C], snapshot, random.Random(3))
    assert "least_loaded" == reason
    assert A == ranked[-1]


def test_least_loaded_divides_by_weight() -> None:
    """A target with twice the weight takes twice the load before it looks as busy."""
    big = Target("a", None, 2.0)
    ranked, _ = order("least_loaded", [big, B], loads(a=3, b=2), random.Random(1))
    assert big == ranked[0]  # 3/2 < 2/1


def test_affinity_is_sticky_and_the_same_in_every_gateway() -> None:
    """The same key leads to the same replica whatever the random state (two gateways agree
    without talking); different keys spread over the replicas."""
    key = affinity_key("session-42", b"", 2048)
    firsts = {
        order("affinity", [A, B, C], loads(a=0, b=0, c=0), random.Random(s), keyed(key, [A, B, C]))[
            0
        ][0]
        for s in range(20)
    }
    assert 1 == len(firsts)
    spread = Counter(
        order(
            "affinity",
            [A, B, C],
            loads(a=0, b=0, c=0),
            random.Random(0),
            keyed(f"k{i}".encode(), [A, B, C]),
        )[0][0].backend
        for i in range(3000)
    )
    assert min(spread.values()) > 800  # about a third each


def test_affinity_moves_only_the_keys_of_a_replica_that_went_away() -> None:
    """With one replica down, keys that led elsewhere keep their replica (rendezvous hashing)."""
    snapshot = loads(a=0, b=0, c=0)
    down = {**snapshot, "c": Load(0, None, up=False)}
    for i in range(500):
        key = f"k{i}".encode()
        before = order("affinity", [A, B, C], snapshot, random.Random(0), keyed(key, [A, B, C]))[0][
            0
        ]
        after = order("affinity", [A, B, C], down, random.Random(0), keyed(key, [A, B, C]))[0][0]
        assert before in (after, C)


def test_affinity_rebalances_past_the_load_bound() -> None:
    """A replica above load_factor x the mean load is passed over for the key (`rebalanced`)."""
    key = b"prefix:hello"
    home = order(
        "affinity", [A, B, C], loads(a=0, b=0, c=0), random.Random(0), keyed(key, [A, B, C])
    )[0][0]
    busy = loads(a=0, b=0, c=0) | {home.backend: Load(30, None, True)}
    ranked, reason = order(
        "affinity", [A, B, C], busy, random.Random(0), keyed(key, [A, B, C]), 1.25
    )
    assert "rebalanced" == reason
    assert home == ranked[-1]
    calm, reason = order(
        "affinity", [A, B, C], loads(a=1, b=1, c=1), random.Random(0), keyed(key, [A, B, C])
    )
    assert (home, "affinity") == (calm[0], reason)


def test_affinity_without_a_key_is_least_loaded() -> None:
    """A request with neither a session nor a prompt is placed by load."""
    _, reason = order("affinity", [A, B], loads(a=0, b=1), random.Random(0), keyed(b"", [A, B]))
    assert "least_loaded" == reason


def test_affinity_key() -> None:
    """The session id wins; else the prompt's first bytes; else nothing."""
    assert b"session:s1" == affinity_key("s1", b"prompt", 4)
    assert b"prefix:prom" == affinity_key(None, b"prompt", 4)
    assert b"" == affinity_key(None, b"", 4)
    assert 8 + 256 == len(affinity_key("x" * 1000, b"", 4))


def test_a_weighted_order_is_drawn_place_by_place() -> None:
    """Every place of a `weighted` order is drawn by weight among the targets left: with
    weights 2:1:1, `a` leads half the time, and after `b` leads, `a` is second 2 times in 3."""
    heavy = Target("a", None, 2.0)
    rng = random.Random(7)
    orders = [
        tuple(t.backend for t in order("weighted", [heavy, B, C], loads(a=0, b=0, c=0), rng)[0])
        for _ in range(6000)
    ]
    firsts = Counter(o[0] for o in orders)
    assert abs(firsts["a"] - 3000) < 150  # the standard deviation is about 39
    after_b = Counter(o[1] for o in orders if o[0] == "b")
    assert abs(after_b["a"] / sum(after_b.values()) - 2 / 3) < 0.05


def _rendezvous_home(key: bytes, targets: list[Target]) -> Target:
    """The highest random weight for `key`, written out: blake2b over the key, a zero byte
    and the backend's name, as every gateway version since the first one computes it."""

    def score(t: Target) -> float:
        digest = hashlib.blake2b(key + b"\0" + t.backend.encode(), digest_size=8).digest()
        return -t.weight / math.log((int.from_bytes(digest, "big") + 1) / (2**64 + 1))

    return max(targets, key=score)


@pytest.mark.parametrize("a_weight", [1.0, 2.0])
def test_affinity_homes_do_not_move_between_gateway_versions(a_weight: float) -> None:
    """A key's replica is the rendezvous hash of the key and the backend's name, however the
    gateway computes it (with equal weights or not), so gateways of two versions side by side
    agree and an upgrade moves no key (and no cached prefix)."""
    targets = [Target("a", None, a_weight), B, C]
    for i in range(300):
        key = affinity_key(None, f"system prompt {i} ".encode() * 200, 2048)
        ranked, _ = order(
            "affinity", targets, loads(a=0, b=0, c=0), random.Random(0), keyed(key, targets)
        )
        assert _rendezvous_home(key, targets) == ranked[0]


def test_affinity_counts_what_a_replica_says_it_queues() -> None:
    """A replica that this gateway sends nothing to but that reports a long queue (another
    gateway's traffic, from its /metrics) is over the bound: its keys go to the next one."""
    key = b"prefix:shared system prompt"
    home = order(
        "affinity", [A, B, C], loads(a=0, b=0, c=0), random.Random(0), keyed(key, [A, B, C])
    )[0][0]
    snapshot = loads(a=0, b=0, c=0) | {home.backend: Load(0, None, True, queued=40.0)}
    ranked, reason = order("affinity", [A, B, C], snapshot, random.Random(0), keyed(key, [A, B, C]))
    assert ("rebalanced", home) == (reason, ranked[-1])


def test_affinity_passes_over_a_full_kv_cache() -> None:
    """A home replica that reports its KV cache full would queue or preempt the request: the
    key's next replica takes it, however idle the home looks."""
    key = b"session:alice"
    home = order(
        "affinity", [A, B, C], loads(a=0, b=0, c=0), random.Random(0), keyed(key, [A, B, C])
    )[0][0]
    snapshot = loads(a=0, b=0, c=0) | {home.backend: Load(0, None, True, kv=0.99)}
    ranked, reason = order("affinity", [A, B, C], snapshot, random.Random(0), keyed(key, [A, B, C]))
    assert ("rebalanced", home) == (reason, ranked[-1])


def test_affinity_s_floor_is_capped_by_max_in_flight() -> None:
    """A replica always keeps 8 requests for its keys, or its max_in_flight when that is
    fewer: with max_in_flight 2 and 2 in flight the key goes on (and says so)."""
    key = b"session:bob"
    home = order(
        "affinity", [A, B, C], loads(a=0, b=0, c=0), random.Random(0), keyed(key, [A, B, C])
    )[0][0]
    roomy = loads(a=0, b=0, c=0) | {home.backend: Load(1, 2, True)}
    assert (
        "affinity"
        == order("affinity", [A, B, C], roomy, random.Random(0), keyed(key, [A, B, C]))[1]
    )
    full = loads(a=0, b=0, c=0) | {home.backend: Load(2, 2, True)}
    ranked, reason = order("affinity", [A, B, C], full, random.Random(0), keyed(key, [A, B, C]))
    assert ("rebalanced", home) == (reason, ranked[-1])


def test_affinity_keeps_the_key_home_when_every_replica_is_over() -> None:
    """When every replica is past its bound, the key's own replica still leads."""
    key = b"session:carol"
    home = order(
        "affinity", [A, B, C], loads(a=0, b=0, c=0), random.Random(0), keyed(key, [A, B, C])
    )[0][0]
    busy = {t.backend: Load(0, None, True, kv=1.0) for t in (A, B, C)}
    ranked, reason = order("affinity", [A, B, C], busy, random.Random(0), keyed(key, [A, B, C]))
    assert ("affinity", home) == (reason, ranked[0])
