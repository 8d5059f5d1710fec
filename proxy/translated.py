"""The translated path: a foreign protocol's request served by a chat-completions backend.

An `Adapter` (one per protocol, built from the pure translators in `proxy.translate`) turns
the client's request into a chat request for each target, and the backend's answer back:
whole for plain requests, event by event for streams. The byte-for-byte path never comes here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import orjson
from aiohttp import web

from proxy.chain import Call
from proxy.errors import (
    BackendTimeout,
    BackendUnreachable,
    Dialect,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProxyError,
    RateLimitExceeded,
    Unsupported,
)
from proxy.exchange import Exchange
from proxy.forward import HeadTimeout, UpstreamTry
from proxy.headers import REQUEST_ID
from proxy.relay import finish
from proxy.tracing import TRACE
from proxy.translate.chat_stream import ChatStreamParser
from proxy.upstream import Backend, Response
from proxy.usage import TAIL_BYTES, Usage, usage_in, usage_of

_MAX_ANSWER = 64 * 1024 * 1024
_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class StreamTranslator(Protocol):
    """Chat chunks in, the client protocol's event bytes out."""

    def feed(self, chunk: dict[str, object]) -> bytes: ...

    def finish(self) -> bytes: ...


class Adapter(Protocol):
    """How one client protocol maps onto chat completions for one request."""

    dialect: Dialect
    stream: bool
    upstream_path: str  # "/v1/chat/completions" (or "/v1/completions")
    heavy: bool  # chat_request() may take long (a template to render): run it off the loop

    def chat_request(self, upstream_model: str) -> dict[str, object]: ...

    def answer(self, chat: object) -> dict[str, object]: ...

    def stream_translator(self) -> StreamTranslator: ...

    def stream_failed(self, err: ProxyError) -> bytes: ...


async def exchange_translated(
    call: Call, backend: Backend, adapter: Adapter, body: bytes, may_retry: bool = False
) -> web.StreamResponse:
    """One backend, one try, with the translated `body`; closed upstream on every way out.

    With `may_retry`, a failure before any byte went out raises `Retry` (see `exchange`)."""
    request, state, ex, deadline = call.request, call.state, call.ex, call.deadline
    headers = (
        b"Content-Type: application/json\r\nAccept: */*\r\n"
        + b"X-Request-ID: "
        + ex.request_id.encode("latin-1")
        + b"\r\n"
    )
    if state.tracer is not None:
        headers += request[TRACE].upstream()
    target = backend.target(adapter.upstream_path)
    attempt = UpstreamTry(call, backend, may_retry)
    try:
        async with asyncio.timeout_at(deadline) as timer:
            upstream = await attempt.send("POST", target, headers, body)
            if not 200 <= upstream.status < 300:
                raise backend_error(upstream.status, await upstream.read(1024 * 1024))
            if not adapter.stream:
                attempt.response = await _answer(upstream, adapter, ex)
                attempt.complete = True
            else:
                attempt.response = response = web.StreamResponse(
                    headers={**_SSE_HEADERS, REQUEST_ID: ex.request_id}
                )
                ex.status, ex.sse = 200, True
                await response.prepare(request)
                attempt.complete = await _pump(
                    upstream, response, adapter, ex, timer, deadline, state.config.timeouts.idle_s
                )
    except (TimeoutError, HeadTimeout, BackendUnreachable) as exc:
        response, err = attempt.broken(exc)
        await _end_with_error(response, adapter, err, ex)
    finally:
        attempt.settle()
    assert attempt.response is not None
    return attempt.response


async def _answer(upstream: Response, adapter: Adapter, ex: Exchange) -> web.Response:
    raw = await upstream.read(_MAX_ANSWER)
    try:
        chat = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackendUnreachable("backend answered with something that is not JSON") from exc
    ex.first_byte_at = time.perf_counter()
    ex.usage = usage_in(raw[-TAIL_BYTES:])
    body = orjson.dumps(adapter.answer(chat))
    ex.status = 200
    ex.bytes_out = len(body)
    return web.Response(
        body=body, content_type="application/json", headers={REQUEST_ID: ex.request_id}
    )


async def _pump(
    upstream: Response,
    response: web.StreamResponse,
    adapter: Adapter,
    ex: Exchange,
    timer: asyncio.Timeout,
    deadline: float,
    idle_s: float,
) -> bool:
    """Parse the chat stream and write the translated events; False if the client left."""
    loop = asyncio.get_running_loop()
    parser = ChatStreamParser()
    translator = adapter.stream_translator()
    timer.reschedule(min(deadline, loop.time() + idle_s))
    before_last = last = b""
    first_write_at = last_write_at = 0.0
    done = False
    seen: Usage | None = None  # the last usage an event carried (the parser decoded each)
    try:
        while not done:
            chunk = await upstream.read_chunk()
            events = parser.feed(chunk) if chunk else parser.flush()
            if ex.first_byte_at is None:
                ex.first_byte_at = time.perf_counter()
            before_last, last = last, chunk or last
            out = []
            for event in events:
                if event is None:
                    done = True
                    break
                seen = usage_of(event) or seen
                out.append(translator.feed(event))
            if not chunk or done:
                out.append(translator.finish())
                done = True
            data = b"".join(out)
            if data:
                last_write_at = loop.time()
                if not ex.events:
                    first_write_at = last_write_at
                ex.events += 1
                ex.bytes_out += len(data)
                try:
                    await response.write(data)
                except ConnectionError:
                    ex.client_gone = True
                    return False
            ex.stream_complete = done  # the last event went out
            timer.reschedule(min(deadline, loop.time() + idle_s))
    finally:
        ex.usage = seen or usage_in(before_last[-TAIL_BYTES:] + last[-TAIL_BYTES:])
        if ex.events > 1:
            ex.event_gap = (last_write_at - first_write_at) / (ex.events - 1)
    return await finish(response, ex)


async def _end_with_error(
    response: web.StreamResponse, adapter: Adapter, err: ProxyError, ex: Exchange
) -> None:
    ex.error_type = ex.stream_error = err.type
    try:
        await response.write(adapter.stream_failed(err))
        await response.write_eof()
    except ConnectionError:
        ex.client_gone = True


def backend_error(status: int, body: bytes) -> ProxyError:
    """A backend's error answer as the gateway's error of the nearest type.

    A translated route speaks its own protocol, so the backend's body (in whatever shape its
    server uses) cannot pass through as is; its message does.
    """
    message = f"backend answered {status}: {_message_of(body)}"
    kinds: dict[int, type[ProxyError]] = {
        400: InvalidRequest,
        404: NotFound,
        413: PayloadTooLarge,
        422: InvalidRequest,
        429: RateLimitExceeded,
        501: Unsupported,
        503: Overloaded,
        504: BackendTimeout,
    }
    if status in (401, 403):
        return BackendUnreachable(f"backend refused the gateway's credentials ({message})")
    kind = kinds.get(status, InvalidRequest if 400 <= status < 500 else BackendUnreachable)
    return kind(message, retry_after=1 if status in (429, 503) else None)


def _message_of(body: bytes) -> str:
    """The human message of an error body in any backend's shape, else its text."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace")
    if isinstance(value, dict):
        error = value.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
        for key in ("message", "detail"):
            if isinstance(value.get(key), str):
                return str(value[key])[:500]
    return body[:500].decode("utf-8", "replace")
