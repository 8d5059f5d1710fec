"""Rate limits in one process: the 429, the x-ratelimit-* headers, tokens, slots in flight."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from proxy.ratelimit import LIMITER, Limiter
from proxy.workermetrics import RUN_DIR_ENV, WORKER_ENV, WORKERS_ENV
from tests.conftest import one_backend, wait_for
from tests.fakes import chat_body, json_script, stream_script

KEYS = {"API_KEYS": "k-one,k-two"}
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 345}]})
assert 400 == len(BODY)  # an estimate of 100 tokens
CHAT = "/v1/chat/completions"


def limiter_of(gateway) -> Limiter:
    return gateway.serving.runner.app[LIMITER]


def frozen(gateway, at: float = 1000.0) -> Limiter:
    """The gateway's limiter on a clock that stands still (no bucket refills mid-test)."""
    limiter = limiter_of(gateway)
    limiter.clock = lambda: at
    return limiter


async def post(url: str, key: str = "k-one", body: bytes = BODY, path: str = CHAT):
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + path, data=body, headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def limits(rpm: str = "", tpm: str = "", in_flight: str = "") -> str:
    fields = ", ".join(
        f for f in (rpm and f"rpm: {rpm}", tpm and f"tpm: {tpm}", in_flight and in_flight) if f
    )
    return f"auth: {{default_limits: {{{fields}}}}}\n"


async def test_rpm_refusal_is_the_documented_429(gateway_factory, upstream) -> None:
    """3 rpm: three 200s counting down, then a 429 with the envelope, Retry-After and the
    x-ratelimit-* headers exactly as documented; the backend never sees the fourth."""
    gw = await gateway_factory(one_backend(upstream.url, extra=limits(rpm="3")), KEYS)
    frozen(gw)
    seen = []
    for _ in range(3):
        status, headers, _ = await post(gw.url)
        seen.append((status, headers["x-ratelimit-remaining-requests"]))
    assert [(200, "2"), (200, "1"), (200, "0")] == seen
    assert ("3", "1m0s") == (
        headers["x-ratelimit-limit-requests"],
        headers["x-ratelimit-reset-requests"],
    )
    assert "x-ratelimit-limit-tokens" not in headers  # no token limit applies
    status, headers, body = await post(gw.url)
    assert 429 == status
    assert {
        "error": {
            "type": "rate_limit_exceeded",
            "message": "rate limit reached: 3 requests per minute for this key; retry in 20s",
        }
    } == orjson.loads(body)
    assert ("20", "3", "0", "1m0s") == (
        headers["Retry-After"],
        headers["x-ratelimit-limit-requests"],
        headers["x-ratelimit-remaining-requests"],
        headers["x-ratelimit-reset-requests"],
    )
    assert 3 == len(upstream.posts)
    assert 200 == (await post(gw.url, key="k-two"))[0]  # another key, another bucket


async def test_a_bucket_refills_with_time(gateway_factory, upstream) -> None:
    """One request per 20 s at 3 rpm: refused at 19.9 s, admitted at 20 s."""
    gw = await gateway_factory(one_backend(upstream.url, extra=limits(rpm="3")), KEYS)
    limiter = frozen(gw, 0.0)
    for _ in range(3):
        await post(gw.url)
    limiter.clock = lambda: 19.9
    assert 429 == (await post(gw.url))[0]
    limiter.clock = lambda: 20.0
    assert 200 == (await post(gw.url))[0]


