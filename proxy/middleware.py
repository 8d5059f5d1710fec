"""Once per request: request id, authentication, the error envelope, metrics and access log."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler

from proxy.auth import authenticate, is_admin_path
from proxy.cors import is_preflight
from proxy.errors import (
    Dialect,
    ExpectationFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    VersionNotSupported,
    envelope,
    error_headers,
)
from proxy.exchange import NO_BACKEND, ClientGone, Exchange, disconnect_phase
from proxy.headers import REQUEST_ID
from proxy.listener import ODDITIES, PLAIN
from proxy.state import LIVE, STATE, GatewayState

logger = logging.getLogger("proxy")

EXCHANGE: web.RequestKey[Exchange] = web.RequestKey("exchange", Exchange)
UNMATCHED_ROUTE = "unmatched"
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def dialect_of(path: str) -> Dialect:
    """Which protocol's error shape a path's clients read."""
    if path.startswith(("/anthropic/", "/gateway/anthropic/")):
        return "anthropic"
    if path.startswith(("/gemini/", "/gateway/gemini/")):
        return "gemini"
    return "openai"


# New request ids: a random prefix per process and a counter (unique, and cheaper than uuid4).
_ID_PREFIX = secrets.token_hex(10)
_ID_COUNTER = itertools.count(1)


def request_id_of(value: str | None) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one."""
    if value is not None and _SAFE_REQUEST_ID.fullmatch(value):
        return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def error_response(err: ProxyError, ex: Exchange) -> web.Response:
    """The one rendering of a gateway-made error."""
    ex.status = err.status
    ex.error_type = err.type
    headers = error_headers(err)
    headers[REQUEST_ID] = ex.request_id
    response = web.Response(
        status=err.status,
        body=envelope(err, ex.dialect),
        content_type="application/json",
        headers=headers,
    )
    if isinstance(err, PayloadTooLarge | RequestTimeout | ExpectationFailed | VersionNotSupported):
        response.force_close()  # the rest of the body is never read: the connection ends here
    return response


async def expect(request: web.Request, value: str) -> None:
    """Answer an `Expect` header: `100-continue` gets its interim answer, anything else a 417
    (which, unlike aiohttp's own, does not echo the header's value)."""
    if value.strip().lower() != "100-continue":
        raise ExpectationFailed("the only expectation the gateway meets is 100-continue")
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not begun


def malformed(state: GatewayState, status: int) -> web.Response:
    """The answer to a request aiohttp could not parse, accounted like any other (route
    `unmatched`); nothing of the request is in it."""
    err: ProxyError = (
        PayloadTooLarge("the request head is too large")
        if status == 413
        else InvalidRequest("the request is not valid HTTP/1.1; nothing of it was read further")
    )
    ex = Exchange(
        request_id=request_id_of(None),
        route=UNMATCHED_ROUTE,
        started=time.perf_counter(),
        dialect="openai",
    )
    response = error_response(err, ex)
    finished = time.perf_counter()
    _account(state, ex, finished, None)
    state.access_log.write(ex, "-", "-", finished)
    return response


