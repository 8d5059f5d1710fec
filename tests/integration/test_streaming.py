"""Streams are relayed as they are made; a client that leaves stops the backend at once."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import orjson
import pytest

from tests.conftest import one_backend, wait_for
from tests.fakes import slow_json_script, stream_script

CHAT = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


async def read_events(response: aiohttp.ClientResponse) -> list[bytes]:
    body = await response.read()
    return [e for e in body.split(b"\n\n") if e]


async def test_chunks_reach_client_as_they_are_made(gateway, upstream) -> None:
    """With chunks 300 ms apart, the first arrives long before the last is sent."""
    upstream.script["/v1/chat/completions"] = stream_script(tokens=4, gap=0.3)
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as s:
        start = time.monotonic()
        async with s.post(gateway.url + "/v1/chat/completions", data=CHAT) as r:
            assert 200 == r.status
            assert "no-cache" == r.headers["Cache-Control"]
            assert "no" == r.headers["X-Accel-Buffering"]
            async for _ in r.content.iter_any():
                arrivals.append(time.monotonic() - start)
    assert arrivals[0] < 0.3
    assert arrivals[-1] > 0.85


async def test_stream_bytes_unchanged(gateway, upstream) -> None:
    """The client receives exactly the bytes the backend sent, [DONE] included."""
    upstream.script["/v1/chat/completions"] = stream_script(tokens=3)
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/chat/completions", data=CHAT) as r:
            events = await read_events(r)
    assert b"data: [DONE]" == events[-1]
    assert 3 + 1 + 1 + 1 == len(events)  # tokens, finish, usage, [DONE]


async def test_headers_reach_client_before_the_first_token(gateway, upstream) -> None:
    """Status and headers are relayed when the backend sends them, not with the first token."""
    upstream.script["/v1/chat/completions"] = stream_script(tokens=2, first_delay=1.0)
    async with aiohttp.ClientSession() as s:
        start = time.monotonic()
        async with s.post(gateway.url + "/v1/chat/completions", data=CHAT) as r:
            headers_after = time.monotonic() - start
            assert 200 == r.status
            await r.read()
            body_after = time.monotonic() - start
    assert headers_after < 0.5
    assert body_after >= 1.0


def raw_request(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


@pytest.mark.parametrize(
    ("phase", "script", "wait_s"),
    [
        ("before headers", stream_script(header_delay=10), 0.3),
        ("before the first token", stream_script(first_delay=10), 0.3),
        ("mid-stream", stream_script(tokens=100, gap=0.1), 0.35),
    ],
)
async def test_disconnect_aborts_upstream(gateway, upstream, phase, script, wait_s) -> None:
    """A client that disconnects in any phase closes the upstream request within moments."""
    upstream.script["/v1/chat/completions"] = script
    port = int(gateway.url.rsplit(":", 1)[1])
    sock = raw_request(port, CHAT)
    await wait_for(lambda: len(upstream.posts) == 1)
    await asyncio.sleep(wait_s)
    closed_at = time.monotonic()
    sock.close()
    await asyncio.wait_for(upstream.aborted.wait(), 2)
    took = upstream.last.aborted_at - closed_at
    assert took < 1.0, f"{phase}: upstream saw the close after {took:.3f} s"
    await wait_for(lambda: gateway.state.backends["gpu"].in_flight == 0)


async def test_disconnect_cancels_non_streaming(gateway, upstream) -> None:
    """A non-streaming request is cancelled upstream too when its client leaves."""
    upstream.script["/v1/chat/completions"] = slow_json_script(10)
    port = int(gateway.url.rsplit(":", 1)[1])
    sock = raw_request(port, b'{"model": "m"}')
    await wait_for(lambda: len(upstream.posts) == 1)
    sock.close()
    await asyncio.wait_for(upstream.aborted.wait(), 2)


async def test_deadline_before_first_byte_is_504(gateway, upstream) -> None:
    """OICM-Request-Timeout expiring before the backend answers gives 504 backend_timeout."""
    upstream.script["/v1/chat/completions"] = slow_json_script(5)
    async with aiohttp.ClientSession() as s:
        start = time.monotonic()
        async with s.post(
            gateway.url + "/v1/chat/completions",
            data=b'{"model": "m"}',
            headers={"OICM-Request-Timeout": "0.3"},
        ) as r:
            assert 504 == r.status
            body = orjson.loads(await r.read())
    assert "backend_timeout" == body["error"]["type"]
    assert time.monotonic() - start < 2
    await asyncio.wait_for(upstream.aborted.wait(), 2)


async def test_deadline_during_stream_ends_with_error_event(gateway, upstream) -> None:
    """A deadline that passes mid-stream ends it with one error event and no [DONE]."""
    upstream.script["/v1/chat/completions"] = stream_script(tokens=50, gap=0.05)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gateway.url + "/v1/chat/completions",
            data=CHAT,
            headers={"OICM-Request-Timeout": "0.4"},
        ) as r,
    ):
        assert 200 == r.status
        events = await read_events(r)
    assert events[-1].startswith(b"data: ")
    last = orjson.loads(events[-1][len(b"data: ") :])
    assert {"error"} == set(last)
    assert "backend_timeout" == last["error"]["type"]
    assert b"data: [DONE]" not in events
    assert 2 < len(events) < 50


async def test_idle_timeout_between_chunks(gateway_factory, upstream) -> None:
    """A stream silent for longer than timeouts.idle_s ends with a backend_timeout event."""
    gw = await gateway_factory(one_backend(upstream.url, extra="timeouts: {idle_s: 0.3}\n"))
    upstream.script["/v1/chat/completions"] = stream_script(tokens=3, gap=5)
    async with aiohttp.ClientSession() as s:
        start = time.monotonic()
        async with s.post(gw.url + "/v1/chat/completions", data=CHAT) as r:
            events = await read_events(r)
    assert time.monotonic() - start < 3
    assert b'"backend_timeout"' in events[-1]
    await asyncio.wait_for(upstream.aborted.wait(), 2)


async def test_backend_cut_mid_stream_ends_with_unreachable_event(gateway, upstream) -> None:
    """A backend that dies mid-stream gives one backend_unreachable event and no [DONE]."""
    upstream.script["/v1/chat/completions"] = stream_script(tokens=5, cut_after=2)
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/chat/completions", data=CHAT) as r:
            events = await read_events(r)
    last = orjson.loads(events[-1][len(b"data: ") :])
    assert "backend_unreachable" == last["error"]["type"]
    assert {"type", "message"} == set(last["error"])
    assert b"data: [DONE]" not in events
    assert 3 == len(events)


def dechunk(data: bytes) -> bytes:
    """The payload of a chunked body (no extensions, no trailers)."""
    out, at = bytearray(), 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


async def test_slow_client_gets_every_byte_in_order(gateway, upstream) -> None:
    """A client slower than the backend gets the whole stream, in order, nothing lost."""
    from aiohttp import web

    events = [b"data: " + (b"%05d" % i) * 2000 + b"\n\n" for i in range(1200)]  # ~12 MB
    body = b"".join(events)

    async def fast(request, rec):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.content_length = len(body)
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    upstream.script["/v1/chat/completions"] = fast
    port = int(gateway.url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a small window
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(CHAT)}\r\n\r\n"
    await loop.sock_sendall(sock, head.encode() + CHAT)
    received = bytearray()
    try:
        async with asyncio.timeout(60):
            while True:
                piece = await loop.sock_recv(sock, 16 * 1024)
                assert piece, "the gateway closed the connection early"
                received += piece
                await asyncio.sleep(0.0005)  # a slow reader: the gateway must pause the backend
                if received.endswith(b"\r\n0\r\n\r\n"):
                    break
    finally:
        sock.close()
    head_bytes, chunked = bytes(received).split(b"\r\n\r\n", 1)
    # An event stream goes out chunked, even when the backend announced its length.
    assert b"transfer-encoding: chunked" in head_bytes.lower()
    assert body == dechunk(chunked)
    await wait_for(lambda: gateway.state.backends["gpu"].in_flight == 0)