async def test_a_stream_carries_the_headers_in_its_head(gateway_factory, upstream) -> None:
    """The x-ratelimit-* headers arrive with a stream's head, before its first event."""
    upstream.script[CHAT] = stream_script(tokens=2, first_delay=0.5)
    gw = await gateway_factory(one_backend(upstream.url, extra=limits(rpm="10", tpm="1000")), KEYS)
    frozen(gw)
    body = orjson.dumps({"model": "m", "stream": True, "messages": []})
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.post(gw.url + CHAT, data=body, headers={"x-api-key": "k-one"}) as r:
            head_after = time.monotonic() - started
            assert ("9", "text/event-stream") == (
                r.headers["x-ratelimit-remaining-requests"],
                r.headers["Content-Type"],
            )
            estimate = -(-len(body) // 4)  # bytes / 4, rounded up
            assert str(1000 - estimate) == r.headers["x-ratelimit-remaining-tokens"]
            assert head_after < 0.4  # the head came before the backend's first event
            assert b"[DONE]" in await r.read()


async def test_tokens_are_estimated_then_corrected_by_usage(gateway_factory, upstream) -> None:
    """tpm 1000: a 400-byte body is charged 100 before it goes; the backend's usage (5 + 2)
    refunds 93, so the next request sees 1000 - 7 - 100 left."""
    gw = await gateway_factory(one_backend(upstream.url, extra=limits(tpm="1000")), KEYS)
    limiter = frozen(gw)
    first = await post(gw.url)
    assert ("1000", "900") == (
        first[1]["x-ratelimit-limit-tokens"],
        first[1]["x-ratelimit-remaining-tokens"],
    )
    await wait_for(lambda: limiter.local.tats.get("k:key-0:tpm") == 1000.0 + 7 * 60 / 1000)
    second = await post(gw.url)
    assert str(1000 - 7 - 100) == second[1]["x-ratelimit-remaining-tokens"]


async def test_usage_over_the_estimate_is_charged_and_refuses_later(
    gateway_factory, upstream
) -> None:
    """A request that used more than its estimate is charged the rest: the next one waits
    until the debt is paid (Retry-After in whole seconds, rounded up)."""
    upstream.script[CHAT] = json_script(200, chat_body(prompt=150, completion=50))
    gw = await gateway_factory(one_backend(upstream.url, extra=limits(tpm="100")), KEYS)
    frozen(gw)
    assert 200 == (await post(gw.url))[0]  # estimate capped at the limit: 100 of 100
    status, headers, body = await post(gw.url)  # 200 used: a minute of debt
    assert 429 == status
    assert ("120", "100", "0", "2m0s") == (
        headers["Retry-After"],
        headers["x-ratelimit-limit-tokens"],
        headers["x-ratelimit-remaining-tokens"],
        headers["x-ratelimit-reset-tokens"],
    )
    assert (
        "100 tokens per minute for this key; retry in 2m0s"
        in orjson.loads(body)["error"]["message"]
    )


async def test_a_request_no_backend_answered_is_refunded(gateway_factory) -> None:
    """An unreachable backend (502): the token estimate goes back, the request still counted."""
    config = "backends:\n  gpu: {url: 'http://127.0.0.1:9', kind: vllm}\n" + limits(
        rpm="10", tpm="1000"
    )
    gw = await gateway_factory(config, KEYS)
    limiter = frozen(gw)
    assert 502 == (await post(gw.url))[0]
    assert "k:key-0:tpm" not in limiter.local.tats  # full again
    assert "k:key-0:rpm" in limiter.local.tats


async def test_model_limits_hold_across_keys(gateway_factory, upstream) -> None:
    """models.m.limits.rpm 2: two keys share it; the 429 names the model."""
    models = "models:\n  m:\n    targets: [{backend: gpu}]\n    limits: {rpm: 2}\n"
    gw = await gateway_factory(one_backend(upstream.url, models=models), KEYS)
    frozen(gw)
    assert [200, 200] == [(await post(gw.url, k))[0] for k in ("k-one", "k-two")]
    status, _, body = await post(gw.url)
    assert (429, "rate limit reached: 2 requests per minute for model 'm'; retry in 30s") == (
        status,
        orjson.loads(body)["error"]["message"],
    )
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert 'proxy_rate_limited_total{limit="requests",model="m"} 1.0' in text
    assert "proxy_limits_degraded 0.0" in text


async def test_in_flight_slot_is_freed_on_every_path(gateway_factory, upstream) -> None:
    """max_in_flight 1: a second request while a stream runs is a 429; the slot comes back
    when the client leaves mid-stream, when the backend fails, and after a 429."""
    gw = await gateway_factory(
        one_backend(upstream.url, extra=limits(in_flight="max_in_flight: 1")), KEYS
    )
    limiter = frozen(gw)
    upstream.script[CHAT] = stream_script(tokens=50, gap=0.05)
    body = orjson.dumps({"model": "m", "stream": True})
    async with aiohttp.ClientSession() as s:
        r = await s.post(gw.url + CHAT, data=body, headers={"x-api-key": "k-one"})
        await r.content.readuntil(b"\n\n")  # the stream is under way
        status, _, refused = await post(gw.url)
        assert 429 == status
        assert (
            "1 requests in flight at once for this key" in orjson.loads(refused)["error"]["message"]
        )
        r.close()  # the client leaves mid-stream
    await wait_for(lambda: limiter.local.running == {})
    upstream.script[CHAT] = json_script(500, {"error": "boom"})  # the backend's own error
    assert 500 == (await post(gw.url))[0]
    assert {} == limiter.local.running
    upstream.script[CHAT] = stream_script(tokens=3, cut_after=1)  # the backend dies mid-stream
    await post(gw.url, body=body)
    await wait_for(lambda: limiter.local.running == {})


async def test_anthropic_route_gets_its_own_envelope_and_the_headers(
    gateway_factory, upstream
) -> None:
    """Translated routes are limited too; their 429 is in the Anthropic shape."""
    gw = await gateway_factory(one_backend(upstream.url, extra=limits(rpm="1")), KEYS)
    frozen(gw)
    body = orjson.dumps(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    path = "/anthropic/v1/messages"
    assert 200 == (await post(gw.url, body=body, path=path))[0]
    status, headers, payload = await post(gw.url, body=body, path=path)
    assert (429, "rate_limit_error", "0") == (
        status,
        orjson.loads(payload)["error"]["type"],
        headers["x-ratelimit-remaining-requests"],
    )


async def test_workers_each_hold_their_share(gateway_factory, upstream, tmp_path) -> None:
    """With 2 workers and no Redis, each worker admits half of a key's rpm (never twice it)."""
    env = {**KEYS, WORKER_ENV: "0", WORKERS_ENV: "2", RUN_DIR_ENV: str(tmp_path)}
    gw = await gateway_factory(one_backend(upstream.url, extra=limits(rpm="4")), env)
    frozen(gw)
    statuses = [(await post(gw.url))[0] for _ in range(3)]
    assert [200, 200, 429] == statuses


@pytest.mark.parametrize("auth_off", [True])
async def test_no_keys_means_only_model_limits(gateway_factory, upstream, auth_off) -> None:
    """With auth off, default_limits has no key to hold; a model's limits still apply."""
    models = "models:\n  m:\n    targets: [{backend: gpu}]\n    limits: {rpm: 1}\n"
    gw = await gateway_factory(one_backend(upstream.url, models=models, extra=limits(rpm="100")))
    frozen(gw)
    statuses = [(await post(gw.url))[0] for _ in range(2)]
    assert [200, 429] == statuses
    await asyncio.sleep(0)


async def test_a_plain_stream_corrects_its_estimate(gateway_factory, upstream) -> None:
    """A stream whose client did not ask for usage: the backend's usage (7 prompt, 3
    completion) still replaces the estimate once the stream ends."""
    upstream.script[CHAT] = stream_script(tokens=3)
    gw = await gateway_factory(one_backend(upstream.url, extra=limits(tpm="1000")), KEYS)
    limiter = frozen(gw)
    body = orjson.dumps({"model": "m", "stream": True, "messages": []})
    status, _, events = await post(gw.url, body=body)
    assert (200, True) == (status, events.endswith(b"data: [DONE]\n\n"))
    assert b'"usage"' not in events  # the client did not ask for it
    assert pytest.approx(1000.0 + 10 * 60 / 1000) == limiter.local.tats["k:key-0:tpm"]
