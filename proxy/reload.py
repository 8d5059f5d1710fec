"""Reload: a new config, checked, put in force beside the old one without dropping a request.

`successor` builds the next `GatewayState` from a checked config, carrying over what still
holds. A backend whose settings did not change keeps its `Backend` (its pool of connections
and its in-flight count, which `least_loaded` and `max_in_flight` read), its health and its
load signals; the metrics, access log, client guard and admission queue belong to the gateway,
not to a config. The `server` section is the listener's, and the tracer (`tracing`) the app's:
a change there applies at the next restart, and the reload says so. Requests in flight keep the
state they began with and finish on it; a backend that left the config (or changed) is closed
once its last request is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from proxy.auth import KeySet
from proxy.config import BackendConfig, Config, ConfigError
from proxy.health import check_all
from proxy.notify import notify
from proxy.prefix_index import AgreedIndex, PrefixIndex
from proxy.state import GatewayState, Live
from proxy.tls import server_context
from proxy.upstream import Backend

logger = logging.getLogger("proxy")

_RETIRE_POLL_S = 0.1


@dataclass(frozen=True)
class Changes:
    """What a new config changes, by name."""

    models_added: tuple[str, ...] = ()
    models_removed: tuple[str, ...] = ()
    backends_added: tuple[str, ...] = ()
    backends_removed: tuple[str, ...] = ()
    backends_changed: tuple[str, ...] = ()
    restart_only: tuple[str, ...] = ()  # server.* keys (and tracing) that differ: at a restart

    def summary(self) -> str:
        """One line for the log: every non-empty list, or that nothing changed."""
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("models added", self.models_added),
                ("models removed", self.models_removed),
                ("backends added", self.backends_added),
                ("backends removed", self.backends_removed),
                ("backends changed", self.backends_changed),
            )
            if names
        ]
        return "; ".join(parts) or "no model or backend changed"


def changes(old: Config, new: Config) -> Changes:
    """The difference between two checked configs, by model, backend and server key."""
    kept = [n for n in old.backends if n in new.backends]
    server_keys = msgspec.structs.fields(old.server)
    return Changes(
        models_added=tuple(n for n in new.models if n not in old.models),
        models_removed=tuple(n for n in old.models if n not in new.models),
        backends_added=tuple(n for n in new.backends if n not in old.backends),
        backends_removed=tuple(n for n in old.backends if n not in new.backends),
        backends_changed=tuple(n for n in kept if _backend_key(old, n) != _backend_key(new, n)),
        restart_only=tuple(
            f"server.{f.name}"
            for f in server_keys
            if getattr(old.server, f.name) != getattr(new.server, f.name)
        )
        + (("tracing",) if old.tracing != new.tracing else ()),
    )


def _backend_key(config: Config, name: str) -> tuple[BackendConfig, float]:
    """What a `Backend` is built from: its own section and the connect timeout."""
    return config.backends[name], config.timeouts.connect_s


def successor(
    old: GatewayState, config: Config, environ: Mapping[str, str]
) -> tuple[GatewayState, list[Backend]]:
    """The state for `config` (its `server` section replaced by the one in force), and the
    old state's backends it no longer uses, to retire once its requests are done.

    A backend keeps its `Backend` (connections, in-flight count) unless what its connections
    are made from changed (url, key, pool settings, CA, connect timeout); other settings
    (max_in_flight, kind, serves, health path) apply to it in place. Its health and load
    signals carry over unless what they describe changed (url, kind, health path).
    """
    config = msgspec.structs.replace(config, server=old.config.server)
    new = GatewayState(
        config,
        KeySet.from_env(environ.get(config.auth.keys_env)),
        {},
        old.metrics,
        old.access_log,
    )
    new.clients, new.admission, new.rng = old.clients, old.admission, old.rng
    new.started_at, new.known_models = old.started_at, old.known_models
    new.managed, new.admin = old.managed, old.admin  # auth.store: a change waits for a restart
    new.usage_tally = old.usage_tally  # usage not yet written goes on being summed
    new.tracer = old.tracer  # the app's, for its life: a change of `tracing` waits for a restart
    if _same_index(old, config, new.prefix_index):
        new.prefix_index = old.prefix_index  # where keys were placed: their caches stay warm
    for name, backend_config in config.backends.items():
        kept = old.backends.get(name)
        if kept is not None and _pool_key(old.config, name) == _pool_key(config, name):
            kept.config = backend_config
            new.backends[name] = kept
        else:
            key = environ.get(backend_config.api_key_env) if backend_config.api_key_env else None
            new.backends[name] = Backend(name, backend_config, key, config.timeouts.connect_s)
        was = old.config.backends.get(name)
        if was is not None and _health_key(was) == _health_key(backend_config):
            new.fleet[name] = old.fleet[name]
            if name in old.signals:
                new.signals[name] = old.signals[name]
            if name in old.saturated:
                new.saturated[name] = old.saturated[name]
    gone = [b for name, b in old.backends.items() if new.backends.get(name) is not b]
    return new, gone


def _pool_key(config: Config, name: str) -> tuple[object, ...]:
    """What a backend's connections are made from."""
    b = config.backends[name]
    return (
        b.url,
        b.api_key_env,
        b.keepalive_s,
        b.max_connections,
        b.ca_file,
        config.timeouts.connect_s,
    )


