"""The aiohttp floor: the thinnest pass-through aiohttp and the gateway's upstream client make.

    python -m bench.floor --backend http://127.0.0.1:8001 --port 8090

aiohttp's low-level `web.Server` (no Application, router, middleware, metrics or access log)
with one handler: every request, whatever its path, goes to the one backend on the gateway's
own HTTP/1.1 client (`proxy.upstream`), and the answer comes back as it arrives. A body that
came whole with its head goes out in one write; any other is handed from the upstream
protocol's callback straight to the client's transport, one chunk per read, as the gateway's
relay does. Nothing else: no auth, no routing, no deadline but a fixed bound, no usage
accounting. The benchmark runs it beside the gateway (`bench.run`'s `floor` path) so every
gateway figure has the cost of aiohttp and the upstream client alone to stand against.

A backend that cannot be reached answers 502, one that breaks mid-stream cuts the client's
connection (its body is short, as it would be from the backend), and a client that hangs up
closes the upstream connection at once (the handler is cancelled), so the backend stops.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from urllib.parse import urlsplit

import uvloop
from aiohttp import web
from multidict import CIMultiDict

from proxy.config import BackendConfig
from proxy.errors import BackendUnreachable, envelope
from proxy.upstream import Backend, Response, send

# Request headers that are the client's hop or the upstream leg's own (it adds Host and
# Content-Length); answer headers that are the backend's hop or aiohttp's framing.
HOP = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
NOT_UPSTREAM = HOP | {b"host", b"content-length", b"expect"}
NOT_DOWNSTREAM = HOP | {b"content-length"}
BOUND_S = 600.0  # no request lives longer (bench streams last seconds)
CONNECT_S = 10.0
HIGH_WATER = 256 * 1024  # bytes waiting for a slow client before the backend is paused
LOW_WATER = 64 * 1024


def upstream_lines(raw: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """The client's header lines the backend gets (each ending in CRLF)."""
    return b"".join(n + b": " + v + b"\r\n" for n, v in raw if n.lower() not in NOT_UPSTREAM)


def downstream_headers(raw: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The backend's answer headers the client gets."""
    return CIMultiDict(
        (n.decode("latin-1"), v.decode("latin-1"))
        for n, v in raw
        if n.lower() not in NOT_DOWNSTREAM
    )


class Sink:
    """Writes each piece of the backend's body to the client as a chunk, in the upstream
    protocol's callback; asks the handler for help only when the client is slow or gone."""

    __slots__ = ("chunked", "gone", "paused", "transport", "upstream")

    def __init__(self, upstream: Response, transport: asyncio.Transport, chunked: bool) -> None:
        self.upstream = upstream
        self.transport = transport
        self.chunked = chunked  # False for an HTTP/1.0 client: its body ends with the connection
        self.gone = self.paused = False

    def __call__(self, data: bytes) -> None:
        transport = self.transport
        if transport.is_closing():
            self.gone = True
        else:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
            if transport.get_write_buffer_size() <= HIGH_WATER:
                return
            self.paused = True
        self.upstream.pause_reading()
        self.upstream.wake()


class Floor:
    """The handler: one backend, every request forwarded to it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read() if request.body_exists else None
        path, _, query = request.raw_path.partition("?")
        try:
            upstream = await send(
                self.backend,
                request.method,
                self.backend.target(path, query),
                upstream_lines(request.raw_headers),
                body,
            )
        except BackendUnreachable as err:
            return web.Response(
                status=err.status, body=envelope(err), content_type="application/json"
            )
        try:
            response = await self._relay(request, upstream)
        except BaseException:
            upstream.close()  # cancelled (the client left) or broken: the backend must stop
            raise
        if upstream.done:
            upstream.release()
        else:
            upstream.close()
        return response

    async def _relay(self, request: web.BaseRequest, upstream: Response) -> web.StreamResponse:
        headers = downstream_headers(upstream.headers)
        whole = upstream.whole_body()
        if whole is not None:
            return web.Response(status=upstream.status, headers=headers, body=whole)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)  # chunked for HTTP/1.1: no length is set
        await response.write(b"")  # aiohttp holds the head back until the first write
        transport = request.transport
        if transport is None:
            return response
        chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        sink = Sink(upstream, transport, chunked)
        rest = upstream.divert(sink)  # what arrived since the head
        loop = asyncio.get_running_loop()
        until = loop.time() + BOUND_S
        bound = loop.call_at(until, upstream.wake)  # one for the stream
        try:
            if rest:
                sink(rest)
            while not upstream.done and not sink.gone:
                if loop.time() >= until:  # also when it rang during `drained`
                    transport.abort()
                    return response
                await upstream.wait()
                if sink.paused:
                    await drained(transport)
                    sink.paused = False
                    upstream.resume_reading()
        except BackendUnreachable:
            transport.abort()  # broken mid-stream: the client sees its body cut short
            return response
        finally:
            bound.cancel()
            upstream.undivert()
        if not sink.gone:
            await response.write_eof()
        return response


async def drained(transport: asyncio.Transport) -> None:
    """Until the client has taken most of what waits for it (or is gone)."""
    delay = 0.001
    while transport.get_write_buffer_size() > LOW_WATER and not transport.is_closing():
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


class Running:
    """A floor listening on its socket, and how it stops."""

    def __init__(self, server: web.Server, listener: asyncio.Server, backend: Backend) -> None:
        self.server = server
        self.listener = listener
        self.backend = backend

    @property
    def port(self) -> int:
        return int(self.listener.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.listener.close()
        await self.server.shutdown(1.0)
        self.backend.close()


async def start_floor(backend_url: str, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Listen on host:port (0: any free port) on the running loop, forwarding to the backend."""
    parts = urlsplit(backend_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the backend must be an http(s) URL, not {backend_url!r}")
    backend = Backend("floor", BackendConfig(url=backend_url), None, CONNECT_S)
    server = web.Server(Floor(backend), handler_cancellation=True, access_log=None)
    listener = await asyncio.get_running_loop().create_server(server, host, port, backlog=4096)
    return Running(server, listener, backend)


async def serve(backend_url: str, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    running = await start_floor(backend_url, host, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        await running.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", required=True, help="the backend's base URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.backend, args.host, args.port))


if __name__ == "__main__":
    main()
