"""The listening socket and the guard on client connections: what a client without a key
can hold open, and for how long.

aiohttp's server keeps a connection that never completes a request head for as long as its
keep-alive timeout, and has no cap on connections. `GuardedServer` (aiohttp's low-level
server, told of every connection's birth and end) adds both:

- a head timeout: a new connection must complete its first request head within
  `server.header_timeout_s`, else it is closed (later requests on a kept-alive connection are
  bounded by `server.keepalive_s`, aiohttp's own idle timeout);
- a connection cap, `server.max_connections`: at the cap, the connection that has waited
  longest without a request in progress is closed to make room (so a flood of idle or
  slow-header connections cannot lock out a health probe); when every connection is busy
  with a request, the new one is refused. Either is logged, at most once a second;
- the answers aiohttp would make on its own never echo request bytes (a header value there
  may be a key): a request that does not parse gets the gateway's envelope from `malformed`
  (logged once a second at most, naming only the status), and `Expect` and a request line's
  HTTP version are taken out of aiohttp's hands (`ODDITIES`) so the gateway's
  middleware answers them, after authentication.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from ssl import SSLContext
from typing import Any, NamedTuple

from aiohttp import web
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.dispatch import dispatcher

logger = logging.getLogger("proxy")


class Oddities(NamedTuple):
    """What the request factory took out of a request's head for the middleware to decide
    on: its `Expect` value, and the HTTP version it named when that is over 1.1."""

    expect: str | None = None
    bad_version: str | None = None


# Set on every request (the usual value, `PLAIN`, is shared), so reading it never misses.
ODDITIES: web.RequestKey[Oddities] = web.RequestKey("oddities", Oddities)
PLAIN = Oddities()

_LOG_EVERY_S = 1.0
_DRAIN_LOG_EVERY_S = 1.0
_DRAIN_POLL_S = 0.05
_CUT_S = 0.5  # what is left after the drain: cancelled, and this long to wind down


class GuardedServer(web.Server):
    """aiohttp's server for the app a runner set up, with head timeouts and a connection cap."""

    def __init__(
        self,
        runner: web.AppRunner,
        *,
        header_timeout_s: float,
        max_connections: int,
        malformed: Callable[[int], web.StreamResponse],
        **handler_options: Any,
    ) -> None:
        app_server = runner.server
        assert app_server is not None, "runner.setup() first"
        make_request = app_server.request_factory

        def request_factory(message: RawRequestMessage, *args: Any) -> web.BaseRequest:
            expect = message.headers.get("Expect")
            version = message.version
            if expect is None and version <= HttpVersion11:
                request = make_request(message, *args)
                request[ODDITIES] = PLAIN
                return request
            message = message._replace(  # aiohttp would answer Expect itself, echoing it
                headers=CIMultiDictProxy(
                    CIMultiDict((k, v) for k, v in message.headers.items() if k != "Expect")
                ),
                raw_headers=tuple(h for h in message.raw_headers if h[0].lower() != b"expect"),
                version=min(version, HttpVersion11),  # and answer HTTP/2.0 in HTTP/1.1 framing
            )
            request = make_request(message, *args)
            bad = f"HTTP/{version.major}.{version.minor}" if version > HttpVersion11 else None
            request[ODDITIES] = Oddities(expect, bad)
            return request

        super().__init__(
            dispatcher(runner.app, app_server.request_handler),
            request_factory=request_factory,
            handler_cancellation=app_server.handler_cancellation,
            **handler_options,
        )
        self.handler_options = handler_options
        self.malformed = malformed
        self._malformed_since_log = 0
        self._malformed_logged_at = -_LOG_EVERY_S
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        # Open connections with no request in progress, oldest first: waiting for their
        # first head (with its timer) or idle between requests (None).
        self.idle: dict[RequestHandler, asyncio.TimerHandle | None] = {}
        self.busy: set[RequestHandler] = set()
        self.refused = self.evicted = 0
        self._logged_at = -_LOG_EVERY_S

    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(self, loop=asyncio.get_running_loop(), **self.handler_options)

    def log_malformed(self, status: int, exc: BaseException | None) -> None:
        """One line a second at most, whatever a flood of malformed requests holds, and
        never their bytes: only the status and the error's class."""
        self._malformed_since_log += 1
        now = time.monotonic()
        if now - self._malformed_logged_at >= _LOG_EVERY_S:
            logger.info(
                "refused %d malformed request(s) since the last such line (status %d, %s)",
                self._malformed_since_log,
                status,
                type(exc).__name__ if exc is not None else "no detail",
            )
            self._malformed_logged_at, self._malformed_since_log = now, 0

    # aiohttp calls these as each connection opens and closes.
    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self.idle) + len(self.busy) >= self.max_connections and not self._evict():
            self.refused += 1
            self._log_cap("refused a new connection: every open one has a request in progress")
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        self.idle[handler] = loop.call_later(self.header_timeout_s, self._head_timeout, handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        timer = self.idle.pop(handler, None)
        if timer is not None:
            timer.cancel()
        self.busy.discard(handler)

    # The gateway's middleware calls these around every request.
    def request_started(self, handler: object) -> None:
        """A request head arrived on this connection: it is busy, and its head timer stops."""
        if isinstance(handler, RequestHandler) and handler in self.idle:
            timer = self.idle.pop(handler)
            if timer is not None:
                timer.cancel()
            self.busy.add(handler)

    def request_finished(self, handler: object) -> None:
        """The request ended; its connection may wait for the next one (keep-alive)."""
        if isinstance(handler, RequestHandler) and handler in self.busy:
            self.busy.discard(handler)
            self.idle[handler] = None

    def _head_timeout(self, handler: RequestHandler) -> None:
        if self.idle.pop(handler, False) is not False:
            handler.force_close()

    def _evict(self) -> bool:
        """Close the connection that has waited longest with no request in progress."""
        for handler in self.idle:
            timer = self.idle.pop(handler)
            if timer is not None:
                timer.cancel()
            handler.force_close()
            self.evicted += 1
            self._log_cap("closed the longest-idle connection to make room for a new one")
            return True
        return False

    def _log_cap(self, action: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            logger.warning(
                "client connection cap reached (server.max_connections = %d): %s "
                "(so far %d refused, %d idle ones closed)",
                self.max_connections,
                action,
                self.refused,
                self.evicted,
            )


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler, whose own error answers are the gateway's."""

    __slots__ = ("server",)  # as aiohttp's own: no `__dict__` for each connection

    def __init__(self, server: GuardedServer, **options: Any) -> None:
        super().__init__(server, **options)
        self.server = server

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        """Nothing: the gateway's middleware writes the access log (aiohttp's is off)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request that failed before the gateway's middleware saw it (it did not parse):
        the gateway's envelope, and never the request's bytes, in the answer or the log."""
        self.server.log_malformed(status, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer is under way; the connection is closed instead")
        response = self.server.malformed(status)
        response.force_close()
        return response


async def listen(
    server: GuardedServer,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    ssl: SSLContext | None = None,
) -> asyncio.Server:
    """Open the listening socket; every connection goes through the guarded server.

    `reuse_port`: one of several workers' sockets on the same port (SO_REUSEPORT), among
    which the kernel spreads new connections.

    `ssl`: serve HTTPS. A connection must finish its TLS handshake within the head timeout
    (the loop's own timer closes it); its head timer starts once the handshake is done.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        server,
        host,
        port,
        backlog=4096,
        reuse_port=reuse_port or None,
        ssl=ssl,
        ssl_handshake_timeout=server.header_timeout_s if ssl is not None else None,
    )


async def close(listener: asyncio.Server, server: GuardedServer, drain_s: float) -> None:
    """Stop accepting, close idle connections, then let requests in flight finish for up to
    `drain_s` seconds, saying every second how many remain; what is left then is cut."""
    listener.close()
    await asyncio.sleep(0)  # requests that were arriving as the socket closed get handled
    server.pre_shutdown()
    now = time.monotonic()
    deadline, next_log = now + drain_s, now
    while server.busy and now < deadline:
        if now >= next_log:
            logger.info(
                "draining: %d request(s) in flight, up to %.0f s left",
                len(server.busy),
                deadline - now,
            )
            next_log = now + _DRAIN_LOG_EVERY_S
        await asyncio.sleep(_DRAIN_POLL_S)
        now = time.monotonic()
    if server.busy:
        logger.warning("drain time is up (server.drain_s): %d request(s) cut", len(server.busy))
    await server.shutdown(_CUT_S)
