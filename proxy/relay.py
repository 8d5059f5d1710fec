"""Relaying a backend's answer: status and headers, then each chunk the moment it arrives."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from proxy.deadlines import Deadlines
from proxy.errors import ProxyError, sse_error
from proxy.exchange import Exchange
from proxy.headers import downstream_headers, is_event_stream
from proxy.stream_usage import USAGE_KEY, WHOLE_EVENTS, UsageFilter
from proxy.upstream import Response
from proxy.usage import (
    CR,
    TAIL_BYTES,
    ends_event,
    ends_stream,
    events_after,
    opening_prompt,
    stream_usage,
    usage_in,
)

# Bytes waiting for a slow client before the backend is paused, and resumed.
_CLIENT_HIGH_WATER = 256 * 1024
_CLIENT_LOW_WATER = 64 * 1024


async def start(
    request: web.Request, upstream: Response, ex: Exchange
) -> tuple[web.StreamResponse, bool]:
    """Send the backend's status and headers (minus hop-by-hop ones) to the client.

    A plain body that arrived whole with its head goes out with it, in one write: the
    second result is True when the response is complete already.
    """
    headers = downstream_headers(upstream.headers, request_id=ex.request_id)
    ex.status = upstream.status
    ex.sse = is_event_stream(headers.get("Content-Type", ""))
    whole = None if ex.sse else upstream.whole_body()
    if whole is not None:
        ex.first_byte_at = time.perf_counter()
        ex.bytes_out += len(whole)
        ex.usage = usage_in(whole[-TAIL_BYTES:])
        return web.Response(status=upstream.status, headers=headers, body=whole), True
    response = web.StreamResponse(status=upstream.status, headers=headers)
    length = upstream.header(b"content-length")
    if length is not None and length.isdigit() and not ex.sse:
        # An event stream goes out chunked whatever its length: a stream that fails must
        # still be able to end with its error event.
        response.content_length = int(length)
    await response.prepare(request)
    if not upstream.has_body_bytes():
        # aiohttp holds the head back until the first body write; send it now, as the
        # backend did, so a client waiting for the first token already has status and headers.
        await response.write(b"")
    return response, False


class _Sink:
    """Writes each piece of the backend's body to the client the moment it arrives.

    Called from the upstream protocol's callback, so a streamed token costs no task switch:
    one read from the backend, one write to the client. It keeps the tallies (bytes, SSE
    events, the tail where `usage` is found) and asks the relay task for help only when the
    client falls behind or goes away. With a `filter` (a stream whose usage the gateway asked
    for), the usage-only event is taken out on the way (`UsageFilter`); every other byte goes
    out as it arrives.
    """

    __slots__ = (
        "before_last",
        "chunked",
        "clock",
        "events",
        "filter",
        "first_at",
        "first_loop_at",
        "gone",
        "last",
        "last_at",
        "nbytes",
        "opening",
        "paused",
        "sse",
        "tail",
        "transport",
        "upstream",
    )

    def __init__(
        self,
        upstream: Response,
        transport: asyncio.Transport,
        chunked: bool,
        sse: bool,
        usage: UsageFilter | None = None,
    ) -> None:
        self.upstream = upstream
        self.transport = transport
        self.chunked = chunked
        self.sse = sse
        self.filter = usage
        self.clock = asyncio.get_running_loop().time
        self.last_at = self.clock()
        self.first_at: float | None = None
        self.first_loop_at = 0.0
        self.events = self.nbytes = 0
        # `tail`: the last two bytes relayed, kept only while the last piece was shorter
        # than that (else they are `last`'s own)
        self.tail = self.before_last = self.last = b""
        self.opening: int | None = None  # the prompt's count in the first piece's `usage`
        self.gone = self.paused = False

    def account(self, data: bytes) -> None:
        """Tally a piece of the body on its way to the client."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.first_loop_at = self.clock()
            if self.sse:
                self.opening = opening_prompt(data)
        self.nbytes += len(data)
        if self.sse:
            if CR in data or data[:1] == b"\n" or len(data) < 2:  # a terminator may straddle
                last = self.last
                counted, self.tail = events_after(last[-2:] if len(last) > 1 else self.tail, data)
                self.events += counted
            else:  # the usual case: LF framing, and this piece cannot end a cut terminator
                first_lf = data.find(10)  # a memchr: one event of one line is the usual read
                if first_lf == len(data) - 2:
                    self.events += data[-1] == 10
                elif first_lf >= 0:
                    self.events += data.count(b"\n\n")
        self.before_last, self.last = self.last, data
        self.last_at = self.clock()

    def __call__(self, data: bytes) -> None:
        usage = self.filter
        # The filter's own first test, made here to spare a call for nearly every read.
        if usage is not None and (
            usage.held
            or usage.passing
            or data.find(USAGE_KEY) >= 0  # (`in` with a bytes operand costs more)
            or not data.endswith(WHOLE_EVENTS)
        ):
            data = usage.feed(data)
            if not data:  # held back (the start of what may be the usage event)
                self.last_at = self.clock()  # the backend is alive all the same
                return
        transport = self.transport
        if transport.is_closing():
            self.gone = True
            self.upstream.pause_reading()
            self.upstream.wake()
            return
        self.account(data)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if transport.get_write_buffer_size() > _CLIENT_HIGH_WATER:
            self.paused = True
            self.upstream.pause_reading()
            self.upstream.wake()

    def write_rest(self, data: bytes) -> None:
        """Send what is left once the backend's body has ended (no backend to pause)."""
        if data and not self.transport.is_closing():
            self.account(data)
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)


