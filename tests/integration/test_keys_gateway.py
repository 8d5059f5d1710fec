"""Managed keys through real gateways on 127.0.0.1: auth, scope, expiry, revocation across
gateways sharing one store (SQLite file or redis-server), the admin API, and what the logs
and metrics never show."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import load_config
from proxy.keys import Hasher, KeyRecord, ManagedKeys, Store, StoreError, new_key, open_store
from proxy.reload import apply
from proxy.state import LIVE
from tests.conftest import Gateway, one_backend
from tests.redis_fixture import RedisServer

ADMIN_KEY = "admin-" + "x" * 40
Factory = Callable[..., Coroutine[Any, Any, Gateway]]


@pytest.fixture(params=["sqlite", "redis"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the store is: a SQLite file, or a redis-server of the test's own."""
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def store(location: str):
    """The operator's own handle on the store (as the CLI or another host would have)."""
    opened = await open_store(location)
    yield opened
    await opened.close()


def config(url: str, location: str, auth: str = "", models: str = "") -> str:
    return one_backend(url, models=models, extra=f"auth: {{store: '{location}'{auth}}}\n")


async def create(store: Store, name: str, **kwargs: Any) -> tuple[str, KeyRecord]:
    secret, record = new_key(name, Hasher(), time.time(), **kwargs)
    await store.create(record)
    return secret, record


async def post(
    url: str, key: str | None, model: str = "m", path: str = "/v1/chat/completions"
) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + path, json={"model": model, "messages": []}, headers=headers) as r,
    ):
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, body


def error_of(answer: tuple[int, dict]) -> tuple[int, str, str]:
    status, body = answer
    return status, body["error"]["type"], body["error"]["message"]


async def refused_within(gateways: list[Gateway], key: str, message: str, limit_s: float) -> float:
    """Seconds until every gateway refuses `key` with `message` (each asked until it does)."""
    started = time.monotonic()
    pending = list(gateways)
    while pending:
        assert time.monotonic() - started < limit_s, f"still accepted after {limit_s} s"
        answers = await asyncio.gather(*(post(g.url, key) for g in pending))
        pending = [
            g
            for g, a in zip(pending, answers, strict=True)
            if a[0] != 401 or a[1]["error"]["message"] != message
        ]
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def let_in_within(gateways: list[Gateway], key: str, limit_s: float) -> float:
    """Seconds until every gateway lets `key` in."""
    started = time.monotonic()
    pending = list(gateways)
    while pending:
        assert time.monotonic() - started < limit_s, f"still refused after {limit_s} s"
        answers = await asyncio.gather(*(post(g.url, key) for g in pending))
        pending = [g for g, a in zip(pending, answers, strict=True) if a[0] != 200]
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_managed_and_static_keys_side_by_side(
    gateway_factory: Factory, upstream, store, location
) -> None:
    """A managed key and a static key both get in (the managed one under its name in the access
    log); neither goes upstream; no key and a wrong one are 401."""
    secret, _ = await create(store, "team-a")
    gw = await gateway_factory(config(upstream.url, location), {"API_KEYS": "sk-static"})
    assert 200 == (await post(gw.url, secret))[0]
    assert 200 == (await post(gw.url, "sk-static"))[0]
    assert (401, "authentication_error") == error_of(await post(gw.url, None))[:2]
    assert (401, "authentication_error", "invalid API key") == error_of(
        await post(gw.url, secret[:-1] + "x")
    )
    assert all("authorization" not in {k.lower() for k in p.headers} for p in upstream.posts)
    keys = [line for line in gw.access_lines() if b'"status":200' in line]
    assert [b'"key":"team-a"', b'"key":"key-0"'] == [
        line[line.index(b'"key"') :].split(b",")[0] for line in keys
    ]


async def test_an_empty_store_still_needs_a_key(
    gateway_factory: Factory, upstream, location
) -> None:
    """With a store and no key anywhere, auth is on: nobody gets in."""
    gw = await gateway_factory(config(upstream.url, location))
    assert 401 == (await post(gw.url, None))[0]
    assert [] == upstream.posts


