"""The `index` part of `python -m bench.fleet`: what `affinity`'s key and index cost, in process.

No sockets: the pure functions the gateway runs per request for `affinity` (`affinity_key` over
the prompt `peek` found as it found `model`, `PrefixIndex.affinity`, `balance.order`), timed
with `timeit` (best of 5 rounds) beside `order` for `least_loaded`, for a small chat body and a
32 KB (~8,000-token) prompt, with a key the index holds (a tenant's next turn) and a new key
every call (a client sending a fresh prefix with every request); then the index's memory
(tracemalloc) when full at its default size, and after a flood of new keys ten times that; and,
with the pure functions alone (no clock, seeded), where two gateways place the prefix part's 48
tenants when a load balancer sends each request to one of them at random.
"""

from __future__ import annotations

import random
import timeit
import tracemalloc
from collections.abc import Callable
from typing import Any

from bench.fleetwork import PrefixProfile, big_prompt_body, shared_prefix_requests
from bench.streamload import chat_body
from proxy.balance import Load, affinity, affinity_key, order
from proxy.config import RoutingConfig
from proxy.prefix_index import AgreedIndex, PrefixIndex
from proxy.routing import Target
from proxy.serve import CHAT, PROMPT_FIELDS
from proxy.view import peek, prompt_head, prompt_of

TARGETS = tuple(Target(f"sim-{c}", None, 1.0) for c in "abc")
IDLE = {t.backend: Load(in_flight=0, limit=None, up=True) for t in TARGETS}
CALLS = 20_000
CHAT_PROMPT = PROMPT_FIELDS[CHAT]


def prompt_key(body: bytes) -> bytes:
    """A chat body's `affinity` key, as the gateway makes it (its prompt found by a decode)."""
    return affinity_key(None, prompt_head(prompt_of(body, CHAT_PROMPT), 2048), 2048)


def _us(fn: Callable[[], object]) -> float:
    return round(min(timeit.repeat(fn, number=CALLS, repeat=5)) / CALLS * 1e6, 2)


def _costs(body: bytes, routing: RoutingConfig) -> dict[str, float]:
    """µs per call of each step for `body`, with a known key and with a new key each call."""
    rng = random.Random(1)
    index = PrefixIndex(routing.prefix_index_size)
    prompt = peek(body, CHAT_PROMPT).prompt  # found in the pass `peek` makes for `model`
    assert prompt

    def key_of() -> bytes:
        return affinity_key(None, prompt_head(prompt, routing.prefix_bytes), routing.prefix_bytes)

    def known() -> object:
        placed = index.affinity("sim-model", key_of(), TARGETS, IDLE, routing.key_load_factor)
        return order("affinity", TARGETS, IDLE, rng, placed, routing.load_factor)

    fresh = iter(range(10**9))

    def new() -> object:
        key = affinity_key(None, b"%d " % next(fresh) + body[: routing.prefix_bytes], 2048)
        placed = index.affinity("sim-model", key, TARGETS, IDLE, routing.key_load_factor)
        return order("affinity", TARGETS, IDLE, rng, placed, routing.load_factor)

    agreed = AgreedIndex(routing.prefix_index_size)

    def known_agreed() -> object:
        placed = agreed.affinity("sim-model", key_of(), TARGETS, IDLE, routing.key_load_factor)
        return order("affinity", TARGETS, IDLE, rng, placed, routing.load_factor)

    def new_agreed() -> object:
        key = affinity_key(None, b"%d " % next(fresh) + body[: routing.prefix_bytes], 2048)
        placed = agreed.affinity("sim-model", key, TARGETS, IDLE, routing.key_load_factor)
        return order("affinity", TARGETS, IDLE, rng, placed, routing.load_factor)

    return {
        "prompt_key_us": _us(key_of),
        "affinity_agreed_known_key_us": _us(known_agreed),
        "affinity_agreed_new_key_us": _us(new_agreed),
        "least_loaded_order_us": _us(lambda: order("least_loaded", TARGETS, IDLE, rng)),
        "affinity_no_index_us": _us(
            lambda: order(
                "affinity", TARGETS, IDLE, rng, affinity(key_of(), TARGETS), routing.load_factor
            )
        ),
        "affinity_known_key_us": _us(known),
        "affinity_new_key_us": _us(new),
    }


