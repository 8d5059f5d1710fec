"""bench/floor.py, the aiohttp floor the benchmark measures the gateway against, relays as the
backend answers: real simulated backend, real sockets, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest

from bench.floor import Running, start_floor, upstream_lines
from bench.processes import free_port
from bench.simbackend import SimBackend, start_simbackend

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
async def sim() -> AsyncIterator[SimBackend]:
    backend = await start_simbackend(keepalive_s=5.0)
    yield backend
    await backend.close()


@pytest.fixture
async def floor(sim: SimBackend) -> AsyncIterator[Running]:
    running = await start_floor(sim.url)
    yield running
    await running.close()


async def wait_for(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_relays_a_plain_answer_and_a_stream(sim: SimBackend, floor: Running) -> None:
    """A non-streamed chat comes back whole with its length; a stream comes back chunked, its
    events in order to [DONE]; the client's own headers reach the backend (x-sim-tokens)."""
    url = f"http://127.0.0.1:{floor.port}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={**CHAT, "max_tokens": 3}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(await resp.read()))
            body = await resp.json()
        assert body["usage"]["completion_tokens"] == 3
        stream = {**CHAT, "max_tokens": 50, "stream": True}
        headers = {"x-sim-tokens": "4", "x-sim-chunk-delay-ms": "5"}
        async with session.post(url, json=stream, headers=headers) as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert len(events) == 4 + 3  # role, 4 tokens, finish, [DONE]
    assert events[-1] == "data: [DONE]"
    assert sim.stats.completed == 2


async def test_backend_unreachable_is_a_502_envelope() -> None:
    """With nothing listening at the backend's address the client gets the gateway's error
    envelope (backend_unreachable), not a hang or a reset."""
    running = await start_floor(f"http://127.0.0.1:{free_port()}")
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{running.port}/v1/chat/completions"
            async with session.post(url, json=CHAT) as resp:
                assert resp.status == 502
                body = await resp.json()
    finally:
        await running.close()
    assert body["error"]["type"] == "backend_unreachable"
    assert "cannot connect" in body["error"]["message"]


async def test_client_hang_up_closes_the_backend_connection(
    sim: SimBackend, floor: Running
) -> None:
    """A client that leaves mid-stream: the backend sees its own connection close and stops
    generating (S4's promise holds on the floor too)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", floor.port)
    body = orjson.dumps({**CHAT, "max_tokens": 1000, "stream": True})
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-sim-chunk-delay-ms: 20\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
    )
    await reader.readuntil(b"delta")
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: sim.stats.aborted == 1)
    assert sim.stats.aborts[-1]["phase"] == "streaming"
    assert sim.stats.completed == 0


async def test_backend_breaking_mid_stream_cuts_the_client() -> None:
    """A backend that closes inside a chunked body: the client's body ends short (a cut
    connection), never as if it had been complete."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)  # the head first, alone, so the floor starts streaming
        writer.write(b'e\r\ndata: {"a":1}\n\n\r\n')
        await writer.drain()
        writer.transport.abort()

    backend = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]
    running = await start_floor(f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{running.port}/v1/chat/completions"
            async with session.post(url, data=b"{}") as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError, match="not completed"):
                    await resp.read()
    finally:
        await running.close()
        backend.close()
        await backend.wait_closed()


def test_hop_by_hop_and_framing_headers_stay_behind() -> None:
    """The client's Host, length, Expect and hop-by-hop headers are not sent upstream (the
    upstream leg writes its own framing); end-to-end ones go as they came."""
    raw = (
        (b"Host", b"evil.example"),
        (b"Content-Length", b"99999"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive"),
        (b"Expect", b"100-continue"),
        (b"x-sim-tokens", b"4"),
        (b"Authorization", b"Bearer k"),
    )
    assert upstream_lines(raw) == b"x-sim-tokens: 4\r\nAuthorization: Bearer k\r\n"
