"""Every route of the gateway, in one table; one module per surface below it."""

from __future__ import annotations

from aiohttp import web

from proxy import serve
from proxy.routes import admin, mlflow, oicm, openai, ops, protocols

# Base paths under which the OpenAI routes are served (MLflow and Databricks clients use them).
OPENAI_PREFIXES = ("", "/gateway/mlflow", "/mlflow", "/gateway/openai", "/openai")


def add_routes(app: web.Application) -> None:
    router = app.router
    for prefix in OPENAI_PREFIXES:
        for path in serve.OPENAI_POST_ROUTES:
            router.add_post(prefix + path, openai.openai_route(path))
        router.add_get(prefix + "/v1/models", openai.list_models)
        router.add_get(prefix + "/v1/models/{model:.+}", openai.get_model)
    for path in serve.HELPER_ROUTES:
        router.add_post(path, openai.helper_route(path))
    for prefix in ("/anthropic", "/gateway/anthropic"):
        router.add_post(prefix + "/v1/messages", protocols.anthropic_messages)
    for prefix in ("/gemini", "/gateway/gemini"):
        router.add_post(prefix + "/{version}/models/{target:.+}", protocols.gemini_generate)
    router.add_get("/api/2.0/endpoints/", mlflow.list_endpoints)
    router.add_get("/api/2.0/endpoints/{endpoint}", mlflow.get_endpoint)
    for pattern in (
        "/gateway/{endpoint}/mlflow/invocations",
        "/gateway/{endpoint}/invocations",
        "/endpoints/{endpoint}/invocations",
    ):
        router.add_post(pattern, mlflow.invocations)
    router.add_route("*", "/models/{endpoint}/proxy/{path:.*}", oicm.endpoint_proxy)
    router.add_get("/health", ops.health)
    router.add_get("/ready", ops.ready)
    router.add_get("/metrics", ops.metrics)
    admin.add_admin_routes(router)
