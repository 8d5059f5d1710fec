"""What a client without a key can hold open: head and body timeouts, keep-alive idle time,
the connection cap, and bodies announced too large (real sockets, raw clients)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import pytest

from tests.conftest import one_backend, wait_for
from tests.fakes import stream_script

CHAT = b'{"model": "m", "messages": []}'


def limits(url: str, **server: object) -> str:
    keys = ", ".join(f"{k}: {v}" for k, v in server.items())
    return one_backend(url, extra=f"server: {{{keys}}}\n")


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def closed_within(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """Everything the gateway sends until it closes the connection (fails if it does not)."""
    async with asyncio.timeout(within_s):
        return await reader.read()


async def health_ms(url: str) -> float:
    """How long GET /health takes, in ms (it must answer 200)."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
        assert 200 == r.status
    return (time.monotonic() - started) * 1000


async def test_slow_head_is_closed_after_the_header_timeout(gateway_factory, upstream) -> None:
    """A connection that sends its head a byte at a time is closed at server.header_timeout_s,
    and other clients are served meanwhile."""
    gw = await gateway_factory(limits(upstream.url, header_timeout_s=0.5))
    reader, writer = await connect(gw.url)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    started = time.monotonic()

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    try:
        assert await health_ms(gw.url) < 1000
        assert b"" == await closed_within(reader, 3)
    finally:
        task.cancel()
        writer.close()
    assert time.monotonic() - started < 2.5


async def test_a_request_head_in_time_is_served(gateway_factory, upstream) -> None:
    """The head timeout stops once a head is in: a slow answer is not cut by it."""
    gw = await gateway_factory(limits(upstream.url, header_timeout_s=0.3))
    upstream.script["/v1/chat/completions"] = stream_script(tokens=3, first_delay=0.6)
    async with aiohttp.ClientSession() as s:
        body = b'{"model": "m", "stream": true}'
        async with s.post(gw.url + "/v1/chat/completions", data=body) as r:
            assert b"data: [DONE]" in await r.read()


async def test_idle_keepalive_connection_is_closed(gateway_factory, upstream) -> None:
    """A kept-alive connection with no next request is closed after server.keepalive_s."""
    gw = await gateway_factory(limits(upstream.url, keepalive_s=0.5))
    reader, writer = await connect(gw.url)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await reader.readuntil(b'{"status":"ok"}')
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"" == await closed_within(reader, 3)
    writer.close()


@pytest.mark.parametrize(
    ("server", "headers"),
    [({"body_timeout_s": 0.5}, b""), ({}, b"OICM-Request-Timeout: 0.5\r\n")],
)
async def test_trickling_body_is_a_408(gateway_factory, upstream, server, headers) -> None:
    """A body that does not arrive by server.body_timeout_s (or the request's deadline,
    whichever is first) is a 408 request_timeout, and the connection is closed."""
    gw = await gateway_factory(limits(upstream.url, **server) if server else limits(upstream.url))
    reader, writer = await connect(gw.url)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        + headers
        + b"\r\n{"
    )

    async def trickle() -> None:
        for _ in range(100):
            await asyncio.sleep(0.2)
            writer.write(b" ")

    task = asyncio.create_task(trickle())
    try:
        started = time.monotonic()
        answer = await closed_within(reader, 5)
    finally:
        task.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"type":"request_timeout"' in answer
    assert time.monotonic() - started < 3
    assert [] == upstream.posts


async def test_huge_content_length_is_refused_at_once(gateway_factory, upstream) -> None:
    """A Content-Length of 1 TiB is a 413 before any of the body is read, and the
    connection is closed."""
    gw = await gateway_factory(limits(upstream.url))
    reader, writer = await connect(gw.url)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(1 << 40).encode()
        + b"\r\n\r\n{"
    )
    answer = await closed_within(reader, 3)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"type":"payload_too_large"' in answer
    assert [] == upstream.posts


async def test_at_the_cap_idle_connections_make_room(gateway_factory, upstream, caplog) -> None:
    """With server.max_connections held by idle and slow-header connections, a health probe
    still gets in (the longest-idle connection is closed for it) and the cap is logged."""
    gw = await gateway_factory(limits(upstream.url, max_connections=20))
    held = [await connect(gw.url) for _ in range(20)]
    for _, writer in held[:10]:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")  # never finished
    await wait_for(lambda: len(gw.serving.server.idle) == 20)
    with caplog.at_level(logging.WARNING, logger="proxy"):
        for _ in range(5):
            assert await health_ms(gw.url) < 1000
    assert "client connection cap reached (server.max_connections = 20)" in caplog.text
    closed = 0
    for reader, writer in held:
        with contextlib.suppress(TimeoutError):
            closed += b"" == await asyncio.wait_for(reader.read(), 0.2)
        writer.close()
    assert 1 == closed  # the first probe made room; the others found the slot it freed
    assert held[0][0].at_eof()  # the longest-idle connection was the one closed


async def test_at_the_cap_with_every_connection_busy_new_ones_are_refused(
    gateway_factory, upstream, caplog
) -> None:
    """When every connection has a request in progress, a new connection is closed at
    once (nobody else's request is cut), and that is logged."""
    gw = await gateway_factory(limits(upstream.url, max_connections=4))
    upstream.script["/v1/chat/completions"] = stream_script(tokens=50, gap=0.05)
    body = b'{"model": "m", "stream": true}'
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        streams = [await s.post(gw.url + "/v1/chat/completions", data=body) for _ in range(4)]
        with caplog.at_level(logging.WARNING, logger="proxy"):
            reader, writer = await connect(gw.url)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"" == await closed_within(reader, 2)
            writer.close()
        assert "every open one has a request in progress" in caplog.text
        for response in streams:
            assert b"data: [DONE]" in await response.read()
            response.release()
