"""The first links of every model route's chain: the body, the deadline, the JSON answer.

`begin` makes the `Call` that every later phase (plan, admit, attempt, relay) is handed: the
request, the gateway's state, the request's record and its body and deadline, in one object.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import orjson
from aiohttp import web

from proxy.errors import PayloadTooLarge, RequestTimeout
from proxy.exchange import ClientGone, Exchange
from proxy.middleware import EXCHANGE
from proxy.routing import UNKNOWN_MODEL
from proxy.state import STATE, GatewayState
from proxy.timeouts import TIMEOUT_HEADER, request_budget


class Call:
    """One request on its way through the chain, from `begin` on."""

    __slots__ = ("body", "deadline", "ex", "prompt", "request", "state", "stream")

    def __init__(
        self, request: web.Request, state: GatewayState, ex: Exchange, body: bytes, deadline: float
    ) -> None:
        self.request = request
        self.state = state
        self.ex = ex
        self.body = body  # as received (a route may put its own translation in its place)
        self.deadline = deadline  # event-loop time
        self.stream = False  # the client asked for a stream (set once the body is read)
        # The values of the body's prompt fields, where the route's own pass over the body
        # found them (empty: it has none); UNSET: not looked for, `affinity_of` finds them
        self.prompt: tuple[msgspec.Raw, ...] | msgspec.UnsetType = msgspec.UNSET


async def begin(request: web.Request) -> Call:
    """The request's body (capped by server.max_body_mb) and its deadline (event-loop time).

    The deadline counts from the request's arrival; a malformed timeout header is refused
    before the body is read. A client that vanishes mid-body ends the request here.
    """
    state, ex = request[STATE], request[EXCHANGE]
    ex.model_label = UNKNOWN_MODEL  # until routing names a configured one
    budget = request_budget(request.headers.get(TIMEOUT_HEADER), state.config.timeouts)
    now = asyncio.get_running_loop().time()
    deadline = now + budget - (time.perf_counter() - ex.started)
    length = request.content_length
    if length is not None and length > state.max_body:
        raise PayloadTooLarge(
            f"request body of {length} bytes is over the gateway's limit of {state.max_body} "
            "bytes (server.max_body_mb)"
        )
    body_by = min(deadline, now + state.config.server.body_timeout_s)
    try:
        if request.content.is_eof():  # the whole body came with the head: nothing to wait for
            body = await request.read()
        else:
            async with asyncio.timeout_at(body_by):
                body = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            "the request body did not arrive in time (server.body_timeout_s, or the request's "
            "deadline); send it whole and promptly"
        ) from None
    except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError) as exc:
        raise ClientGone from exc
    ex.bytes_in = len(body)
    return Call(request, state, ex, body, deadline)


def json_response(value: object, status: int = 200) -> web.Response:
    """A JSON answer the gateway makes itself."""
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")
