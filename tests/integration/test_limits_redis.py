"""Rate limits shared through a real redis-server: two gateways, one limit; Redis stopped
mid-load and started again; slots in flight back to zero; the script's arithmetic is ours."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import signal
import time

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from proxy.keys import Hasher, new_key, open_store
from proxy.limits import Limits, LocalLimits, rules_for
from proxy.ratelimit import LIMITER, Limiter
from proxy.ratelimit_redis import PREFIX, RedisLimits
from tests.conftest import one_backend, wait_for
from tests.fakes import chat_body, json_script, stream_script
from tests.redis_fixture import RedisServer

KEYS = {"API_KEYS": "k-one,k-two"}
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 345}]})
CHAT = "/v1/chat/completions"


def config(upstream_url: str, redis_url: str, limits: str, hosts: int, timeout_s: float) -> str:
    auth = (
        f"auth: {{store: '{redis_url}', hosts: {hosts}, redis_timeout_s: {timeout_s}, "
        f"default_limits: {{{limits}}}}}\n"
    )
    return one_backend(upstream_url, extra=auth)


def limiter_of(gateway) -> Limiter:
    return gateway.serving.runner.app[LIMITER]


async def post(session: aiohttp.ClientSession, url: str, body: bytes = BODY, key: str = "k-one"):
    started = time.monotonic()
    async with session.post(url + CHAT, data=body, headers={"x-api-key": key}) as r:
        await r.read()
        return r.status, dict(r.headers), time.monotonic() - started


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
async def client(redis_server: RedisServer):
    """A client of the test's own, to look into Redis."""
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def pair(gateway_factory, upstream, redis_server: RedisServer):
    """Two gateways in front of one backend, sharing one Redis. Their Redis timeout is 0.5 s
    unless a test is about the timeout: the client, both gateways and the backend share one
    event loop here, whose lag on a busy machine would pass for a slow Redis."""

    async def make(limits: str, hosts: int = 2, timeout_s: float = 0.5):
        text = config(upstream.url, redis_server.url, limits, hosts, timeout_s)
        return [await gateway_factory(text, KEYS) for _ in range(2)]

    return make


async def test_two_gateways_enforce_one_limit(pair) -> None:
    """rpm 30 shared through Redis: 60 requests spread over two gateways, exactly 30 pass."""
    gateways = await pair("rpm: 30")
    async with aiohttp.ClientSession() as s:
        results = []
        for start in range(0, 60, 10):  # ten at a time, alternating gateways
            results += await asyncio.gather(
                *(post(s, gateways[i % 2].url) for i in range(start, start + 10))
            )
    statuses = [status for status, _, _ in results]
    assert (30, 30) == (statuses.count(200), statuses.count(429))
    refused = next(h for status, h, _ in results if status == 429)
    assert ("30", "0") == (
        refused["x-ratelimit-limit-requests"],
        refused["x-ratelimit-remaining-requests"],
    )
    assert refused["Retry-After"] in ("1", "2")