def _matched_memory(size: int) -> dict[str, Any]:
    """Bytes per entry of an `agreed` index full of matched keys (each sent twice)."""
    index = AgreedIndex(size)
    tracemalloc.start()
    try:
        for n in range(size):
            key = affinity_key(None, b"prefix %d " % n * 200, 2048)
            for _ in range(2):
                index.affinity("sim-model", key, TARGETS, IDLE, 1.0)
        full = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return {
        "size": size,
        "full_bytes": full,
        "keys_per_backend": dict(sorted(index.counts.items())),
    }


def _memory(size: int) -> dict[str, Any]:
    """Bytes per entry of a full index, then once every entry was replaced by a new key (its
    table holds the slots churn leaves), and after ten times as many new keys again."""
    index = PrefixIndex(size)
    fresh = iter(range(10**9))

    def flood(count: int) -> int:
        for _ in range(count):
            key = affinity_key(None, b"prefix %d " % next(fresh) * 200, 2048)
            index.affinity("sim-model", key, TARGETS, IDLE, 1.0)
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        full = flood(size)
        churned = flood(size)
        after = flood(10 * size)
    finally:
        tracemalloc.stop()
    return {
        "size": size,
        "full_bytes": full,
        "churned_bytes": churned,
        "bytes_after_flood": after,
        "entries_after_flood": len(index),
        "keys_per_backend_after_flood": dict(sorted(index.counts.items())),
    }


def two_gateways(
    factor: float, size: int, kind: type[PrefixIndex | AgreedIndex] = PrefixIndex, trials: int = 20
) -> dict[str, float]:
    """Two indexes of `kind`, each fed the requests a coin sends it (the prefix part's 752,
    seeded): how many tenants they place on different replicas at the end, the most system
    prompts one replica must then cache (tenants either gateway placed on it), and how many
    times a gateway's answer for a tenant changed on the way, as means over `trials`."""
    profile = PrefixProfile()
    requests = shared_prefix_requests(profile, 752)
    keys = [prompt_key(b) for b, _, _ in requests]
    differ = held = moves = 0.0
    for trial in range(trials):
        coin = random.Random(trial)
        gateways = [kind(size), kind(size)]
        placed: list[dict[bytes, str]] = [{}, {}]
        for key in keys:
            g = coin.randrange(2)
            where = gateways[g].affinity("sim-model", key, TARGETS, IDLE, factor).home
            moves += placed[g].get(key, where) != where
            placed[g][key] = where
        for g, index in enumerate(gateways):  # where each has each key at the end
            for key in placed[g]:
                placed[g][key] = index.affinity("sim-model", key, TARGETS, IDLE, factor).home
        differ += sum(placed[0][k] != placed[1][k] for k in placed[0].keys() & placed[1].keys())
        per_replica: dict[str, set[bytes]] = {}
        for where in placed:
            for key, backend in where.items():
                per_replica.setdefault(backend, set()).add(key)
        held += max(len(tenants) for tenants in per_replica.values())
    return {
        "tenants": profile.tenants,
        "placed_differently": round(differ / trials, 1),
        "busiest_replica_prompts": round(held / trials, 1),
        "moves_per_gateway": round(moves / trials / 2, 1),
    }


def index_part(settings: object, work: object) -> dict[str, Any]:
    """The part's figures (the harness's arguments are not needed: nothing is started)."""
    routing = RoutingConfig()
    return {
        "calls_per_round": CALLS,
        "cases": {
            "small chat body": _costs(chat_body(16, stream=False), routing),
            "32 KB prompt": _costs(big_prompt_body(), routing),
        },
        "memory": _memory(routing.prefix_index_size),
        "agreed_memory": _matched_memory(routing.prefix_index_size),
        "two_gateways": {
            "one gateway, key_load_factor 1": _one_gateway(),
            **{
                f"two gateways, key_load_factor {f:g}": two_gateways(f, routing.prefix_index_size)
                for f in (1.0, 1.25, 1.5)
            },
            "two gateways, no index (prefix_index_size 0)": two_gateways(1.0, 0),
            "two gateways, key_placement agreed": two_gateways(
                1.0, routing.prefix_index_size, AgreedIndex
            ),
        },
    }


def _one_gateway() -> dict[str, float]:
    """The same figures for one gateway that sees every request (nothing placed twice)."""
    profile = PrefixProfile()
    index = PrefixIndex(RoutingConfig().prefix_index_size)
    for body, _, _ in shared_prefix_requests(profile, 752):
        key = prompt_key(body)
        index.affinity("sim-model", key, TARGETS, IDLE, 1.0)
    return {
        "tenants": profile.tenants,
        "placed_differently": 0.0,
        "busiest_replica_prompts": float(max(index.counts.values())),
        "moves_per_gateway": 0.0,
    }
