"""What a reload changes and what it carries over, from values (no server)."""

from __future__ import annotations

import io

from proxy.accesslog import AccessLog
from proxy.auth import KeySet
from proxy.config import Config, load_config
from proxy.metrics import Metrics
from proxy.prefix_index import AgreedIndex, PrefixIndex
from proxy.reload import Changes, changes, successor
from proxy.state import GatewayState
from proxy.upstream import open_backends

OLD = """
server: {port: 8000}
backends:
  a: {url: 'http://127.0.0.1:9001'}
  b: {url: 'http://127.0.0.1:9002'}
  c: {url: 'http://127.0.0.1:9003'}
models:
  m1: {targets: [{backend: a}, {backend: b}]}
  m2: {targets: [{backend: c}]}
"""
NEW = """
server: {port: 9000, drain_s: 5}
backends:
  a: {url: 'http://127.0.0.1:9001'}
  b: {url: 'http://127.0.0.1:9012'}
  d: {url: 'http://127.0.0.1:9004'}
models:
  m1: {targets: [{backend: a}, {backend: b}]}
  m3: {targets: [{backend: d}]}
"""


def state_of(config: Config) -> GatewayState:
    state = GatewayState(
        config, KeySet.from_env(None), {}, Metrics(list(config.backends)), AccessLog(io.BytesIO())
    )
    state.backends = open_backends(config, {})
    return state


def test_changes_name_every_model_backend_and_server_key() -> None:
    diff = changes(load_config(OLD), load_config(NEW))
    assert (
        Changes(
            models_added=("m3",),
            models_removed=("m2",),
            backends_added=("d",),
            backends_removed=("c",),
            backends_changed=("b",),
            restart_only=("server.port", "server.drain_s"),
        )
        == diff
    )
    assert (
        "models added: m3; models removed: m2; backends added: d; backends removed: c; "
        "backends changed: b"
    ) == diff.summary()
    assert "no model or backend changed" == changes(load_config(OLD), load_config(OLD)).summary()


def test_a_connect_timeout_change_rebuilds_every_backend() -> None:
    new = load_config(OLD + "timeouts: {connect_s: 1}\n")
    assert ("a", "b", "c") == changes(load_config(OLD), new).backends_changed


async def test_successor_keeps_unchanged_backends_with_their_load_and_health() -> None:
    """Backend a is the same object (pool, in-flight count), with its health; b changed and
    c left: both are returned to retire; d is new and not yet probed; the server section in
    force stays until a restart."""
    old = state_of(load_config(OLD))
    old.backends["a"].in_flight = 3
    old.fleet["a"].probed_up = True
    old.saturated["a"] = 99.0
    new, gone = successor(old, load_config(NEW), {})
    assert new.backends["a"] is old.backends["a"]
    assert 3 == new.backends["a"].in_flight
    assert new.fleet["a"] is old.fleet["a"]
    assert 99.0 == new.saturated["a"]
    assert new.backends["b"] is not old.backends["b"]
    assert "http://127.0.0.1:9012" == new.backends["b"].config.url
    assert not new.fleet["d"].probed_up
    assert {old.backends["b"], old.backends["c"]} == set(gone)
    assert old.config.server == new.config.server
    assert {"m1", "m3"} == set(new.config.models)
    assert new.metrics is old.metrics
    assert new.admission is old.admission
    for backend in [*new.backends.values(), *gone]:
        backend.close()


async def test_successor_reads_keys_and_backend_secrets_from_the_environment() -> None:
    text = OLD.replace("{url: 'http://127.0.0.1:9003'}", "{url: 'http://x:1', api_key_env: K}")
    old = state_of(load_config(OLD))
    new, gone = successor(old, load_config(text), {"API_KEYS": "k1,k2", "K": "secret"})
    assert 2 == len(new.keys)
    assert "secret" == new.backends["c"].api_key
    for backend in [*new.backends.values(), *gone]:
        backend.close()


async def test_a_setting_that_needs_no_new_connection_applies_to_the_same_backend() -> None:
    """max_in_flight and kind change in place: the Backend (its in-flight count) and its
    health stay; a health_path change keeps the Backend but starts its health afresh."""
    old = state_of(load_config(OLD))
    old.backends["a"].in_flight = 2
    old.fleet["a"].probed_up = old.fleet["c"].probed_up = True
    text = OLD.replace(
        "a: {url: 'http://127.0.0.1:9001'}", "a: {url: 'http://127.0.0.1:9001', max_in_flight: 1}"
    ).replace(
        "c: {url: 'http://127.0.0.1:9003'}", "c: {url: 'http://127.0.0.1:9003', health_path: /h}"
    )
    new, gone = successor(old, load_config(text), {})
    assert new.backends["a"] is old.backends["a"]
    assert (1, 2) == (new.backends["a"].config.max_in_flight, new.backends["a"].in_flight)
    assert new.fleet["a"] is old.fleet["a"]
    assert new.backends["c"] is old.backends["c"]
    assert not new.fleet["c"].probed_up
    assert [] == gone
    for backend in new.backends.values():
        backend.close()


async def test_successor_keeps_the_affinity_index_while_its_size_stays() -> None:
    """Where keys were placed survives a reload (their replicas' caches stay warm); a new
    `routing.prefix_index_size` starts an index of that size."""
    old = state_of(load_config(OLD))
    same, gone = successor(old, load_config(NEW), {})
    assert same.prefix_index is old.prefix_index
    resized, more = successor(old, load_config(NEW + "routing: {prefix_index_size: 5}\n"), {})
    assert resized.prefix_index is not old.prefix_index
    assert 5 == resized.prefix_index.size
    for backend in [*same.backends.values(), *gone, *resized.backends.values(), *more]:
        backend.close()


async def test_successor_keeps_an_agreed_index_while_its_bound_stays() -> None:
    """`key_placement`: a change of placement starts the index its new value asks for; an
    `agreed` index (whose matchings hold their bound) is kept while `key_load_factor` stays."""
    agreed = "routing: {key_placement: agreed}\n"
    old = state_of(load_config(OLD + agreed))
    assert isinstance(old.prefix_index, AgreedIndex)
    kept, a = successor(old, load_config(NEW + agreed), {})
    assert kept.prefix_index is old.prefix_index
    looser = "routing: {key_placement: agreed, key_load_factor: 1.5}\n"
    bound, b = successor(old, load_config(NEW + looser), {})
    assert (
        isinstance(bound.prefix_index, AgreedIndex) and bound.prefix_index is not old.prefix_index
    )
    sticky, c = successor(old, load_config(NEW + "routing: {key_placement: sticky}\n"), {})
    assert isinstance(sticky.prefix_index, PrefixIndex)
    for state, gone in ((kept, a), (bound, b), (sticky, c)):
        for backend in [*state.backends.values(), *gone]:
            backend.close()
