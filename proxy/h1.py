"""A lean HTTP/1.1 client for the upstream leg: asyncio protocols, llhttp (httptools) parsing.

One `Connection` carries one request at a time; a `proxy.pool.Pool` keeps idle ones.
The response body is handed over in the pieces it arrived in (de-chunked), with reading
paused while the client is slower than the backend. Foreign errors become `ProxyError`s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from proxy.errors import BackendUnreachable

if TYPE_CHECKING:
    from proxy.pool import Pool

# Pause reading from the backend while this many body bytes wait for the client.
_HIGH_WATER = 256 * 1024


class Response:
    """A response head and its body as it arrives; read with `read_chunk()`."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_connection",
        "_done",
        "_error",
        "_sink",
        "_waiter",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], None] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call; b"" once the body is complete."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered > _HIGH_WATER:
            self._connection.resume()
        self._buffered = 0
        return data

    def divert(self, sink: Callable[[bytes], None]) -> bytes:
        """From now on hand each piece of the body to `sink` the moment it arrives (in the
        protocol callback: no task switch per piece). Returns what was buffered before."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._connection.resume()
        self._sink = sink
        return data

    def undivert(self) -> None:
        """Stop handing body pieces to the sink (and drop the reference cycle to it)."""
        self._sink = None

    async def wait(self, until: float) -> None:
        """Until the body ends or fails (which raises), `wake()` is called, or loop time `until`."""
        if self._error is not None:
            raise self._error
        if self._done:
            return
        loop = self._connection.loop
        self._waiter = waiter = loop.create_future()
        timer = loop.call_at(until, self.wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise self._error

    @property
    def done(self) -> bool:
        """Whether the body has been read to its end. A failed body is never done: its
        reader goes on to `wait()` or `read_chunk()`, which raise the failure."""
        return self._done and self._error is None

    def wake(self) -> None:
        """Return control to the task waiting in `wait()`."""
        self._wake()

    def pause_reading(self) -> None:
        """Stop reading from the backend (the client is slower than it)."""
        self._connection.pause()

    def resume_reading(self) -> None:
        self._connection.resume()

    def has_body_bytes(self) -> bool:
        """Whether body bytes are waiting to be read."""
        return bool(self._chunks)

    def whole_body(self) -> bytes | None:
        """The entire body if it has already arrived in full, else None (nothing consumed)."""
        if not self._done or self._error is not None:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read(self, limit: int = 16 * 1024 * 1024) -> bytes:
        """The whole body (for small control responses such as health checks)."""
        parts = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > limit:
                raise BackendUnreachable("backend sent a larger answer than expected")
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if it can be reused."""
        self._connection.finished(self)

    def close(self) -> None:
        """Abandon the response: the connection is closed, so the backend stops at once."""
        self._connection.abort()

    # Called by the connection's protocol callbacks.
    def _feed(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if error is not None and not self._done:
            self._error = error
        self._done = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One upstream TCP connection and its HTTP/1.1 response parser."""

    __slots__ = (
        "bodiless",
        "closed",
        "complete",
        "head",
        "idle_since",
        "keep_alive",
        "loop",
        "parser",
        "paused",
        "pool",
        "received",
        "requests",
        "response",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.head: asyncio.Future[Response] | None = None
        self.requests = 0  # requests sent on this connection, this one included
        self.received = False  # any byte of the current response has arrived
        self.complete = False  # the current response has been read to its end
        self.keep_alive = False
        self.closed = False
        self.idle_since = 0.0
        self.paused = False
        self.bodiless = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A head followed by garbage in the same read fails the head: the client gets a 502.
            self._fail(BackendUnreachable(f"backend sent malformed HTTP ({exc})"))
            self.abort()
            return
        head, response = self.head, self.response
        if head is not None and response is not None and response.status and not head.done():
            head.set_result(response)  # the head is in (status set), and all read with it parsed

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.complete:
            self._fail(ConnectionClosed(self.requests > 1 and not self.received))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None and self.head is not None
        response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.bodiless:
            # A HEAD answer announces a body it does not carry; the parser cannot know that,
            # so the response ends here and the connection is not reused.
            self.keep_alive = False
            self.complete = True
            response._finish()

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        self.complete = True
        if self.response is not None:
            self.response._finish()

    # used by the pool and the response
    def send(self, data: list[bytes], *, bodiless: bool = False) -> asyncio.Future[Response]:
        """Write one request; the returned future resolves when the response head is in.

        `bodiless`: the request is a HEAD, whose answer has no body whatever its headers say.
        """
        assert self.transport is not None
        self.bodiless = bodiless
        self.requests += 1
        self.received = False
        self.complete = False
        self.response = Response(self)
        self.head = self.loop.create_future()
        self.transport.writelines(data)
        return self.head

    def finished(self, response: Response) -> None:
        if response is self.response and self.complete and self.keep_alive and not self.closed:
            self.response = None
            self.head = None
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()
        self.closed = True
        if not self.complete:  # wake whoever still waits on this exchange
            self._fail(BackendUnreachable("the connection to the backend was closed"))
        self.response = None  # the caller keeps its own reference; no cycle outlives the socket
        self.pool.forget(self)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _fail(self, error: BaseException) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        elif self.response is not None:
            self.response._finish(BackendUnreachable("backend cut the response short"))


class ConnectionClosed(Exception):
    """The backend closed the connection before the response head was complete."""

    def __init__(self, stale: bool) -> None:
        super().__init__("backend closed the connection before answering")
        self.stale = stale  # a reused connection, and not a byte of an answer: safe to retry
