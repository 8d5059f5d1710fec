"""Pooled upstream connections: reused, and one retry when the backend closed a stale one."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from tests.conftest import one_backend

OK = b'{"ok": true}'


class RawBackend:
    """A raw HTTP/1.1 server that closes a connection, unanswered, when its request number
    `close_at` (0-based) arrives: 1 is the stale keep-alive race seen from the gateway,
    0 a backend that dies on a fresh connection."""

    def __init__(self, close_at: int | None) -> None:
        self.close_at = close_at
        self.connections = 0
        self.answered = 0
        self.posts = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for n in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"POST"):
                    self.posts += 1
                if n == self.close_at:
                    break  # the keep-alive timer fired just as this request arrived
                _, _, rest = head.lower().partition(b"content-length:")
                await reader.readexactly(int(rest.split(b"\r\n")[0] or b"0"))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(OK)}\r\n\r\n".encode()
                    + OK
                )
                await writer.drain()
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def post(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", data=b'{"model": "m"}') as r:
            return r.status, orjson.loads(await r.read())


async def test_stale_pooled_connection_is_retried_once(gateway_factory) -> None:
    """A pooled connection the backend closed is retried on a new one; the client sees a 200."""
    backend = RawBackend(close_at=1)
    url = await backend.start()
    gw = await gateway_factory(one_backend(url, extra="health: {interval_s: 3600}\n"))
    try:
        await asyncio.sleep(0.1)  # the start-up health probe has its own connection
        answered = backend.answered
        for _ in range(3):
            assert (200, {"ok": True}) == await post(gw.url)
        assert 3 == backend.answered - answered
        # every POST first meets the connection its predecessor used, closed now: 3 stale + 3 retried
        assert 6 == backend.posts
    finally:
        await backend.close()


async def test_connections_are_reused(gateway_factory) -> None:
    """Consecutive requests share one upstream connection while it stays open."""
    backend = RawBackend(close_at=None)
    url = await backend.start()
    gw = await gateway_factory(one_backend(url, extra="health: {interval_s: 3600}\n"))
    try:
        await asyncio.sleep(0.1)  # let the first health probe finish on its own connection
        before = backend.connections
        assert 200 == (await post(gw.url))[0]
        assert 200 == (await post(gw.url))[0]
        assert backend.connections - before <= 1
    finally:
        await backend.close()


async def test_fresh_connection_closed_is_not_retried(gateway_factory) -> None:
    """A backend that closes a new connection may have seen the request: 502, no retry."""
    backend = RawBackend(close_at=0)
    url = await backend.start()
    gw = await gateway_factory(one_backend(url, extra="health: {interval_s: 3600}\n"))
    try:
        status, body = await post(gw.url)
        assert (502, "backend_unreachable") == (status, body["error"]["type"])
        assert 1 == backend.posts
    finally:
        await backend.close()


async def test_head_request_does_not_wait_for_a_body(gateway_factory, upstream) -> None:
    """A HEAD through the endpoint proxy ends at the head, though it announces a body."""
    models = "models:\n  ep: {targets: [{backend: gpu}]}\n"
    gw = await gateway_factory(one_backend(upstream.url, models=models))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.head(
                gw.url + "/models/ep/proxy/schema", timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                assert 200 == r.status
    assert ["HEAD", "HEAD"] == [r.method for r in upstream.posts]