async def test_revoke_and_create_reach_two_gateways_within_a_second(
    gateway_factory: Factory, upstream, store, location
) -> None:
    """Two gateways on one store: a key created after they started is let in by both, and once
    revoked it is refused by both ("revoked API key") within one second, with no restart."""
    gateways = [await gateway_factory(config(upstream.url, location)) for _ in range(2)]
    secret, _ = await create(store, "late")
    await let_in_within(gateways, secret, 1.0)
    await store.revoke("late", time.time())
    took = await refused_within(gateways, secret, "revoked API key", 1.0)
    assert took < 1.0


async def test_scope_is_403_on_every_surface(
    gateway_factory: Factory, upstream, store, location
) -> None:
    """A key scoped to qwen gets qwen; llama is a 403 permission_denied on the OpenAI, Anthropic
    and OICM routes (each in its protocol's shape), and nothing reaches the backend."""
    models = "models:\n  qwen: {targets: [{backend: gpu}]}\n  llama: {targets: [{backend: gpu}]}\n"
    secret, _ = await create(store, "scoped", models=("qwen",))
    gw = await gateway_factory(config(upstream.url, location, models=models))
    assert 200 == (await post(gw.url, secret, "qwen"))[0]
    sent = len(upstream.posts)
    status, body = await post(gw.url, secret, "llama")
    assert (403, "permission_denied") == (status, body["error"]["type"])
    assert "may not use model 'llama'" in body["error"]["message"]
    status, body = await post(gw.url, secret, "llama", "/anthropic/v1/messages")
    assert (403, "permission_error") == (status, body["error"]["type"])
    status, _ = await post(gw.url, secret, "x", "/models/llama/proxy/rerank")
    assert 403 == status
    status, _ = await post(gw.url, secret, "llama", "/gateway/llama/invocations")
    assert 403 == status
    assert sent == len(upstream.posts)


