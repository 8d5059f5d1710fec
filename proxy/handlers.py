"""Thin handlers for the OpenAI routes and the operational ones."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.adapters import ChatTemplateAdapter, ResponsesAdapter
from proxy.chain import begin, json_response
from proxy.config import OptionalApi
from proxy.errors import NotFound
from proxy.health import discover_models, unready_models
from proxy.metrics import CONTENT_TYPE
from proxy.serve import serve_model
from proxy.state import STATE, GatewayState
from proxy.view import decode_object, peek

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)
OPENAI_POST_ROUTES = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
# vLLM's and SGLang's helper routes (vLLM's benchmark client calls /tokenize first); not
# every kind has them, so each is an optional API (`serves`).
HELPER_ROUTES: dict[str, OptionalApi] = {"/tokenize": "tokenize", "/detokenize": "detokenize"}


async def serve_openai(
    request: web.Request,
    path: str,
    model: str,
    body: bytes,
    deadline: float,
    *,
    chat_template: bool = False,
    force_model: bool = False,
    model_at: tuple[int, int] | None = None,
) -> web.StreamResponse:
    """An OpenAI-shaped request for `model` at `path`: forwarded as is where the backend
    serves the route, translated where it does not (Responses; a `chat_template`).
    `model_at`: where `peek` found `model` in `body`."""
    if path == EMBEDDINGS:
        return await serve_model(
            request, model, body, deadline,
            native_path=path, native_api="embeddings", force_model=force_model,
            model_at=model_at,
        )  # fmt: skip
    if path == RESPONSES:
        return await serve_model(
            request, model, body, deadline,
            native_path=path, native_api="responses", force_model=force_model,
            model_at=model_at,
            adapter=lambda: ResponsesAdapter(decode_object(body), model, vision_of(request, model)),
        )  # fmt: skip
    if path == CHAT and chat_template:
        return await serve_model(
            request, model, body, deadline,
            native_path=path, native_api="chat_template", force_model=force_model,
            model_at=model_at,
            adapter=lambda: ChatTemplateAdapter(decode_object(body)),
        )  # fmt: skip
    return await serve_model(
        request, model, body, deadline,
        native_path=path, force_model=force_model, model_at=model_at,
    )  # fmt: skip


def helper_route(path: str) -> Handler:
    """A handler for a helper route (/tokenize, /detokenize), addressed by the body's
    `model` and forwarded as is to a target whose kind serves it (else a 501)."""
    api = HELPER_ROUTES[path]

    async def handle(request: web.Request) -> web.StreamResponse:
        body, deadline = await begin(request)
        view = peek(body)
        return await serve_model(
            request, view.model, body, deadline,
            native_path=path, native_api=api, model_at=view.model_at,
        )  # fmt: skip

    return handle


def vision_of(request: web.Request, model: str) -> bool:
    """Whether the configured model takes images (translated routes refuse them otherwise)."""
    entry = request.app[STATE].config.models.get(model)
    return entry is not None and entry.vision


def openai_route(path: str) -> Handler:
    """A handler for an OpenAI-style POST route, addressed by the body's `model`."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body, deadline = await begin(request)
        view = peek(body)
        return await serve_openai(
            request, path, view.model, body, deadline,
            chat_template=view.chat_template, model_at=view.model_at,
        )  # fmt: skip

    return handle


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the configured models, or the backends' own lists merged."""
    state = request.app[STATE]
    return json_response({"object": "list", "data": await model_cards(state)})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model card, or a 404 envelope."""
    state = request.app[STATE]
    wanted = request.match_info["model"]
    for card in await model_cards(state):
        if card.get("id") == wanted:
            return json_response(card)
    raise NotFound(f"model '{wanted[:200]}' does not exist; GET /v1/models lists the models")


async def model_cards(state: GatewayState) -> list[dict[str, object]]:
    """The model cards clients see: configured names, or the backends' own cards."""
    if state.config.models:
        created = state.started_at
        return [
            {"id": name, "object": "model", "created": created, "owned_by": "inference-proxy"}
            for name in state.config.models
        ]
    return await discover_models(state)


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves."""
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: every model has a healthy target."""
    state = request.app[STATE]
    missing = unready_models(state.config, state.healthy(asyncio.get_running_loop().time()))
    if missing:
        return json_response({"status": "unavailable", "unready": missing}, status=503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
