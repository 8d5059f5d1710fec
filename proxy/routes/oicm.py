"""OICM's per-endpoint base URL: `/models/{endpoint}/proxy/{path}`."""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.auth import check_scope
from proxy.catalog import model_cards
from proxy.chain import Call, begin, json_response
from proxy.forward import exchange, try_plan
from proxy.paths import subpath
from proxy.ratelimit import limited
from proxy.routing import Target
from proxy.serve import CHAT, OPENAI_POST_ROUTES, ROUTE_OF_KIND, affinity_of, serve_openai
from proxy.translate import oicm
from proxy.upstream import Backend
from proxy.view import decode_object, peek_invocation


async def endpoint_proxy(request: web.Request) -> web.StreamResponse:
    """OpenAI routes under the prefix are routed by endpoint (a TGI-style payload on the chat
    route becomes a chat request); any other path goes to a target backend as is."""
    endpoint = request.match_info["endpoint"]
    path = subpath(request.raw_path, 3)  # after /models/{endpoint}/proxy, as the client sent it
    if path == "/v1/models" and request.method in ("GET", "HEAD"):
        cards = await model_cards(request)
        return json_response({"object": "list", "data": cards})
    call = await begin(request)
    if path in OPENAI_POST_ROUTES and request.method == "POST":
        kind = peek_invocation(call.body)
        call.stream = kind.stream
        if kind.kind == "tgi" and path == CHAT:  # its prompt is found in the chat body if needed
            chat = oicm.tgi_to_chat_request(decode_object(call.body), upstream_model=endpoint)
            call.body = orjson.dumps(chat)
        elif ROUTE_OF_KIND.get(kind.kind) == path:  # else the path's own field keys it
            call.prompt = kind.prompt
        return await serve_openai(
            call, path, endpoint, chat_template=kind.chat_template, force_model=True
        )
    return await _as_is(call, endpoint, path)


async def _as_is(call: Call, endpoint: str, path: str) -> web.StreamResponse:
    """Any other task path (rerank, embed, audio, ...): method, headers and body untouched."""
    route = call.state.plan(endpoint)
    call.ex.model_label = route.model_label
    check_scope(call.ex.principal, endpoint)
    body = call.body or None

    async def run(backend: Backend, target: Target, may_retry: bool) -> web.StreamResponse:
        return await exchange(call, backend, path, body, may_retry)

    async with limited(call, endpoint):  # the endpoint's and the key's limits, as serve_model
        return await try_plan(call, route, run, affinity_of(call, route))