def _health_key(backend: BackendConfig) -> tuple[object, ...]:
    """What a backend's health and load signals describe."""
    return backend.url, backend.kind, backend.health_path


async def retire(old: GatewayState, backends: Iterable[Backend], limit_s: float) -> None:
    """Close backends the new state does not use once no request that began on the `old`
    state is left (one might still retry or fall back to them) and none is in flight on
    them, or after `limit_s`."""
    waiting = list(backends)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                while old.active or any(b.in_flight for b in waiting):  # noqa: ASYNC110
                    await asyncio.sleep(_RETIRE_POLL_S)
    finally:  # the gateway stopping cancels this: the backends close all the same
        for backend in waiting:
            if backend.in_flight:
                logger.warning(
                    "backend %s left the config; closing it with %d request(s) still on it",
                    backend.name,
                    backend.in_flight,
                )
            backend.close()


def renew_certificate(live: Live, config: Config) -> bool:
    """Load `server.tls`'s files again into the listening socket's context when the paths
    are the ones in force (a renewed certificate; new paths wait for a restart), so new
    handshakes use them; whether it did. Bad files raise ConfigError, the old ones stay."""
    tls, now = config.server.tls, live.state.config.server.tls
    if live.tls is None or tls is None or tls != now:
        return False
    server_context(tls)  # every file checked first, each error naming its key
    live.tls.load_cert_chain(tls.cert_file, tls.key_file)
    logger.info("reload: new TLS handshakes use %s as it is now", tls.cert_file)
    return True


async def apply(live: Live, config: Config, environ: Mapping[str, str]) -> Changes:
    """Put a checked config in force: backends with no health yet are probed first, as many
    times as `health.healthy_threshold` asks (so a model they serve is served at once), then
    new requests get the new state; the old backends that left are retired in the
    background."""
    old = live.state
    new, gone = successor(old, config, environ)
    if any(name not in old.fleet or new.fleet[name] is not old.fleet[name] for name in new.fleet):
        for _ in range(config.health.healthy_threshold):  # enough passes to bring them up
            await check_all(new)
    live.state = new
    task = asyncio.create_task(
        retire(old, gone, old.config.timeouts.max_request_s), name="retire-backends"
    )
    live.tasks.add(task)
    task.add_done_callback(live.tasks.discard)
    diff = changes(old.config, config)
    for key in diff.restart_only:
        logger.warning("reload: %s changed; it applies at the next restart", key)
    return diff


class Reloader:
    """SIGHUP's handler: one reload at a time; a signal during one runs one more after it.

    systemd hears `RELOADING=1` as the reload starts and `READY=1` once it is over, and a
    `STATUS=` line saying whether the new file is in force or, with its errors logged, the
    old one still serves.
    """

    def __init__(
        self,
        live: Live,
        load: Callable[[], Config],
        source: str,
        environ: Mapping[str, str],
    ) -> None:
        self.live = live
        self.load = load  # reads and checks the file; raises ConfigError
        self.source = source
        self.environ = environ
        self.running: asyncio.Task[None] | None = None
        self.again = False

    def requested(self) -> None:
        """The signal arrived (called on the loop)."""
        if self.running is not None:
            self.again = True
            return
        self.running = asyncio.create_task(self._run(), name="reload")

    async def _run(self) -> None:
        try:
            while True:
                self.again = False
                await self.once()
                if not self.again:
                    return
        finally:
            self.running = None

    async def once(self) -> bool:
        """Read, check and apply the file once; whether it is now in force."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify(self.environ, "RELOADING=1", f"MONOTONIC_USEC={usec}")
        try:
            config = self.load()
            renew_certificate(self.live, config)
            diff = await apply(self.live, config, self.environ)
        except ConfigError as exc:
            for error in exc.errors:
                logger.error("reload: %s: %s", self.source, error)
            status = (
                f"reload failed: {len(exc.errors)} error(s) in {self.source} (see the log); "
                "the previous config still serves"
            )
            logger.error("%s", status)
            notify(self.environ, "READY=1", f"STATUS={status}")
            return False
        except Exception:  # a bug must not leave systemd waiting for READY=1
            logger.exception(
                "reload: %s could not be applied; the previous config serves", self.source
            )
            notify(self.environ, "READY=1", "STATUS=reload failed (see the log)")
            return False
        logger.info("reload: %s is in force (%s)", self.source, diff.summary())
        notify(self.environ, "READY=1", f"STATUS=reloaded {self.source}: {diff.summary()}")
        return True


def _same_index(old: GatewayState, config: Config, fresh: PrefixIndex | AgreedIndex) -> bool:
    """Whether the old state's index serves the new config: the same size and placement
    (and, for `agreed`, whose matchings hold their bound, the same `key_load_factor`)."""
    was, now = old.config.routing, config.routing
    return (
        was.prefix_index_size == now.prefix_index_size
        and type(old.prefix_index) is type(fresh)
        and (isinstance(fresh, PrefixIndex) or was.key_load_factor == now.key_load_factor)
    )
