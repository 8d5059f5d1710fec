"""Everything a running gateway holds, kept on the app under one key."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.accounting import UsageTally
from proxy.admission import Admission
from proxy.auth import KeySet
from proxy.config import Config
from proxy.deadlines import Deadlines
from proxy.fleet import BackendHealth
from proxy.keys import ManagedKeys
from proxy.listener import GuardedServer
from proxy.metrics import Metrics
from proxy.prefix_index import AgreedIndex, PrefixIndex, index_for
from proxy.routing import Plan, plan
from proxy.signals import Signals
from proxy.stream_usage import asks_stream_usage
from proxy.upstream import Backend

if TYPE_CHECKING:
    from proxy.tracing_sdk import Tracing


class GatewayState:
    """The config in force and the long-lived resources built from it."""

    def __init__(
        self,
        config: Config,
        keys: KeySet,
        backends: dict[str, Backend],
        metrics: Metrics,
        access_log: AccessLog,
    ) -> None:
        self.config = config
        self.keys = keys
        self.backends = backends
        self.metrics = metrics
        self.access_log = access_log
        self.rng = random.Random()  # noqa: S311  (load spreading, not security)
        self.started_at = int(time.time())
        self.open_paths = frozenset(config.auth.open_paths)
        self.stream_usage = asks_stream_usage(config)  # usage.streams, in force for this config
        self.max_body = int(config.server.max_body_mb * 1024 * 1024)
        # Model ids the backends listed (no-models mode): the only ones used as metric labels.
        self.known_models: set[str] = set()
        # The server guarding client connections, once the gateway listens.
        self.clients: GuardedServer | None = None
        self.fleet = {name: BackendHealth() for name in config.backends}
        self.admission = Admission(config.server.max_queue)
        self.deadlines = Deadlines()  # the requests' deadlines, on one timer
        # Backends that answered 429 or 503 lately are tried last until this loop time.
        self.saturated: dict[str, float] = {}
        # Where `affinity` placed each key lately (bounded: routing.prefix_index_size).
        self.prefix_index: PrefixIndex | AgreedIndex = index_for(config)
        # The backends' own load, from their /metrics, scraped beside the health checks.
        self.signals: dict[str, Signals] = {}
        # Managed keys (auth.store), in memory and kept fresh; None when no store is set.
        self.managed: ManagedKeys | None = None
        # Per-key usage until it is written to that store; None when there is no store.
        self.usage_tally: UsageTally | None = None
        # SHA-256 of the admin key (auth.admin_key_env); None: the admin API is off (404).
        self.admin: bytes | None = None
        # The tracer (`tracing`), once the app has started it; None: tracing is off.
        self.tracer: Tracing | None = None
        # Requests that began on this state and have not ended (a reload retires the old
        # state's backends only once this is 0).
        self.active = 0
        self._plans: dict[str, Plan] = {}  # see `plan`
        self._plans_known = self.known_models  # the lists the plans were made with

    def plan(self, model: str) -> Plan:
        """`routing.plan` for this config, made once per model the config names or, with
        none named, per model the backends list (those plans are made again when the lists
        change); a name neither lists is planned each time (clients choose those)."""
        if self._plans_known is not self.known_models:  # a discovery replaced the lists
            self._plans_known = self.known_models
            if not self.config.models:
                self._plans = {}
        made = self._plans.get(model)
        if made is None:
            made = plan(self.config, model, self.known_models)
            if model in self.config.models or model in self.known_models:
                self._plans[model] = made
        return made

    def healthy(self, now: float) -> dict[str, bool]:
        """Each backend: probed up and not ejected, at `now` (monotonic)."""
        return {name: health.up(now) for name, health in self.fleet.items()}


class Live:
    """The state in force, which a reload replaces (a request keeps the one it began with),
    and whether the gateway is draining (stopping: `/ready` says so at once)."""

    __slots__ = ("draining", "state", "tasks", "tls")

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.draining = False
        self.tasks: set[asyncio.Task[None]] = set()  # backends a reload retires
        self.tls: ssl.SSLContext | None = None  # the listening socket's, once it listens


LIVE: web.AppKey[Live] = web.AppKey("live", Live)
# The state a request began with, set by the middleware before anything else reads it.
STATE: web.RequestKey[GatewayState] = web.RequestKey("state", GatewayState)
