"""The first links of every model route's chain: the body, the deadline, the JSON answer."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from aiohttp import web

from proxy.exchange import ClientGone
from proxy.middleware import EXCHANGE
from proxy.routing import UNKNOWN_MODEL
from proxy.state import STATE
from proxy.timeouts import TIMEOUT_HEADER, request_budget


async def begin(request: web.Request) -> tuple[bytes, float]:
    """The request's body (capped by server.max_body_mb) and its deadline (event-loop time).

    The deadline counts from the request's arrival; a malformed timeout header is refused
    before the body is read. A client that vanishes mid-body ends the request here.
    """
    state, ex = request.app[STATE], request[EXCHANGE]
    ex.model_label = UNKNOWN_MODEL  # until routing names a configured one
    budget = request_budget(request.headers.get(TIMEOUT_HEADER), state.config.timeouts)
    deadline = asyncio.get_running_loop().time() + budget - (time.perf_counter() - ex.started)
    try:
        body = await request.read()
    except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError) as exc:
        raise ClientGone from exc
    ex.bytes_in = len(body)
    return body, deadline


def json_response(value: object, status: int = 200) -> web.Response:
    """A JSON answer the gateway makes itself."""
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")
