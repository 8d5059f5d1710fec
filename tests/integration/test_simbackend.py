"""The simulated inference server behind the benchmarks speaks OpenAI's HTTP API faithfully."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
import orjson
import pytest

from bench.disconnect import measure_all
from bench.simbackend import SimBackend, start_simbackend
from bench.streamload import LoadSpec, chat_body, run_load

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
async def sim() -> AsyncIterator[SimBackend]:
    backend = await start_simbackend(models=("sim-model", "other"), keepalive_s=0.3)
    yield backend
    await backend.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def wait_for(predicate: Callable[[], bool], within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_health_and_models(sim: SimBackend, session: aiohttp.ClientSession) -> None:
    """/health answers ok and /v1/models lists every configured model in OpenAI's shape."""
    async with session.get(f"{sim.url}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    async with session.get(f"{sim.url}/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["sim-model", "other"]
    assert {"simbackend"} == {m["owned_by"] for m in body["data"]}


async def test_chat_completion_has_usage(sim: SimBackend, session: aiohttp.ClientSession) -> None:
    """A non-streaming chat completion returns max_tokens tokens, usage and finish_reason."""
    async with session.post(f"{sim.url}/v1/chat/completions", json={**CHAT, "max_tokens": 5}) as r:
        body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == " The quick brown fox jumps"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


async def test_stream_events_one_per_http_chunk(
    sim: SimBackend, session: aiohttp.ClientSession
) -> None:
    """A stream sends role, one event per token, finish, usage, [DONE], one per HTTP chunk."""
    payload = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    events: list[bytes] = []
    async with session.post(f"{sim.url}/v1/chat/completions", json=payload) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        buffer = b""
        async for data, end_of_chunk in resp.content.iter_chunks():
            buffer += data
            if end_of_chunk:
                events.append(buffer)
                buffer = b""
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == [
        " The",
        " quick",
        " brown",
    ]
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"]["completion_tokens"] == 3
    assert len(events) == 7


async def test_completions_stream_without_usage(
    sim: SimBackend, session: aiohttp.ClientSession
) -> None:
    """A completions stream has no role event and no usage event unless asked for."""
    payload = {"model": "other", "prompt": "hi", "max_tokens": 2, "stream": True}
    async with session.post(f"{sim.url}/v1/completions", json=payload) as resp:
        text = await resp.text()
    events = [e for e in text.split("\n\n") if e]
    assert len(events) == 4
    first = orjson.loads(events[0].removeprefix("data: "))
    assert (
        first["object"],
        first["model"],
        first["choices"][0]["text"],
    ) == ("text_completion", "other", " The")
    assert events[-1] == "data: [DONE]"


async def test_embeddings_base64_matches_floats(
    sim: SimBackend, session: aiohttp.ClientSession
) -> None:
    """encoding_format=base64 carries the same little-endian float32 vector as the float list."""
    url = f"{sim.url}/v1/embeddings"
    async with session.post(url, json={"input": ["a b", "c"]}) as resp:
        floats = await resp.json()
    async with session.post(url, json={"input": ["a b", "c"], "encoding_format": "base64"}) as r:
        packed = await r.json()
    decoded = [
        list(struct.unpack("<8f", base64.b64decode(item["embedding"]))) for item in packed["data"]
    ]
    assert [item["embedding"] for item in floats["data"]] == decoded
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_errors_use_vllm_shape(sim: SimBackend, session: aiohttp.ClientSession) -> None:
    """An unknown path is a 404 and bad JSON a 400, both in vLLM's error envelope."""
    async with session.get(f"{sim.url}/v1/nope") as resp:
        assert resp.status == 404
        assert {"message", "type", "code"} == set((await resp.json())["error"])
    async with session.post(f"{sim.url}/v1/chat/completions", data=b"{not json") as resp:
        body = await resp.json()
    assert (
        resp.status,
        body["error"]["type"],
        body["error"]["code"],
    ) == (400, "BadRequestError", 400)


async def test_chunked_request_body(sim: SimBackend, session: aiohttp.ClientSession) -> None:
    """A request body sent with chunked transfer encoding is read whole."""

    async def body() -> AsyncIterator[bytes]:
        yield b'{"prompt": "one two", '
        yield b'"max_tokens": 4}'

    async with session.post(f"{sim.url}/v1/completions", data=body()) as resp:
        assert (await resp.json())["usage"]["completion_tokens"] == 4


async def test_disconnect_mid_stream_is_recorded_at_once(sim: SimBackend) -> None:
    """A client that leaves mid-stream stops the generation and is recorded within milliseconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    body = orjson.dumps({**CHAT, "max_tokens": 1000, "stream": True})
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: gone-1\r\n"
        b"x-sim-chunk-delay-ms: 20\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    await reader.readuntil(b"delta")
    closed_at = time.monotonic_ns()
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: sim.stats.aborted == 1)
    abort = sim.stats.aborts[-1]
    assert (abort["request_id"], abort["phase"]) == ("gone-1", "streaming")
    assert abort["t_closed_ns"] - closed_at < 50_000_000
    assert abort["events_sent"] < 10
    assert sim.stats.completed == 0


async def test_disconnect_before_headers_phase(
    sim: SimBackend, session: aiohttp.ClientSession
) -> None:
    """A client gone while headers are delayed shows in /sim/stats in the "headers" phase."""
    headers = {"x-sim-header-delay-ms": "5000", "x-request-id": "early"}
    payload = {**CHAT, "stream": True}
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.1):
            await session.post(f"{sim.url}/v1/chat/completions", json=payload, headers=headers)
    await wait_for(lambda: sim.stats.aborted == 1)
    async with session.get(f"{sim.url}/sim/stats") as resp:
        stats = await resp.json()
    assert [(a["request_id"], a["phase"]) for a in stats["aborts"]] == [("early", "headers")]


async def test_idle_keepalive_connection_is_closed(sim: SimBackend) -> None:
    """A kept-alive connection left idle is closed by the server after --keepalive-s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
    started = time.monotonic()
    async with asyncio.timeout(2):
        assert await reader.read() == b""
    assert 0.2 < time.monotonic() - started < 1.0
    writer.close()
    await writer.wait_closed()


async def test_streamload_counts_every_event(sim: SimBackend) -> None:
    """The benchmark's load generator sees every stream whole: events, first event, no errors."""
    spec = LoadSpec(
        port=sim.port,
        body=chat_body(5),
        mode="burst",
        streams=20,
        ramp_ms=20,
        rounds=2,
        expect_events=8,  # role, 5 tokens, finish, [DONE]
    )
    summary = await run_load(spec)
    assert (summary["ok"], summary["errors"], summary["events"]) == (40, 0, 320)
    assert summary["ttfe_ms"]["p99"] <= summary["total_ms"]["p99"]


async def test_streamload_flags_a_wrong_event_count(sim: SimBackend) -> None:
    """A stream with another number of events than expected counts as an error, not a success."""
    spec = LoadSpec(port=sim.port, body=chat_body(5), mode="loop", connections=2, duration_s=0.2)
    summary = await run_load(replace(spec, expect_events=9))
    assert summary["ok"] == 0
    assert summary["error_kinds"] == {"events_mismatch": summary["requests"]}


async def test_disconnect_probes_see_each_phase(sim: SimBackend) -> None:
    """S4's probes, pointed straight at the backend, see every phase's hang-up within 50 ms."""
    phases = await measure_all(
        ("127.0.0.1", sim.port), ("127.0.0.1", sim.port), reps=2, hold_ms=800
    )
    assert set(phases) == {"headers", "first_token", "mid_stream"}
    for figures in phases.values():
        assert (figures["failed_probes"], figures["never_seen"]) == (0, 0)
        assert 0 <= figures["ms"]["max"] < 50
