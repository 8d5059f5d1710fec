"""Thin handlers: each reads as the request chain and leaves the work to the phases."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from proxy.errors import NotFound
from proxy.exchange import ClientGone
from proxy.forward import forward
from proxy.health import discover_models, unready_models
from proxy.metrics import CONTENT_TYPE
from proxy.middleware import EXCHANGE
from proxy.routing import UNKNOWN_MODEL, plan
from proxy.state import STATE, GatewayState
from proxy.timeouts import TIMEOUT_HEADER, request_budget
from proxy.view import peek

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Base paths under which the OpenAI routes are served (MLflow and Databricks clients use them).
OPENAI_PREFIXES = ("", "/gateway/mlflow", "/mlflow", "/gateway/openai", "/openai")
OPENAI_POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


async def read_body(request: web.Request) -> bytes:
    """The whole request body (capped by server.max_body_mb); a vanished client ends here."""
    try:
        body = await request.read()
    except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError) as exc:
        raise ClientGone from exc
    request[EXCHANGE].bytes_in = len(body)
    return body


def deadline_of(request: web.Request, state: GatewayState) -> float:
    """The event-loop time by which the whole request must be done."""
    budget = request_budget(request.headers.get(TIMEOUT_HEADER), state.config.timeouts)
    return asyncio.get_running_loop().time() + budget


def openai_route(upstream_path: str) -> Handler:
    """A handler forwarding an OpenAI-style POST body, byte for byte, to `upstream_path`."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state, ex = request.app[STATE], request[EXCHANGE]
        ex.model_label = UNKNOWN_MODEL  # until routing names a configured one
        deadline = deadline_of(request, state)
        body = await read_body(request)
        view = peek(body)
        route = plan(state.config, view.model, state.rng, state.known_models)
        ex.model_label = route.model_label
        return await forward(request, state, ex, route.attempts, upstream_path, body, deadline)

    return handle


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the configured models, or the backends' own lists merged."""
    state = request.app[STATE]
    return _json({"object": "list", "data": await _model_cards(state)})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model card, or a 404 envelope."""
    state = request.app[STATE]
    wanted = request.match_info["model"]
    for card in await _model_cards(state):
        if card.get("id") == wanted:
            return _json(card)
    raise NotFound(f"model '{wanted[:200]}' does not exist; GET /v1/models lists the models")


async def _model_cards(state: GatewayState) -> list[dict[str, object]]:
    if state.config.models:
        created = state.started_at
        return [
            {"id": name, "object": "model", "created": created, "owned_by": "inference-proxy"}
            for name in state.config.models
        ]
    return await discover_models(state)


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves."""
    return _json({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: every model has a healthy target."""
    state = request.app[STATE]
    missing = unready_models(state.config, state.healthy)
    if missing:
        return _json({"status": "unavailable", "unready": missing}, status=503)
    return _json({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Every route of the gateway."""
    for prefix in OPENAI_PREFIXES:
        for path in OPENAI_POST_ROUTES:
            app.router.add_post(prefix + path, openai_route(path))
        app.router.add_get(prefix + "/v1/models", list_models)
        app.router.add_get(prefix + "/v1/models/{model:.+}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
