"""Every route of the gateway, in one table."""

from __future__ import annotations

from aiohttp import web

from proxy import handlers, routes_mlflow, routes_oicm, routes_protocols

# Base paths under which the OpenAI routes are served (MLflow and Databricks clients use them).
OPENAI_PREFIXES = ("", "/gateway/mlflow", "/mlflow", "/gateway/openai", "/openai")


def add_routes(app: web.Application) -> None:
    router = app.router
    for prefix in OPENAI_PREFIXES:
        for path in handlers.OPENAI_POST_ROUTES:
            router.add_post(prefix + path, handlers.openai_route(path))
        router.add_get(prefix + "/v1/models", handlers.list_models)
        router.add_get(prefix + "/v1/models/{model:.+}", handlers.get_model)
    for path in handlers.HELPER_ROUTES:
        router.add_post(path, handlers.helper_route(path))
    for prefix in ("/anthropic", "/gateway/anthropic"):
        router.add_post(prefix + "/v1/messages", routes_protocols.anthropic_messages)
    for prefix in ("/gemini", "/gateway/gemini"):
        router.add_post(prefix + "/{version}/models/{target:.+}", routes_protocols.gemini_generate)
    router.add_get("/api/2.0/endpoints/", routes_mlflow.list_endpoints)
    router.add_get("/api/2.0/endpoints/{endpoint}", routes_mlflow.get_endpoint)
    for pattern in (
        "/gateway/{endpoint}/mlflow/invocations",
        "/gateway/{endpoint}/invocations",
        "/endpoints/{endpoint}/invocations",
    ):
        router.add_post(pattern, routes_mlflow.invocations)
    router.add_route("*", "/models/{endpoint}/proxy/{path:.*}", routes_oicm.endpoint_proxy)
    router.add_get("/health", handlers.health)
    router.add_get("/ready", handlers.ready)
    router.add_get("/metrics", handlers.metrics)
