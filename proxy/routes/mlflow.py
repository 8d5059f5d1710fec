"""The MLflow deployments client's routes: the endpoint listing and the invocations."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from proxy.catalog import model_cards
from proxy.chain import begin, json_response
from proxy.errors import InvalidRequest, NotFound
from proxy.serve import ROUTE_OF_KIND, serve_openai
from proxy.state import STATE
from proxy.view import peek_invocation

PAGE_SIZE = 1000


def endpoint_card(name: str, endpoint_type: str, upstream: str, provider: str) -> dict[str, object]:
    """One endpoint as the MLflow client's `Endpoint` model reads it (`limit` must be there)."""
    return {
        "name": name,
        "endpoint_type": endpoint_type,
        "model": {"name": upstream, "provider": provider},
        "endpoint_url": f"/gateway/{name}/invocations",
        "limit": None,
    }


async def endpoint_cards(request: web.Request) -> list[dict[str, object]]:
    """Every model the caller's key may use as an MLflow endpoint, in config order."""
    state = request[STATE]
    if not state.config.models:
        ids = [str(card["id"]) for card in await model_cards(request)]
        kind = next(iter(state.config.backends.values())).kind
        return [endpoint_card(i, "llm/v1/chat", i, kind) for i in ids]
    allowed = {str(card["id"]) for card in await model_cards(request)}
    cards = []
    for name, model in state.config.models.items():
        if name not in allowed:
            continue
        first = model.targets[0]
        kind = state.config.backends[first.backend].kind
        cards.append(endpoint_card(name, model.endpoint_type, first.model or name, kind))
    return cards


def page(items: list[dict[str, object]], token: str | None, size: int) -> dict[str, object]:
    """One page of the listing; `next_page_token` (opaque) only when more follow."""
    start = 0
    if token:
        try:
            offset = base64.urlsafe_b64decode(token.encode()).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest("page_token is not one this gateway gave out") from exc
        # The tokens given out hold a plain offset; int() would also take "-1", " 2" or "1_0".
        if not (offset.isascii() and offset.isdigit()):
            raise InvalidRequest("page_token is not one this gateway gave out")
        start = int(offset)
    body: dict[str, object] = {"endpoints": items[start : start + size]}
    if start + size < len(items):
        body["next_page_token"] = base64.urlsafe_b64encode(str(start + size).encode()).decode()
    return body


async def list_endpoints(request: web.Request) -> web.Response:
    """GET /api/2.0/endpoints/: the listing, paginated."""
    cards = await endpoint_cards(request)
    return json_response(page(cards, request.query.get("page_token"), PAGE_SIZE))


async def get_endpoint(request: web.Request) -> web.Response:
    """GET /api/2.0/endpoints/{endpoint}: one endpoint, or a 404 envelope."""
    name = request.match_info["endpoint"]
    for card in await endpoint_cards(request):
        if card["name"] == name:
            return json_response(card)
    raise NotFound(f"endpoint '{name[:200]}' does not exist; GET /api/2.0/endpoints/ lists them")


async def invocations(request: web.Request) -> web.StreamResponse:
    """POST .../{endpoint}/invocations: chat, completions or embeddings, told by the body."""
    endpoint = request.match_info["endpoint"]
    call = await begin(request)
    kind = peek_invocation(call.body)
    call.stream = kind.stream
    call.prompt = kind.prompt
    path = ROUTE_OF_KIND.get(kind.kind)
    if path is None:
        raise InvalidRequest(
            "cannot tell the request's kind: send 'messages' (chat), 'prompt' (completions) "
            "or 'input' (embeddings)"
        )
    return await serve_openai(
        call,
        path,
        endpoint,
        chat_template=kind.chat_template,
        force_model=True,
        options_at=kind.options_at,
    )
