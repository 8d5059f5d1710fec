"""Active health checks: each backend's health route, polled; `/ready` reads the results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from proxy.config import Config, health_path
from proxy.errors import Overloaded, ProxyError
from proxy.fleet import probed
from proxy.signals import MAX_METRICS_BYTES, exports, parse
from proxy.state import LIVE, GatewayState, Live
from proxy.upstream import Backend, fetch

logger = logging.getLogger("proxy.health")


async def probe(backend: Backend, timeout_s: float) -> bool | None:
    """Whether the backend answers its health route with a 2xx status within the timeout;
    None when the gateway itself could not ask (no file descriptor left for a connection:
    that says nothing of the backend, so it is no verdict)."""
    try:
        async with asyncio.timeout(timeout_s):
            status, _ = await fetch(backend, health_path(backend.config), limit=1024 * 1024)
    except Overloaded:
        return None
    except (TimeoutError, ProxyError):
        return False
    return 200 <= status < 300


async def check_all(state: GatewayState) -> None:
    """Probe every backend once, concurrently, and record the results."""
    timeout_s = state.config.health.timeout_s
    names = list(state.backends)
    results = await asyncio.gather(*(probe(state.backends[n], timeout_s) for n in names))
    for name, passed in zip(names, results, strict=True):
        health = state.fleet[name]
        if passed is None:  # the gateway's own limit, not the backend's health
            continue
        if probed(health, passed, state.config.health):
            logger.info("backend %s is %s", name, "up" if health.probed_up else "down")


async def backend_models(backend: Backend, timeout_s: float) -> list[dict[str, object]]:
    """A backend's own /v1/models cards; an unreachable backend contributes none."""
    try:
        async with asyncio.timeout(timeout_s):
            status, body = await fetch(backend, "/v1/models")
        value = orjson.loads(body) if status == 200 else None
    except (TimeoutError, ProxyError, orjson.JSONDecodeError):
        return []
    data = value.get("data") if isinstance(value, dict) else None
    return [c for c in data if isinstance(c, dict)] if isinstance(data, list) else []


async def discover_models(state: GatewayState) -> list[dict[str, object]]:
    """The backends' model cards merged (first one wins); their ids become metric labels."""
    timeout_s = state.config.timeouts.connect_s + state.config.health.timeout_s
    lists = await asyncio.gather(*(backend_models(b, timeout_s) for b in state.backends.values()))
    seen: dict[str, dict[str, object]] = {}
    for cards in lists:
        for card in cards:
            model_id = card.get("id")
            if isinstance(model_id, str):
                seen.setdefault(model_id, card)
    state.known_models = set(seen)
    return list(seen.values())


async def scrape(state: GatewayState, backend: Backend) -> None:
    """Read a backend's own load signals from its /metrics (a failure keeps the old ones,
    which then go stale and stop counting)."""
    try:
        async with asyncio.timeout(state.config.health.timeout_s):
            status, body = await fetch(backend, "/metrics", limit=MAX_METRICS_BYTES)
    except (TimeoutError, ProxyError):
        return
    if status == 200:
        now = asyncio.get_running_loop().time()
        state.signals[backend.name] = parse(backend.config.kind, body, now)


async def _poll(live: Live) -> None:
    while True:
        state = live.state  # a reload may have put a new one in force
        await check_all(state)
        await asyncio.gather(
            *(scrape(state, b) for b in state.backends.values() if exports(b.config.kind))
        )
        for backend in state.backends.values():
            backend.pool.sweep()
        if not state.config.models:
            await discover_models(state)
        await asyncio.sleep(state.config.health.interval_s)


async def health_checks(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the polling task lives exactly as long as the app."""
    task = asyncio.create_task(_poll(app[LIVE]), name="health-checks")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def unready_models(config: Config, healthy: dict[str, bool]) -> list[str]:
    """Models with no healthy target (with no models configured: the backends themselves)."""
    if not config.models:
        return [] if any(healthy.values()) else sorted(config.backends)
    return sorted(
        name
        for name, model in config.models.items()
        if not any(healthy.get(t.backend, False) for t in model.targets)
    )
