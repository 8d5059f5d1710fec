"""The operational routes: liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.chain import json_response
from proxy.health import unready_models
from proxy.metrics import CONTENT_TYPE
from proxy.state import LIVE, STATE
from proxy.workermetrics import WORKER_METRICS


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves."""
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: every model has a healthy target, and the gateway is not draining."""
    if request.app[LIVE].draining:
        return json_response({"status": "draining"}, status=503)
    state = request[STATE]
    missing = unready_models(state.config, state.healthy(asyncio.get_running_loop().time()))
    if missing:
        return json_response({"status": "unavailable", "unready": missing}, status=503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition: this process's tallies, or every worker's merged."""
    workers = request.app.get(WORKER_METRICS)
    body = request[STATE].metrics.render() if workers is None else await workers.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