async def test_tpm_on_two_gateways_with_headers(pair, upstream) -> None:
    """tpm 300 shared: each answer uses 200 tokens (the estimate was 100, the rest is charged
    afterwards), so the third request, on either gateway, waits; the headers say the same
    on both gateways."""
    upstream.script[CHAT] = json_script(200, chat_body(prompt=150, completion=50))
    a, b = await pair("tpm: 300")
    async with aiohttp.ClientSession() as s:
        first = await post(s, a.url)
        await wait_for(lambda: limiter_of(a).settled)
        second = await post(s, b.url)
        await wait_for(lambda: limiter_of(b).settled)
        third_a = await post(s, a.url)
        third_b = await post(s, b.url)
    assert [(200, "300", "200"), (200, "300", "0")] == [
        (status, h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"])
        for status, h, _ in (first, second)
    ]
    for status, h, _ in (third_a, third_b):
        # 400 tokens charged: the bucket is 80 s from full; 100 more fit in 40 s.
        assert (429, "40", "0") == (
            status,
            h["Retry-After"],
            h["x-ratelimit-remaining-tokens"],
        )
        assert h["x-ratelimit-reset-tokens"].startswith(("1m19.", "1m20s"))


async def test_redis_stopped_mid_load_and_started_again(pair, redis_server, caplog) -> None:
    """SIGSTOP Redis mid-load: every request still answers, none waits much past
    auth.redis_timeout_s, the gauge says degraded and each gateway logs it once; SIGCONT:
    the gauge is back to 0, and what was spent meanwhile is charged to Redis."""
    caplog.set_level(logging.WARNING, logger="proxy")
    gateways = await pair("rpm: 600", timeout_s=0.05)  # the default; 1 request per 0.1 s refills
    assert redis_server.process is not None
    pid = redis_server.process.pid
    started = time.monotonic()
    latencies: list[float] = []
    async with aiohttp.ClientSession() as s:

        async def load(n: int) -> None:
            for start in range(0, n, 10):
                done = await asyncio.gather(
                    *(post(s, gateways[i % 2].url) for i in range(start, start + 10))
                )
                assert [200] * 10 == [status for status, _, _ in done]
                latencies.extend(t for _, _, t in done)

        await load(100)
        os.kill(pid, signal.SIGSTOP)
        try:
            await load(100)
            assert [1.0, 1.0] == [await metric(s, g.url, "proxy_limits_degraded") for g in gateways]
        finally:
            os.kill(pid, signal.SIGCONT)
        for g in gateways:
            await wait_for(lambda g=g: not limiter_of(g).degraded, within_s=5)
            await wait_for(lambda g=g: limiter_of(g).settled)
        assert [0.0, 0.0] == [await metric(s, g.url, "proxy_limits_degraded") for g in gateways]
        status, headers, _ = await post(s, gateways[0].url)
        elapsed = time.monotonic() - started
    assert 200 == status
    # 201 requests charged to Redis, the 100 it missed included; 10 per second refilled. The
    # three checks per gateway that timed out may have run once Redis woke: counted twice.
    left = int(headers["x-ratelimit-remaining-requests"])
    assert 600 - 201 - 6 <= left <= 600 - 201 + elapsed * 10 + 1
    assert max(latencies) < 1.0  # the hot path waits for Redis at most 50 ms (plus CI noise)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rate limits")]
    opened = sum("Redis failed 3 calls" in line or "at start" in line for line in lines)
    # One line per transition, not per request: each gateway opened (at least at the stop;
    # a loaded machine may add an opening of its own) and closed as often, closed last.
    assert 2 <= opened == sum("Redis answers again;" in line for line in lines) < 10
    assert "Redis answers again;" in lines[-1]
    assert "enforces 1/2 of every limit" in lines[0]


async def test_redis_killed_then_restarted_empty(pair, redis_server) -> None:
    """Killed, requests are served on the hosts' shares; a Redis restarted with no data and
    no scripts (NOSCRIPT) is used again once the probe sees it, and is charged what was
    admitted after the breaker opened (the three checks that opened it are not: one that
    only timed out would have been counted by Redis already)."""
    a, b = await pair("rpm: 60")  # one per second refills
    async with aiohttp.ClientSession() as s:
        assert 200 == (await post(s, a.url))[0]
        redis_server.kill()
        statuses = [(await post(s, g.url))[0] for g in (a, b) * 6]
        assert [200] * 12 == statuses
        assert limiter_of(a).degraded and limiter_of(b).degraded
        redis_server.start()
        await wait_for(lambda: not limiter_of(a).degraded and not limiter_of(b).degraded, 5)
        back = time.monotonic()
        status, headers, _ = await post(s, a.url)
    assert 200 == status
    left = int(headers["x-ratelimit-remaining-requests"])
    assert 60 - 2 * 3 - 1 <= left <= 60 - 2 * 3 - 1 + math.ceil(time.monotonic() - back)
    errors = limiter_of(a).metrics.store_errors
    assert 3 == errors["check"] + errors["settle"]  # the three that opened the breaker


async def test_script_flushed_is_loaded_again(pair, client) -> None:
    """SCRIPT FLUSH under a running gateway: the next check loads the script again and
    passes; the breaker never hears of it."""
    (a, _) = await pair("rpm: 100")
    async with aiohttp.ClientSession() as s:
        assert 200 == (await post(s, a.url))[0]
        await client.script_flush()
        status, headers, _ = await post(s, a.url)
    assert (200, "98") == (status, headers["x-ratelimit-remaining-requests"])
    assert {} == dict(limiter_of(a).metrics.store_errors)


async def test_in_flight_slots_in_redis_return_to_zero(pair, upstream, client) -> None:
    """max_in_flight 1 across both gateways: a stream on one refuses a request on the other;
    the slot is freed when the client leaves mid-stream and when the backend fails."""
    a, b = await pair("max_in_flight: 1")
    slots = PREFIX + "k:key-0:inflight"
    upstream.script[CHAT] = stream_script(tokens=50, gap=0.05)
    stream = orjson.dumps({"model": "m", "stream": True})
    async with aiohttp.ClientSession() as s:
        r = await s.post(a.url + CHAT, data=stream, headers={"x-api-key": "k-one"})
        await r.content.readuntil(b"\n\n")
        assert 1 == await client.zcard(slots)
        status, _, _ = await post(s, b.url)
        assert 429 == status
        r.close()  # the client leaves mid-stream
        for _ in range(200):
            if await client.zcard(slots) == 0:
                break
            await asyncio.sleep(0.01)
        assert 0 == await client.zcard(slots)
        upstream.script[CHAT] = stream_script(tokens=3, cut_after=1)  # the backend dies
        await post(s, b.url, body=stream)
        await wait_for(lambda: limiter_of(b).settled)
        assert 0 == await client.zcard(slots)
        assert 0 < await client.pttl(slots) or not await client.exists(slots)


async def test_the_script_decides_as_one_process_does(redis_server) -> None:
    """The same requests at the same instants, checked in Redis and in one process: the same
    verdicts, headers and refusals, for every rule kind at once."""
    store = RedisLimits(redis_server.url)
    local = LocalLimits()
    rng = random.Random(7)
    now = 1_000_000.0
    try:
        for i in range(300):
            now += rng.choice((0.0, 0.0, 0.01, 0.5, 3.0))
            rules = rules_for(
                "key-0",
                Limits(rpm=20, tpm=2000),
                "m",
                Limits(rpm=50, max_in_flight=1000),
                rng.randrange(0, 4000),
            )
            shared = await store.check(rules, f"r{i}", 10**6, now=now)  # no slot expires
            alone = local.check(rules, now)
            assert alone == shared
    finally:
        await store.close()


async def test_a_team_key_hits_its_tpm_on_two_gateways(
    gateway_factory, upstream, redis_server: RedisServer
) -> None:
    """The issue's case: a managed key made with tpm 300, used on two gateways sharing one
    Redis, is refused on both once its tokens are spent, with the same headers; another team's
    key is not."""
    store = await open_store(redis_server.url)
    try:
        team = new_key("team-a", Hasher(), time.time(), tpm=300)  # (secret, record)
        other = new_key("team-b", Hasher(), time.time())
        for _, record in (team, other):
            await store.create(record)
    finally:
        await store.close()
    upstream.script[CHAT] = json_script(200, chat_body(prompt=150, completion=50))
    text = one_backend(
        upstream.url, extra=f"auth: {{store: '{redis_server.url}', redis_timeout_s: 0.5}}\n"
    )
    a, b = [await gateway_factory(text, {}) for _ in range(2)]
    async with aiohttp.ClientSession() as s:
        for gw in (a, b):
            assert 200 == (await post(s, gw.url, key=team[0]))[0]
            await wait_for(lambda gw=gw: limiter_of(gw).settled)
        refused = [await post(s, gw.url, key=team[0]) for gw in (a, b)]
        assert 200 == (await post(s, b.url, key=other[0]))[0]
    for status, headers, _ in refused:
        assert (429, "40", "300", "0") == (
            status,
            headers["Retry-After"],
            headers["x-ratelimit-limit-tokens"],
            headers["x-ratelimit-remaining-tokens"],
        )