async def get(url: str, key: str) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(url, headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return r.status, await r.json()


async def test_a_scoped_key_lists_only_its_models(
    gateway_factory: Factory, upstream, store, location
) -> None:
    """/v1/models, /v1/models/{id}, OICM's listing and MLflow's endpoints show a scoped key
    only the models it may use; a key for every model sees them all."""
    models = "models:\n  qwen: {targets: [{backend: gpu}]}\n  llama: {targets: [{backend: gpu}]}\n"
    scoped, _ = await create(store, "scoped", models=("qwen",))
    every, _ = await create(store, "every")
    gw = await gateway_factory(config(upstream.url, location, models=models))
    ids = lambda body, field="data": [c.get("id", c.get("name")) for c in body[field]]  # noqa: E731
    assert ["qwen"] == ids((await get(gw.url + "/v1/models", scoped))[1])
    assert ["qwen", "llama"] == ids((await get(gw.url + "/v1/models", every))[1])
    assert 404 == (await get(gw.url + "/v1/models/llama", scoped))[0]
    assert 200 == (await get(gw.url + "/v1/models/llama", every))[0]
    assert ["qwen"] == ids((await get(gw.url + "/models/qwen/proxy/v1/models", scoped))[1])
    endpoints = (await get(gw.url + "/api/2.0/endpoints/", scoped))[1]
    assert ["qwen"] == ids(endpoints, "endpoints")


async def test_a_key_expires(gateway_factory: Factory, upstream, store, location) -> None:
    """A key made to expire in 0.4 s is let in, then refused as "expired API key"."""
    secret, _ = await create(store, "brief", expires=time.time() + 0.4)
    gw = await gateway_factory(config(upstream.url, location))
    assert 200 == (await post(gw.url, secret))[0]
    await refused_within([gw], secret, "expired API key", 2.0)


async def test_last_used_is_recorded(gateway_factory: Factory, upstream, store, location) -> None:
    """A key's use is written to the store in a batch (never per request)."""
    secret, _ = await create(store, "used")
    gw = await gateway_factory(config(upstream.url, location))
    before = time.time()
    assert 200 == (await post(gw.url, secret))[0]
    assert gw.state.managed is not None
    await gw.state.managed.flush_used()
    (listed,) = await store.list()
    assert listed.last_used is not None
    assert listed.last_used >= before


async def test_a_reload_keeps_the_keys(gateway_factory: Factory, upstream, store, location) -> None:
    """A reloaded config serves with the same managed keys, still refreshed."""
    secret, _ = await create(store, "kept")
    text = config(upstream.url, location)
    gw = await gateway_factory(text)
    live = gw.serving.runner.app[LIVE]
    await apply(live, load_config(text + "timeouts: {request_s: 60}\n"), {})
    assert live.state is not gw.state
    assert 200 == (await post(gw.url, secret))[0]
    await store.revoke("kept", time.time())
    await refused_within([gw], secret, "revoked API key", 1.0)


async def test_a_store_that_stops_answering_keeps_the_last_keys(
    gateway_factory: Factory, upstream, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped: the keys last read stay in force (logged once); started again with its
    data, a revoke made meanwhile takes effect."""
    store = await open_store(redis_server.url)
    secret, _ = await create(store, "steady")
    await store.close()
    gw = await gateway_factory(config(upstream.url, redis_server.url))
    redis_server.stop(save=True)
    with caplog.at_level(logging.ERROR, "proxy"):
        await asyncio.sleep(0.6)
        assert 200 == (await post(gw.url, secret))[0]
    assert 1 == caplog.text.count("key store failing, serving the keys last read")
    redis_server.start()
    store = await open_store(redis_server.url)
    try:
        await store.revoke("steady", time.time())
    finally:
        await store.close()
    await refused_within([gw], secret, "revoked API key", 1.0)


async def admin(
    gw: Gateway, method: str, path: str, key: str | None = ADMIN_KEY, json: object = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, gw.url + path, json=json, headers=headers) as r,
    ):
        return r.status, await r.json()


@pytest.fixture
async def admin_gateway(gateway_factory: Factory, upstream, location) -> Gateway:
    return await gateway_factory(
        config(upstream.url, location, ", admin_key_env: ADMIN_KEY"),
        {"ADMIN_KEY": ADMIN_KEY, "API_KEYS": "sk-static"},
    )


async def test_admin_api(admin_gateway: Gateway, upstream) -> None:
    """Create (the key answered once), list (never a secret or hash), use, revoke (refused within
    a second), and usage, all over HTTP with the admin key."""
    gw = admin_gateway
    spec = {
        "name": "team-b",
        "models": ["m"],
        "expires": "30d",
        "rpm": 60,
        "tpm": 1000,
        "max_in_flight": 2,
    }
    status, made = await admin(gw, "POST", "/admin/keys", json=spec)
    assert 201 == status
    secret = made.pop("key")
    assert secret.startswith("ipk_")
    assert {"name": "team-b", "models": ["m"], "rpm": 60, "tpm": 1000, "max_in_flight": 2} == {
        k: made[k] for k in ("name", "models", "rpm", "tpm", "max_in_flight")
    }
    status, listed = await admin(gw, "GET", "/admin/keys")
    assert 200 == status
    assert [made] == listed["keys"]
    assert secret not in str(listed)
    assert "hash" not in listed["keys"][0]
    await let_in_within([gw], secret, 1.0)
    assert (409, "conflict") == (
        (r := await admin(gw, "POST", "/admin/keys", json={"name": "team-b"}))[0],
        r[1]["error"]["type"],
    )
    status, revoked = await admin(gw, "DELETE", "/admin/keys/team-b")
    assert (200, "team-b") == (status, revoked["name"])
    assert revoked["revoked"] is not None
    await refused_within([gw], secret, "revoked API key", 1.0)
    assert 404 == (await admin(gw, "DELETE", "/admin/keys/nobody"))[0]
    status, usage = await admin(gw, "GET", "/admin/keys/usage?since=1h")
    assert (200, ["since", "usage"]) == (status, sorted(usage))
    assert 400 == (await admin(gw, "GET", "/admin/keys/usage?since=soon"))[0]
    assert [] == [p for p in upstream.posts if "/admin" in p.path]


@pytest.mark.parametrize(
    "body",
    [
        {"name": "bad name"},
        {"name": "ok", "models": "qwen"},
        {"name": "ok", "rpm": 0},
        {"name": "ok", "expires": "yesterday"},
        {"name": "ok", "colour": "red"},
        {"name": 5},
        "not an object",
    ],
)
async def test_admin_create_refuses_bad_bodies(admin_gateway: Gateway, body: object) -> None:
    """A bad create body is a 400 invalid_request that says what is wrong."""
    status, answer = await admin(admin_gateway, "POST", "/admin/keys", json=body)
    assert (400, "invalid_request") == (status, answer["error"]["type"])


@pytest.mark.parametrize(
    "key",
    [None, "wrong-" + "x" * 40, "sk-static", ADMIN_KEY[:-1]],
    ids=["none", "wrong", "client", "prefix"],
)
async def test_admin_needs_the_admin_key(admin_gateway: Gateway, key: str | None) -> None:
    """No key, a wrong one, a client's key or most of the admin key: 401 on every admin path."""
    for method, path in (
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("DELETE", "/admin/keys/x"),
        ("GET", "/admin/other"),
    ):
        status, answer = await admin(admin_gateway, method, path, key=key, json={})
        assert (401, "authentication_error") == (status, answer["error"]["type"]), (method, path)


async def test_the_admin_key_is_not_a_client_key(admin_gateway: Gateway) -> None:
    """The admin key opens nothing but /admin."""
    assert 401 == (await post(admin_gateway.url, ADMIN_KEY))[0]


async def test_admin_off_answers_as_if_absent(gateway_factory: Factory, upstream, location) -> None:
    """Without auth.admin_key_env (or with it naming an unset or short variable) /admin is an
    unknown route: 401 without a client key, 404 with one."""
    for auth, env in (
        ("", {}),
        (", admin_key_env: ADMIN_KEY", {}),
        (", admin_key_env: ADMIN_KEY", {"ADMIN_KEY": "short"}),
        (
            ", admin_key_env: ADMIN_KEY",
            {"ADMIN_KEY": "sk-static-" + "y" * 30, "API_KEYS": "sk-static-" + "y" * 30},
        ),
    ):
        gw = await gateway_factory(
            config(upstream.url, location, auth), {"API_KEYS": "sk-static", **env}
        )
        assert gw.state.admin is None
        client = env.get("API_KEYS", "sk-static")
        assert 401 == (await admin(gw, "GET", "/admin/keys", key=None))[0]
        assert (
            401
            == (await admin(gw, "GET", "/admin/keys", key=env.get("ADMIN_KEY", ADMIN_KEY) + "?"))[0]
        )
        assert (404, "not_found") == (
            (r := await admin(gw, "GET", "/admin/keys", key=client))[0],
            r[1]["error"]["type"],
        )


async def test_no_secret_in_logs_or_metrics(
    admin_gateway: Gateway, store, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys made, used, mistyped, revoked and expired, over the API and directly: no log line,
    access-log line or metric holds a secret, a hash or the admin key."""
    gw = admin_gateway
    with caplog.at_level(logging.DEBUG):
        _, made = await admin(gw, "POST", "/admin/keys", json={"name": "via-api"})
        direct, record = await create(store, "direct", expires=time.time() + 0.3)
        secrets = [made["key"], direct, ADMIN_KEY, "sk-static"]
        await refused_within([gw], direct[:-2], "invalid API key", 1.0)
        await let_in_within([gw], direct, 1.0)
        await post(gw.url, made["key"])
        await admin(gw, "DELETE", "/admin/keys/via-api")
        await refused_within([gw], made["key"], "revoked API key", 1.0)
        await refused_within([gw], direct, "expired API key", 2.0)
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
            metrics = await r.text()
    hashes = [Hasher().hexdigest(s) for s in secrets] + [record.hash]
    text = caplog.text + b"\n".join(gw.access_lines()).decode() + metrics
    for secret in secrets + hashes:
        assert secret not in text
        assert secret[4:20] not in text
    assert "direct" in b"\n".join(gw.access_lines()).decode()  # the name is logged instead


async def test_a_damaged_record_keeps_the_last_keys(
    gateway_factory: Factory, upstream, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A record in the store that does not decode: the keys last read stay in force and the
    log says the store is damaged; opening such a store at start is a StoreError."""
    store = await open_store(redis_server.url)
    secret, _ = await create(store, "fine")
    gw = await gateway_factory(config(upstream.url, redis_server.url))
    client = store.redis  # type: ignore[attr-defined]
    await client.hset("ipx:keys", "broken", b"{not json")
    await client.incr("ipx:version")
    with caplog.at_level(logging.ERROR, "proxy"):
        await asyncio.sleep(0.6)
        assert 200 == (await post(gw.url, secret))[0]
    assert "is damaged" in caplog.text
    managed = ManagedKeys(redis_server.url, Hasher())
    with pytest.raises(StoreError, match="is damaged"):
        await managed.start()
    await store.close()
