"""The OpenAI routes (and vLLM's helper routes): each body's `model` names what serves it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.catalog import model_cards
from proxy.chain import begin, json_response
from proxy.errors import NotFound
from proxy.serve import HELPER_ROUTES, PROMPT_FIELDS, serve_model, serve_openai
from proxy.view import peek

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def helper_route(path: str) -> Handler:
    """A handler for a helper route (/tokenize, /detokenize), addressed by the body's
    `model` and forwarded as is to a target whose kind serves it (else a 501)."""
    api = HELPER_ROUTES[path]

    async def handle(request: web.Request) -> web.StreamResponse:
        call = await begin(request)
        view = peek(call.body)
        return await serve_model(
            call,
            view.model,
            native_path=path,
            native_api=api,
            model_at=view.model_at,
        )

    return handle


def openai_route(path: str) -> Handler:
    """A handler for an OpenAI-style POST route, addressed by the body's `model`."""
    prompt_fields = PROMPT_FIELDS[path]

    async def handle(request: web.Request) -> web.StreamResponse:
        call = await begin(request)
        view = peek(call.body, prompt_fields)
        call.stream = view.stream
        call.prompt = view.prompt
        return await serve_openai(
            call,
            path,
            view.model,
            chat_template=view.chat_template,
            model_at=view.model_at,
            options_at=view.options_at,
        )

    return handle


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the configured models, or the backends' own lists merged."""
    return json_response({"object": "list", "data": await model_cards(request)})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model card, or a 404 envelope."""
    wanted = request.match_info["model"]
    for card in await model_cards(request):
        if card.get("id") == wanted:
            return json_response(card)
    raise NotFound(f"model '{wanted[:200]}' does not exist; GET /v1/models lists the models")
