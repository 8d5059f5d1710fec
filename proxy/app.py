"""create_app(config): the aiohttp application with its state, resources and routes."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import BinaryIO

from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.auth import KeySet
from proxy.config import Config
from proxy.health import health_checks
from proxy.metrics import Metrics
from proxy.middleware import gateway_middleware
from proxy.routes import add_routes
from proxy.state import STATE, GatewayState
from proxy.upstream import open_backends

logger = logging.getLogger("proxy")


def create_app(
    config: Config,
    environ: Mapping[str, str] | None = None,
    access_log: BinaryIO | None = None,
) -> web.Application:
    """The gateway for `config`, with secrets read from `environ` (default: os.environ).

    Access-log lines go to `access_log` when it is given and `server.access_log` is on.
    """
    env = os.environ if environ is None else environ
    keys = KeySet.from_env(env.get(config.auth.keys_env))
    app = web.Application(
        middlewares=[gateway_middleware],
        client_max_size=int(config.server.max_body_mb * 1024 * 1024),
    )
    log = AccessLog(access_log if config.server.access_log else None)
    app[STATE] = GatewayState(
        config, keys, {}, Metrics(list(config.backends), config.timeouts.max_request_s), log
    )

    async def backends(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        state.backends = open_backends(config, env)
        state.metrics.in_flight = lambda: {n: b.in_flight for n, b in state.backends.items()}
        yield
        for backend in state.backends.values():
            backend.close()

    app.cleanup_ctx.append(backends)
    app.cleanup_ctx.append(health_checks)
    app.cleanup_ctx.append(lambda _app: log.flushing())
    add_routes(app)
    for name, backend in config.backends.items():
        if backend.api_key_env and not env.get(backend.api_key_env):
            logger.warning("backend %s: $%s is not set; sending no key", name, backend.api_key_env)
    if keys:
        logger.info("auth on: %d key(s) from $%s", len(keys), config.auth.keys_env)
    else:
        logger.warning("auth OFF: no keys in $%s; every client is let in", config.auth.keys_env)
    return app


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    """The runner every gateway is served by (the tests use it too)."""
    return web.AppRunner(
        app,
        handler_cancellation=True,  # a client that goes away cancels its request at once
        access_log=None,  # the middleware writes the access log
        shutdown_timeout=config.server.drain_s,
    )