def from_http_exception(exc: web.HTTPException) -> ProxyError:
    """aiohttp's own refusals (no route, wrong method, body too big) as our errors."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            f"request body is over the gateway's limit ({exc.text or 'see server.max_body_mb'})"
        )
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"method {exc.method} is not allowed here")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such route")
    return InvalidRequest(exc.reason)


def _keyless_preflight(request: web.Request, state: GatewayState) -> bool:
    """A CORS preflight with `server.cors` on: browsers send it without a key, and
    proxy/cors_hooks.py answers it before any handler (the admin API takes none)."""
    return (
        state.config.server.cors is not None
        and is_preflight(request.headers)
        and not is_admin_path(request.path)
    )


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, authentication (before routing), the handler, then one envelope for any
    error and one round of accounting (metrics, access log) for every request."""
    live = request.app[LIVE]
    state = request[STATE] = live.state
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else UNMATCHED_ROUTE
    ex = Exchange(
        request_id=request_id_of(request.headers.get(REQUEST_ID)),
        route=route,
        started=time.perf_counter(),
        dialect=dialect_of(request.path),
    )
    request[EXCHANGE] = ex
    trace = state.tracer.begin(request, ex) if state.tracer is not None else None
    state.active += 1
    clients = state.clients
    if clients is not None:
        clients.request_started(request.protocol)
    try:
        odd = request.get(ODDITIES, PLAIN)  # set by the request factory: never a miss
        if odd.bad_version is not None:
            raise VersionNotSupported(
                f"{odd.bad_version} is not spoken here: send HTTP/1.1 (or HTTP/1.0)"
            )
        if (
            request.path not in state.open_paths
            and not (state.admin is not None and is_admin_path(request.path))  # the admin key's
            and not (request.method == "OPTIONS" and _keyless_preflight(request, state))
        ):
            query_key = request.query.get("key") if ex.dialect == "gemini" else None
            ex.principal = authenticate(request.headers, state.keys, query_key, state.managed)
        if odd.expect is not None:  # only once the key is known good: no 100 for a refusal
            await expect(request, odd.expect)
        response = await handler(request)
        if not response.prepared:
            response.headers[REQUEST_ID] = ex.request_id
            ex.status = response.status
            if live.draining:
                response.force_close()  # a draining gateway takes no more requests on it
        return response
    except ProxyError as err:
        return error_response(err, ex)
    except web.HTTPException as exc:
        return error_response(from_http_exception(exc), ex)
    except ClientGone:
        ex.client_gone = True
        return web.Response(status=CLIENT_CLOSED)
    except asyncio.CancelledError:
        ex.client_gone = True
        raise
    except Exception:  # the one catch-all: a bug must still get an envelope and a log line
        logger.exception("unhandled error on %s %s", request.method, request.path[:200])
        return error_response(ProxyError("the gateway failed on this request; see its log"), ex)
    finally:
        state.active -= 1
        if clients is not None:
            clients.request_finished(request.protocol)
        left: str | None = None  # where the client was when it went away
        if ex.client_gone and ex.stream_complete:
            ex.client_gone = False  # it left after the last event: a complete answer
        elif ex.client_gone:
            left = disconnect_phase(ex)
            ex.status = CLIENT_CLOSED
        finished = time.perf_counter()
        _account(state, ex, finished, left)
        state.access_log.write(ex, request.method, request.path[:200], finished)
        if trace is not None:
            trace.end(ex, request.method)


def _account(state: GatewayState, ex: Exchange, finished: float, left: str | None) -> None:
    """Every metric of one request, tallied once at its end (`left`: the phase in which
    its client went away, if it did)."""
    m = state.metrics
    model = ex.model_label
    m.requests[ex.route, model, ex.backend, str(ex.status)] += 1
    m.duration[ex.route, model].observe(finished - ex.started)
    if ex.sse:
        if ex.first_byte_at is not None:
            m.ttft[model, ex.backend].observe(ex.first_byte_at - ex.started)
        if ex.events:
            m.stream_chunks[model] += ex.events
        if ex.event_gap is not None:
            m.inter_event[model, ex.backend].observe(ex.event_gap)
    if ex.stream_error is not None:
        m.stream_errors[model, ex.backend, ex.stream_error] += 1
    if left is not None:
        m.disconnects[model, ex.backend, left] += 1
    if ex.usage is not None:
        m.tokens[model, "prompt"] += ex.usage.prompt
        m.tokens[model, "completion"] += ex.usage.completion
    tally = state.usage_tally  # per-key usage (with a key store): what reached a backend
    if tally is not None and ex.principal is not None and ex.backend != NO_BACKEND:
        tally.add(ex.principal.key_id, model, ex.usage, time.time())
