"""create_app(config): the aiohttp application with its state, resources and routes."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import BinaryIO

from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.accounting import UsageTally, flushing
from proxy.auth import KeySet
from proxy.config import Config
from proxy.cors_hooks import install_cors
from proxy.health import health_checks
from proxy.listener import GuardedServer, close, listen
from proxy.metrics import Metrics
from proxy.middleware import gateway_middleware, malformed
from proxy.prefix_index import AgreedIndex, PrefixIndex
from proxy.ratelimit import LIMITER, add_limit_headers, limiter_for
from proxy.routes import add_routes
from proxy.routes.admin import admin_digest, managed_keys
from proxy.state import LIVE, GatewayState, Live
from proxy.tls import server_context
from proxy.tracing import traced
from proxy.upstream import open_backends
from proxy.workermetrics import WORKERS_ENV, worker_metrics

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
    metrics = Metrics(list(config.backends), config.timeouts.max_request_s)
    live = app[LIVE] = Live(GatewayState(config, keys, {}, metrics, log))
    limiter = app[LIMITER] = limiter_for(config, metrics, _workers(env))
    app.cleanup_ctx.append(lambda _app: limiter.running())
    app.on_response_prepare.append(add_limit_headers)
    if config.auth.store is not None:  # opened first at start: no store, no serving
        managed = live.state.managed = managed_keys(config.auth, env)
        app.cleanup_ctx.append(lambda _app: managed.serving())
        tally = live.state.usage_tally = UsageTally()  # per-key usage, written in batches
        app.cleanup_ctx.append(
            flushing(tally, lambda: managed.store, lambda: live.state.config.usage.flush_s)
        )
    live.state.admin = admin_digest(config.auth, keys, env)

    async def backends(app: web.Application) -> AsyncIterator[None]:
        live.state.backends = open_backends(config, env)
        metrics.in_flight = lambda: {n: b.in_flight for n, b in live.state.backends.items()}
        loop = asyncio.get_running_loop()
        metrics.backend_up = lambda: live.state.healthy(loop.time())
        metrics.queue_depth = lambda: live.state.admission.waiting
        yield
        for task in list(live.tasks):  # backends a reload was retiring close now
            task.cancel()
        await asyncio.gather(*live.tasks, return_exceptions=True)
        for backend in live.state.backends.values():
            backend.close()

    app.cleanup_ctx.append(backends)
    app.cleanup_ctx.append(health_checks)
    app.cleanup_ctx.append(lambda _app: log.flushing())
    if config.tracing is not None:  # README: Tracing; after the access log's: stopped before it
        tracing = config.tracing
        app.cleanup_ctx.append(lambda _app: traced(live.state, tracing, metrics))
    app.cleanup_ctx.append(worker_metrics(app, env, metrics))  # the peers' /metrics socket
    add_routes(app)
    if config.server.cors is not None:  # a reload keeps the server section: this holds
        install_cors(app, config.server.cors)
    for name, backend in config.backends.items():
        if backend.api_key_env and not env.get(backend.api_key_env):
            logger.warning("backend %s: $%s is not set; sending no key", name, backend.api_key_env)
    if _split_index(config, live.state.prefix_index, env):
        logger.warning(
            "routing: %s workers each keep their own sticky affinity index and place keys "
            "apart; set routing.key_placement: agreed (README: Routing a fleet)",
            env.get(WORKERS_ENV),
        )
    if keys or config.auth.store is not None:
        logger.info("auth on: %d key(s) from $%s", len(keys), config.auth.keys_env)
    else:
        logger.warning("auth OFF: no keys in $%s; every client is let in", config.auth.keys_env)
    return app


def _split_index(config: Config, index: PrefixIndex | AgreedIndex, env: Mapping[str, str]) -> bool:
    """Whether this is one of several workers that each keep a sticky `affinity` index."""
    uses = any(m.policy == "affinity" for m in config.models.values())
    sticky = isinstance(index, PrefixIndex) and index.size > 0
    return uses and sticky and _workers(env) > 1


def _workers(env: Mapping[str, str]) -> int:
    """How many workers share this host's limits (the supervisor says; 1 when it runs none)."""
    value = env.get(WORKERS_ENV, "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    """The runner that sets the app up and cleans it up (connections are served by the
    `GuardedServer` that `serve_app` builds on it)."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None)


class Serving:
    """A gateway listening on its socket: its addresses, and how it stops."""

    def __init__(
        self, runner: web.AppRunner, server: GuardedServer, listener: asyncio.Server
    ) -> None:
        self.runner = runner
        self.server = server
        self.listener = listener

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self.listener.sockets]

    async def close(self, drain_s: float, grace_s: float = 0.0) -> None:
        """Drain: `/ready` answers 503 and every answer closes its connection from now on;
        after `grace_s` (time for a load balancer to hear it), refuse new connections, let
        requests in flight finish for up to `drain_s`, then close the app's resources."""
        self.runner.app[LIVE].draining = True
        if grace_s > 0:
            logger.info("draining: still serving for %ss (server.drain_grace_s)", grace_s)
            await asyncio.sleep(grace_s)
        await close(self.listener, self.server, drain_s)
        await self.runner.cleanup()


async def serve_app(
    app: web.Application, config: Config, host: str, port: int, *, reuse_port: bool = False
) -> Serving:
    """Set the app up and listen on host:port (`reuse_port`: as one of several workers);
    raises OSError when the socket cannot open."""
    tls = server_context(config.server.tls) if config.server.tls else None  # or ConfigError
    runner = make_runner(app, config)
    await runner.setup()
    s = config.server
    live = app[LIVE]
    server = GuardedServer(
        runner,
        header_timeout_s=s.header_timeout_s,
        max_connections=s.max_connections,
        malformed=lambda status: malformed(live.state, status),
        access_log=None,  # the middleware writes the access log
        keepalive_timeout=s.keepalive_s,
        # A body left unread (413, 408) is read and dropped for at most this long before the
        # connection closes, so the client sees the answer rather than a reset (aiohttp: 10 s).
        lingering_time=1.0,
    )
    live.state.clients = server
    live.tls = tls
    try:
        listener = await listen(server, host, port, reuse_port=reuse_port, ssl=tls)
    except OSError:
        await runner.cleanup()
        raise
    return Serving(runner, server, listener)
