"""One upstream HTTP/1.1 connection: an asyncio protocol around llhttp (httptools).

A connection carries one request at a time and is in exactly one `State`. It is reusable
only when its answer ended cleanly by its own framing with nothing after it on the socket:
any byte that arrives when no answer is expected closes it, so no byte of one answer can
become part of another. It does not know its pool: it calls the `Owner` handed to it.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Protocol, cast

import httptools

from proxy.errors import BackendUnreachable
from proxy.upstream.response import Response

# A backend's response head (interim 1xx heads included) may not exceed these.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100


class State(enum.Enum):
    """Where a connection is in its request/answer cycle."""

    IDLE = "idle"  # no answer expected: reusable; a byte arriving now closes it
    WAITING = "waiting"  # request written, not a byte of the answer yet (the stale-retry window)
    HEAD = "head"  # answer bytes arriving, the final head not complete (1xx heads skipped)
    BODY = "body"  # final head in; the body is framed by Content-Length or chunks
    UNTIL_CLOSE = "until close"  # final head in; the body ends when the backend closes
    CLOSED = "closed"


class Owner(Protocol):
    """What a connection tells its pool."""

    def put(self, conn: Connection) -> None:
        """The connection finished an answer cleanly and may carry another."""

    def forget(self, conn: Connection) -> None:
        """The connection is closed."""


class ConnectionClosed(Exception):
    """The backend closed the connection before the response head was complete."""

    def __init__(self, stale: bool) -> None:
        super().__init__("backend closed the connection before answering")
        self.stale = stale  # a reused connection, and not a byte of an answer: safe to retry


class _Halt(Exception):
    """Raised in a parser callback to stop parsing the rest of a read (the connection has
    already been closed, and whoever waits on it told why)."""


class Connection(asyncio.Protocol):
    """One upstream TCP connection and its HTTP/1.1 response parser."""

    __slots__ = (
        "_head_only",
        "_head_room",
        "_headers_left",
        "head",
        "loop",
        "owner",
        "parser",
        "paused",
        "requests",
        "response",
        "state",
        "transport",
    )

    def __init__(self, owner: Owner, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = State.IDLE
        self.paused = False  # reading paused for a slow client (flow control, not state)
        self.response: Response | None = None
        self.head: asyncio.Future[Response] | None = None
        self.requests = 0  # requests sent on this connection, this one included
        self._head_only = False  # the request is a HEAD: its answer has no body
        self._head_room = MAX_HEAD_BYTES
        self._headers_left = MAX_HEADERS

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is not State.BODY and state is not State.UNTIL_CLOSE:
            self._head_received(data)
            return
        response = self.response
        try:  # the hot path: one feed per read, and what it parsed handed on in one piece
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)
        if response is not None:
            response.flush()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        if state is State.UNTIL_CLOSE and exc is None and self.response is not None:
            self.response.finish()  # the close is this answer's end: complete
            self._close(None)
        elif state is State.WAITING or state is State.HEAD:
            self._close(ConnectionClosed(self.requests > 1 and state is State.WAITING))
        else:
            self._close(BackendUnreachable("backend cut the response short"))
        self.response = self.head = None  # no cycle outlives the socket

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.state is not State.HEAD:
            # A second answer after the one asked for (an extra response, a Content-Length
            # too short): never parsed, never pooled.
            self._close(None)
            raise _Halt

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers_left -= 1
        if self._headers_left < 0:
            self._refuse(f"backend sent more than {MAX_HEADERS} headers")
        if self.state is State.HEAD:  # trailers (in BODY) are dropped: the head went out
            assert self.response is not None
            self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        self._headers_left = MAX_HEADERS  # a budget for the next head, or the trailers
        if status == 101:
            self._refuse("backend switched protocols (101), which the gateway does not relay")
        if status < 200:
            response.headers.clear()  # an interim answer (RFC 9110 15.2): skipped
            return
        response.status = status
        if self._head_only:
            # A HEAD answer announces a body it does not carry; the parser cannot know that,
            # so the answer ends here and the connection is not reused.
            response.finish()
            self._close(None)
            raise _Halt
        if not self.parser.should_keep_alive() and self._until_close(response):
            self.state = State.UNTIL_CLOSE
        else:
            self.state = State.BODY

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response.feed(body)

    def on_message_complete(self) -> None:
        if self.state is State.HEAD:
            return  # an interim answer ended; the final one follows
        response = self.response
        assert response is not None and self.transport is not None
        response.finish()
        if self.parser.should_keep_alive() and not self.transport.get_write_buffer_size():
            self.state = State.IDLE
        else:
            # The backend will close, or answered before it had the whole request body
            # (which it may yet read as a request): not reusable.
            self._close(None)

    # used by the pool and the response
    def send(self, data: list[bytes], *, head_only: bool = False) -> asyncio.Future[Response]:
        """Write one request; the returned future resolves when the response head is in.

        `head_only`: the request is a HEAD, whose answer has no body whatever its headers say.
        """
        self.head = head = self.loop.create_future()
        if self.state is not State.IDLE or self.transport is None:
            head.set_exception(ConnectionClosed(True))  # closed in the pool: nothing went out
            return head
        self.state = State.WAITING
        self.requests += 1
        self._head_only = head_only
        self._head_room = MAX_HEAD_BYTES
        self._headers_left = MAX_HEADERS
        self.response = Response(self)
        self.transport.writelines(data)
        return head

    def finished(self, response: Response) -> None:
        if response is self.response and self.state is State.IDLE:
            self.response = self.head = None
            self.owner.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Close the connection at once; whoever waits on its answer gets BackendUnreachable."""
        self._close(BackendUnreachable("the connection to the backend was closed"))
        self.response = self.head = None  # the caller keeps its own reference

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and self.state is not State.CLOSED:
            self.paused = False
            self.transport.resume_reading()

    # internals
    def _head_received(self, data: bytes) -> None:
        """A read while no final head is in: bytes nobody asked for close the connection; a
        head is parsed only up to MAX_HEAD_BYTES (so the parser's work stays bounded)."""
        if self.state is State.WAITING:
            self.state = State.HEAD
        elif self.state is not State.HEAD:
            self._close(None)  # IDLE: a byte no request asked for (or CLOSED already)
            return
        room = self._head_room
        piece: bytes | memoryview = data
        rest = None
        if len(data) > room:
            view = memoryview(data)
            piece, rest = view[:room], view[room:]
        self._head_room = room - len(piece)
        try:
            self.parser.feed_data(piece)
            if rest is not None and self.state is State.HEAD:
                kib = MAX_HEAD_BYTES // 1024
                self._close(BackendUnreachable(f"backend sent a response head over {kib} KiB"))
            elif rest is not None and self.state is not State.CLOSED:
                self.parser.feed_data(rest)  # the body that came with the head
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)
        head, response = self.head, self.response
        if head is not None and response is not None and response.status and not head.done():
            head.set_result(response)  # the final head is in, and all read with it parsed

    def _parse_failed(self, exc: Exception) -> None:
        if self.state is not State.CLOSED:  # else a callback closed it and said why (_Halt)
            self._close(BackendUnreachable(f"backend sent malformed HTTP ({exc})"))

    def _refuse(self, reason: str) -> None:
        """Fail the exchange with `reason`, close, and stop parsing (in a callback)."""
        self._close(BackendUnreachable(reason))
        raise _Halt

    def _until_close(self, response: Response) -> bool:
        """Whether the body is delimited by the connection closing (RFC 9112 6.3): a final
        answer with a body, neither chunked nor with a Content-Length."""
        if response.status in (204, 304):
            return False
        coding = response.header(b"transfer-encoding")
        if coding is not None:
            return not coding.rstrip().lower().endswith(b"chunked")
        return response.header(b"content-length") is None

    def _close(self, error: BaseException | None) -> None:
        """The one way a connection closes. `error`, if any, goes to whoever waits on the
        head or the body (a body that already ended keeps its end)."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        if self.transport is not None:
            self.transport.abort()
        if error is not None:
            head, response = self.head, self.response
            if head is not None and not head.done():
                head.set_exception(error)
            elif response is not None:
                if isinstance(error, ConnectionClosed):
                    error = BackendUnreachable(str(error))
                response.finish(error)
        self.owner.forget(self)
