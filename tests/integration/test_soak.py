"""Soak: many mixed requests through one gateway leave no memory, fd, task or socket behind.

`SOAK_REQUESTS` sets the count (20,000 by default; `make soak` may ask for 100,000). The
figures are printed (`pytest -s`) and written as one JSON line to .cache/soak-figures.json.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from bench.simbackend import SimBackend, start_simbackend
from tests.conftest import wait_for

SOAK_REQUESTS = int(os.environ.get("SOAK_REQUESTS", "20000"))
WARMUP = 500
CONCURRENCY = 64
FIGURES = Path(__file__).resolve().parents[2] / ".cache" / "soak-figures.json"
MODEL = "sim-model"

# What the simulator makes up per request: the completion's serial id and its clock second.
VOLATILE = re.compile(rb'"id":"(?:chatcmpl|cmpl)-sim-\d+"|"created":\d+')


def masked(body: bytes) -> bytes:
    return VOLATILE.sub(b"<volatile>", body)


@dataclass(frozen=True)
class Kind:
    """One sort of request in the mix, and what its answer must be."""

    name: str
    path: str
    body: bytes
    weight: int
    headers: tuple[tuple[str, str], ...] = ()
    cut: bool = False  # the client closes the response after the first piece
    gateway_error: str | None = None  # the gateway's own envelope type, not the backend's answer


def chat(stream: bool, tokens: int) -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "soak the gateway"}],
            "max_tokens": tokens,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
    )


MIX = (
    Kind("chat", "/v1/chat/completions", chat(False, 12), 4),
    Kind("chat stream", "/v1/chat/completions", chat(True, 12), 6),
    Kind(
        "completion stream",
        "/v1/completions",
        orjson.dumps({"model": MODEL, "prompt": "once upon", "max_tokens": 6, "stream": True}),
        2,
    ),
    Kind(
        "embeddings",
        "/v1/embeddings",
        orjson.dumps({"model": MODEL, "input": ["a", "b c"]}),
        2,
    ),
    Kind(
        "cut stream",
        "/v1/chat/completions",
        chat(True, 40),
        2,
        headers=(("x-sim-chunk-delay-ms", "2"),),
        cut=True,
    ),
    Kind(
        "backend 400",
        "/v1/chat/completions",
        orjson.dumps({"model": MODEL, "max_tokens": -1, "messages": []}),
        1,
    ),
    Kind(
        "unknown model",
        "/v1/chat/completions",
        orjson.dumps({"model": "no-such-model", "messages": []}),
        1,
        gateway_error="not_found",
    ),
    Kind("bad body", "/v1/chat/completions", b'{"model": ', 1, gateway_error="invalid_request"),
)
SCHEDULE = [kind for kind in MIX for _ in range(kind.weight)]


@dataclass
class Figures:
    rss_kib: int
    fds: int
    tasks: int
    upstream_connections: int


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


async def settled(gw, sim: SimBackend) -> Figures:
    """The process's figures once every pooled upstream connection has idled out."""
    await asyncio.sleep(1.0)  # past the pool's keepalive_s of 0.5
    gw.state.backends["gpu"].pool.sweep()
    await wait_for(lambda: sim.stats.open_connections == 0, within_s=5)
    await asyncio.sleep(0.1)  # the gateway's handlers for closed client connections finish
    gc.collect()
    return Figures(
        rss_kib(),
        len(os.listdir("/proc/self/fd")),
        len(asyncio.all_tasks()),
        sim.stats.open_connections,
    )


async def expected_answers(sim: SimBackend) -> dict[str, tuple[int, bytes]]:
    """Each kind's status and (masked) body, asked of the backend directly."""
    out = {}
    async with aiohttp.ClientSession() as s:
        for kind in MIX:
            if kind.cut or kind.gateway_error:
                continue
            async with s.post(sim.url + kind.path, data=kind.body, headers=kind.headers) as r:
                out[kind.name] = (r.status, masked(await r.read()))
    return out


@dataclass
class Tally:
    """Outcomes by kind, and the first few answers that differed from the backend's own."""

    counts: collections.Counter[str]
    mismatches: list[str]


async def one(
    session: aiohttp.ClientSession, url: str, kind: Kind, expected: dict, tally: Tally
) -> None:
    async with (
        asyncio.timeout(10),
        session.post(url + kind.path, data=kind.body, headers=kind.headers) as r,
    ):
        if kind.cut:
            assert 200 == r.status
            await r.content.readany()
            r.close()  # the client walks away mid-stream
            tally.counts["cut"] += 1
            return
        body = await r.read()
    if kind.gateway_error is not None:
        assert kind.gateway_error == orjson.loads(body)["error"]["type"], body
        tally.counts[kind.name] += 1
        return
    if expected[kind.name] != (r.status, masked(body)):
        if len(tally.mismatches) < 5:
            tally.mismatches.append(f"{kind.name}: {r.status} {body[:300]!r}")
        tally.counts["mismatch"] += 1
        return
    tally.counts[kind.name] += 1


async def run(url: str, count: int, expected: dict, tally: Tally) -> None:
    """`count` requests of the mix, CONCURRENCY at a time, on one client session."""
    next_index = iter(range(count))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in next_index:
                await one(session, url, SCHEDULE[i % len(SCHEDULE)], expected, tally)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def test_soak_leaves_nothing_behind(gateway_factory) -> None:
    """SOAK_REQUESTS mixed requests (streams, cuts, errors): every whole answer is the backend's
    own, and RSS, fds, tasks and upstream connections return to their warmed-up baseline."""
    sim = await start_simbackend(ttft_ms=1.0, chunk_delay_ms=0.5, keepalive_s=60.0)
    try:
        gw = await gateway_factory(
            f"backends:\n  gpu: {{url: '{sim.url}', kind: vllm, keepalive_s: 0.5}}\n"
            f"models:\n  {MODEL}: {{targets: [{{backend: gpu}}]}}\n"
            "health: {interval_s: 3600}\n"
            "server: {access_log: false}\n"  # the fixture's log is an in-memory buffer
        )
        expected = await expected_answers(sim)
        async with asyncio.timeout(60):
            await run(gw.url, WARMUP, expected, Tally(collections.Counter(), []))
        before = await settled(gw, sim)
        tally = Tally(collections.Counter(), [])
        start = time.monotonic()
        async with asyncio.timeout(max(120.0, SOAK_REQUESTS / 100)):
            await run(gw.url, SOAK_REQUESTS, expected, tally)
        took = time.monotonic() - start
        after = await settled(gw, sim)
    finally:
        await sim.close()

    figures = {
        "requests": SOAK_REQUESTS,
        "concurrency": CONCURRENCY,
        "seconds": round(took, 1),
        "requests_per_s": round(SOAK_REQUESTS / took),
        "before": vars(before),
        "after": vars(after),
        "outcomes": dict(tally.counts),
        "backend_aborts_seen": sim.stats.aborted,
    }
    print(f"\nsoak: {orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode()}")
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_bytes(orjson.dumps(figures) + b"\n")

    assert [] == tally.mismatches
    assert SOAK_REQUESTS == sum(tally.counts.values())
    assert 0 == gw.state.backends["gpu"].in_flight
    assert 0 == after.upstream_connections
    assert after.rss_kib - before.rss_kib < 40 * 1024
    assert after.fds <= before.fds + 10
    assert after.tasks <= before.tasks + 5
