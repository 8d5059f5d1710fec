"""Review findings on the pure routing policies (proxy.balance), each a failing test."""

from __future__ import annotations

import random

from proxy.balance import Load, affinity, order
from proxy.routing import Target

REPLICAS = [Target(name, None, 1.0) for name in ("a", "b", "c", "d")]


def idle(**in_flight: int) -> dict[str, Load]:
    named = {t.backend: 0 for t in REPLICAS} | in_flight
    return {name: Load(in_flight=n, limit=None, up=True) for name, n in named.items()}


def test_affinity_keeps_a_key_home_on_a_nearly_idle_fleet() -> None:
    """On four replicas with one request in flight in all, a key whose replica runs that one
    request stays on it (`affinity`): the load bound is for hot spots, not for a fleet that
    has almost nothing to do (a batching GPU runs dozens of requests at once)."""
    key = affinity(b"session:alice", tuple(REPLICAS))
    home = order("affinity", REPLICAS, idle(), random.Random(0), key)[0][0]
    ranked, reason = order(
        "affinity", REPLICAS, idle(**{home.backend: 1}), random.Random(0), key, 1.25
    )
    assert (home, "affinity") == (ranked[0], reason)
