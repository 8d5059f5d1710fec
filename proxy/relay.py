"""Relaying a backend's answer: status and headers, then each chunk the moment it arrives."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from proxy.errors import ProxyError, sse_error
from proxy.exchange import Exchange
from proxy.h1 import Response
from proxy.headers import downstream_headers, is_event_stream
from proxy.usage import TAIL_BYTES, count_events, usage_in

# The idle timer is re-armed at most this often (seconds): per-chunk work stays O(1).
_REARM_EVERY = 0.5


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
    if length is not None and length.isdigit():
        response.content_length = int(length)
    await response.prepare(request)
    if not upstream.has_body_bytes():
        # aiohttp holds the head back until the first body write; send it now, as the
        # backend did, so a client waiting for the first token already has status and headers.
        await response.write(b"")
    return response, False


async def pump(
    upstream: Response,
    response: web.StreamResponse,
    ex: Exchange,
    timer: asyncio.Timeout,
    deadline: float,
    idle_s: float,
) -> bool:
    """Copy the body chunk by chunk; True when it ended, False when the client went away.

    `timer` fires at the request's deadline or after `idle_s` without a chunk, whichever
    comes first; it is pushed forward as chunks arrive.
    """
    loop = asyncio.get_running_loop()
    armed = loop.time()
    timer.reschedule(min(deadline, armed + idle_s))
    sse = ex.sse
    read = upstream.read_chunk
    events = nbytes = 0
    tail = b""
    before_last = last = b""
    try:
        while chunk := await read():
            if ex.first_byte_at is None:
                ex.first_byte_at = time.perf_counter()
            nbytes += len(chunk)
            if sse:
                events += count_events(chunk, tail)
                tail = chunk[-2:]
            before_last, last = last, chunk
            try:
                await response.write(chunk)
            except ConnectionError:
                ex.client_gone = True
                return False
            now = loop.time()
            if now - armed > _REARM_EVERY:
                armed = now
                timer.reschedule(min(deadline, now + idle_s))
    finally:
        ex.bytes_out += nbytes
        ex.events += events
        ex.usage = usage_in(before_last[-TAIL_BYTES:] + last[-TAIL_BYTES:])
    try:
        await response.write_eof()
    except ConnectionError:
        ex.client_gone = True
        return False
    return True


async def end_with_error(
    request: web.Request, response: web.StreamResponse, err: ProxyError, ex: Exchange
) -> None:
    """A stream that broke after it began: one last error event, or a cut connection."""
    ex.error_type = err.type
    if ex.sse:
        try:
            await response.write(sse_error(err, ex.dialect))
            await response.write_eof()
        except ConnectionError:
            ex.client_gone = True
        return
    # A plain body cannot carry an error: cut the connection so the client sees it short.
    if request.transport is not None:
        request.transport.abort()