async def pump(
    request: web.Request,
    upstream: Response,
    response: web.StreamResponse,
    ex: Exchange,
    deadline: float,
    idle_s: float,
    deadlines: Deadlines,
) -> bool:
    """Relay the body as it arrives; True when it ended, False when the client went away.

    A TimeoutError is raised at the request's deadline or after `idle_s` without a piece of
    the body; the task wakes only for those checks (on the shared timer of `deadlines`), for
    the end, and for a slow client.
    """
    transport = request.transport
    if transport is None:
        ex.client_gone = True
        return False
    # aiohttp frames the body in chunks exactly when it announced so in the head it sent.
    chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
    # Both heads are on their way (`start` prepared the response, which serialized its
    # head): neither the backend's header list nor the response's multidict, with their
    # names and values, is held for the stream's life.
    response.headers.clear()
    upstream.headers.clear()
    usage = UsageFilter() if ex.sse and ex.strip_usage else None
    sink = _Sink(upstream, transport, chunked, ex.sse, usage)
    early = upstream.divert(sink)
    try:
        if early:  # arrived before the head went out: aiohttp sends both together
            if usage is not None:
                early = usage.feed(early)
            if early:
                sink.account(early)
            await response.write(early)  # b"": the head alone
        del early  # this frame lives as long as the stream: it does not hold the first piece
        while not upstream.done:
            alarm = deadlines.wake_at(min(deadline, sink.last_at + idle_s), upstream.wake)
            try:
                await upstream.wait()
            finally:
                deadlines.drop(alarm)
            if sink.gone:
                ex.client_gone = True
                return False
            if sink.paused:
                await _drained(sink.transport)
                sink.paused = False
                upstream.resume_reading()
            elif not upstream.done and sink.clock() >= min(deadline, sink.last_at + idle_s):
                raise TimeoutError
    finally:
        upstream.undivert()
        if usage is not None:
            held = usage.end()  # an unfinished event the body's end (or a cut) left
            if not sink.gone:
                sink.write_rest(held)
        if sink.first_at is not None and ex.first_byte_at is None:
            ex.first_byte_at = sink.first_at
        ex.bytes_out += sink.nbytes
        ex.events += sink.events
        if sink.events > 1:
            ex.event_gap = (sink.last_at - sink.first_loop_at) / (sink.events - 1)
        tail = sink.before_last[-TAIL_BYTES:] + sink.last[-TAIL_BYTES:]
        taken = usage.usage if usage is not None else b""
        ex.usage = stream_usage(sink.opening, taken or tail) if ex.sse else usage_in(tail)
        ex.stream_complete = ex.sse and ends_stream(tail)
        ex.open_event = ex.sse and bool(tail) and not ends_event(tail)
    return await finish(response, ex)


async def finish(response: web.StreamResponse, ex: Exchange) -> bool:
    """End a streamed response; False when the client is already gone."""
    try:
        await response.write_eof()
    except ConnectionError:
        ex.client_gone = True
        return False
    return True


async def _drained(transport: asyncio.Transport) -> None:
    """Until the client has taken most of what waits for it (or is gone)."""
    delay = 0.001
    while transport.get_write_buffer_size() > _CLIENT_LOW_WATER and not transport.is_closing():
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def end_with_error(
    request: web.Request, response: web.StreamResponse, err: ProxyError, ex: Exchange
) -> None:
    """A stream that broke after it began: one last error event, or a cut connection."""
    ex.error_type = ex.stream_error = err.type
    if ex.sse:
        # A stream cut inside an event gets that event closed first, so the error event
        # parses as one of its own.
        close_event = b"\n\n" if ex.open_event else b""
        try:
            await response.write(close_event + sse_error(err, ex.dialect))
            await response.write_eof()
        except ConnectionError:
            ex.client_gone = True
        return
    # A plain body cannot carry an error: cut the connection so the client sees it short.
    if request.transport is not None:
        request.transport.abort()
