"""The limit phase: a request's key and model limits, checked before it goes upstream and
settled when it ends. [I/O glue]

Where the buckets live:
- No Redis (static keys, or a SQLite `auth.store`): in this process. With `server.workers: N`
  each worker holds 1/N of every limit (it cannot see the others' counts), never N times it.
- `auth.store: redis://...`: in Redis, one atomic script per check (`proxy.ratelimit_redis`), so
  every worker of every host draws on one limit. A call to Redis waits at most
  `auth.redis_timeout_s`; `threshold` failures in a row open the breaker, and then each worker
  enforces its share of the limit alone (1 / (`auth.hosts` x workers)), said by
  `proxy_limits_degraded` and one log line, while a background probe asks Redis every
  `probe_s`. When Redis answers again, what was spent meanwhile is charged to it (and the
  refunds and ends of requests it missed are applied) before it is trusted again.

The hot path never awaits anything but the check itself: refunds, charges and ends of
requests on Redis are queued and sent in batches by the flusher task.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from aiohttp import web

from proxy.auth import ANONYMOUS, Principal
from proxy.breaker import Breaker
from proxy.chain import Call
from proxy.config import AuthConfig, Config
from proxy.errors import RateLimitExceeded
from proxy.limits import (
    NO_LIMITS,
    Limits,
    LocalLimits,
    Rule,
    Verdict,
    headers,
    message,
    retry_after,
    rules_for,
)
from proxy.metrics import Metrics
from proxy.middleware import EXCHANGE
from proxy.ratelimit_redis import Adjust, Leave, RedisLimits
from proxy.resp import RespError
from proxy.usage import Usage

logger = logging.getLogger("proxy")

STORE_ERRORS = (RespError, OSError, TimeoutError)  # what a call to Redis may fail with
FAILURES_TO_OPEN = 3  # Redis calls failing in a row before each host goes on alone
PROBE_S = 0.25  # how often an open breaker asks Redis whether it answers again
BATCH = 256  # settlements sent in one script call
MAX_PENDING = 100_000  # settlements kept while Redis is away (the oldest go first)
IN_FLIGHT_MARGIN_S = 5.0  # a slot in Redis outlives its request's deadline by this much
PRUNE_EVERY = 4096  # local checks between two sweeps of full buckets


class Grant:
    """What one admitted request holds: the rules it was charged under, and where."""

    __slots__ = ("degraded", "member", "rules", "shared")

    def __init__(self, rules: tuple[Rule, ...], member: str, shared: bool, degraded: bool) -> None:
        self.rules = rules
        self.member = member  # its id in the Redis in-flight sets
        self.shared = shared  # charged in Redis (else in this process)
        self.degraded = degraded  # charged here while Redis was away: Redis learns it later


class Limiter:
    """The buckets of this process, the Redis ones when configured, and the breaker."""

    def __init__(
        self,
        *,
        workers: int = 1,
        hosts: int = 1,
        store: RedisLimits | None = None,
        timeout_s: float = 0.05,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = LocalLimits()
        self.local_share = 1.0 / max(1, workers)
        self.degraded_share = self.local_share / max(1, hosts)
        self.hosts = hosts
        self.store = store
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.clock = clock
        self.breaker = Breaker(FAILURES_TO_OPEN, PROBE_S)
        self.pending: deque[Adjust | Leave] = deque(maxlen=MAX_PENDING)
        self.spent: dict[tuple[str, int], float] = {}  # (bucket, limit) -> charged while away
        self.wake = asyncio.Event()  # settlements are waiting
        self.opened = asyncio.Event()  # the breaker is open: the prober has work
        self._host = secrets.token_hex(6)
        self._ids = itertools.count()
        self._checks = 0
        self._sending = 0  # settlement batches on their way to Redis

    @property
    def settled(self) -> bool:
        """Nothing is waiting to be sent to Redis, nor on its way (for tests and drains)."""
        return not self.pending and not self._sending

    @property
    def degraded(self) -> bool:
        """Redis is configured but not trusted now: each host counts on its own."""
        return self.store is not None and not self.breaker.closed

    async def admit(
        self,
        key: str | None,
        key_limits: Limits,
        model: str | None,
        model_limits: Limits,
        body_bytes: int,
        ttl_s: float,
    ) -> tuple[Verdict, Grant] | None:
        """Check a request against its limits (None: no limit applies to it).

        A check that fails while the breaker is still closed is decided here instead, and not
        charged to Redis later: it most likely reached Redis, which counted it.
        """
        resync = self.store is not None and not self.breaker.closed
        if not resync and self.store is not None:
            rules = rules_for(key, key_limits, model, model_limits, body_bytes)
            if not rules:
                return None
            member = f"{self._host}:{next(self._ids):x}"
            try:
                async with asyncio.timeout(self.timeout_s):
                    verdict = await self.store.check(rules, member, ttl_s + IN_FLIGHT_MARGIN_S)
            except STORE_ERRORS as exc:
                self._failed("check", exc)
            else:
                self.breaker.succeeded()
                return verdict, Grant(rules, member, shared=True, degraded=False)
        share = self.local_share if self.store is None else self.degraded_share
        rules = rules_for(key, key_limits, model, model_limits, body_bytes, share)
        if not rules:
            return None
        now = self.clock()
        verdict = self.local.check(rules, now)
        self._checks += 1
        if self._checks % PRUNE_EVERY == 0:
            self.local.prune(now)
        if verdict.allowed and resync:
            for rule in rules:
                if rule.kind != "in_flight":
                    self._charge_shared(rule, rule.cost)
        return verdict, Grant(rules, "", shared=False, degraded=resync)

    def settle(self, grant: Grant, usage: Usage | None, answered: bool) -> None:
        """The request ended: free its slots in flight, and correct its token estimate by what
        the backend reported (a refund of the whole estimate when no backend answered)."""
        now = self.clock()
        ops: list[Adjust | Leave] = []
        for rule in grant.rules:
            if rule.kind == "in_flight":
                if grant.shared:
                    ops.append(Leave(rule.bucket, grant.member))
                continue
            if rule.kind != "tokens":
                continue
            if usage is not None:
                delta = usage.prompt + usage.completion - rule.cost
            elif not answered:
                delta = -rule.cost
            else:
                continue  # an answer without usage: the estimate stands
            if not delta:
                continue
            if grant.shared:
                ops.append(Adjust(rule.bucket, rule.full, delta))
            else:
                self.local.adjust(rule, delta, now)
                if grant.degraded:
                    self._charge_shared(rule, delta)
        if not grant.shared:
            self.local.release(grant.rules)
        if ops:
            self.pending.extend(ops)
            self.wake.set()

    def _charge_shared(self, rule: Rule, amount: float) -> None:
        """Spent here while Redis was away: Redis is charged when it answers again."""
        if self.breaker.closed:
            self.pending.append(Adjust(rule.bucket, rule.full, amount))
            self.wake.set()
        else:
            where = (rule.bucket, rule.full)
            self.spent[where] = self.spent.get(where, 0.0) + amount

    def _failed(self, op: str, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.store_errors[op] += 1
        if self.breaker.failed(self.clock()):
            self.opened.set()
            logger.warning(
                "rate limits: Redis failed %d calls in a row (last: %s on %s); each worker now "
                "enforces %s of every limit on its own until Redis answers again",
                FAILURES_TO_OPEN,
                type(exc).__name__,
                op,
                _fraction(self.degraded_share),
            )

    async def running(self) -> AsyncIterator[None]:
        """The cleanup context: Redis asked once at start, then the flusher and the prober."""
        if self.store is None:
            yield
            return
        try:
            async with asyncio.timeout(max(self.timeout_s, 2.0)):  # not on a request's path
                await self.store.warm()
        except STORE_ERRORS as exc:
            if self.metrics is not None:
                self.metrics.store_errors["probe"] += 1
            self.breaker.open(self.clock())
            self.opened.set()
            logger.warning(
                "rate limits: Redis does not answer at start (%s); each worker enforces %s of "
                "every limit on its own until it does",
                type(exc).__name__,
                _fraction(self.degraded_share),
            )
        tasks = [asyncio.create_task(self._flushing()), asyncio.create_task(self._probing())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.breaker.closed and self.pending:  # the last settlements, if Redis is there
                with contextlib.suppress(*STORE_ERRORS):
                    await self._send(list(self.pending))
            await self.store.close()

    async def _send(self, ops: list[Adjust | Leave]) -> None:
        assert self.store is not None
        self._sending += 1
        try:
            for start in range(0, len(ops), BATCH):
                async with asyncio.timeout(self.timeout_s):
                    await self.store.settle(ops[start : start + BATCH])
        finally:
            self._sending -= 1

    async def _flushing(self) -> None:
        """Send queued settlements while the breaker is closed."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending and self.breaker.closed:
                batch = [self.pending.popleft() for _ in range(min(BATCH, len(self.pending)))]
                try:
                    await self._send(batch)
                except STORE_ERRORS as exc:
                    self.pending.extendleft(reversed(batch))
                    self._failed("settle", exc)
                    break
                self.breaker.succeeded()

    async def _probing(self) -> None:
        """While the breaker is open: ask Redis every PROBE_S; once it answers, resynchronise
        (charge what was spent here, send what was queued), then close the breaker."""
        while True:
            await self.opened.wait()
            await asyncio.sleep(self.breaker.probe_s)
            if not self.breaker.probe_due(self.clock()):
                continue
            ok = await self._resync()
            if self.breaker.probed(ok, self.clock()):
                self.opened.clear()
                self.wake.set()
                logger.warning(
                    "rate limits: Redis answers again; limits are shared across hosts again "
                    "(what each host spent meanwhile is charged to it)"
                )

    async def _resync(self) -> bool:
        """Whether Redis answered and took everything spent and queued while it was away."""
        assert self.store is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.store.ping()
            while self.spent or self.pending:
                spent, self.spent = self.spent, {}
                ops: list[Adjust | Leave] = [Adjust(b, limit, d) for (b, limit), d in spent.items()]
                ops.extend(self.pending)
                self.pending.clear()
                try:
                    await self._send(ops)
                except STORE_ERRORS:
                    for op in ops:  # back where they were, for the next probe
                        if isinstance(op, Adjust) and (op.bucket, op.limit) in spent:
                            where = (op.bucket, op.limit)
                            self.spent[where] = self.spent.get(where, 0.0) + op.delta
                        else:
                            self.pending.append(op)
                    raise
        except STORE_ERRORS:
            if self.metrics is not None:
                self.metrics.store_errors["probe"] += 1
            return False
        return True


def _fraction(share: float) -> str:
    return "all" if share >= 1 else f"1/{round(1 / share)}"


LIMITER: web.AppKey[Limiter] = web.AppKey("limiter", Limiter)


def limiter_for(config: Config, metrics: Metrics, workers: int) -> Limiter:
    """The limiter a gateway with `config` runs (Redis when `auth.store` is a redis:// URL)."""
    auth = config.auth
    store = None
    if auth.store is not None and auth.store.startswith(("redis://", "rediss://")):
        store = RedisLimits(auth.store)
    limiter = Limiter(
        workers=workers,
        hosts=auth.hosts,
        store=store,
        timeout_s=auth.redis_timeout_s,
        metrics=metrics,
    )
    metrics.limits_degraded = lambda: int(limiter.degraded)
    return limiter


def key_limits(principal: Principal | None, auth: AuthConfig) -> tuple[str | None, Limits]:
    """The caller's key id and its limits: its own, else `auth.default_limits`'s (none for
    the anonymous caller of a gateway with auth off)."""
    if principal is None or principal is ANONYMOUS:
        return None, NO_LIMITS
    d = auth.default_limits
    if d is None:
        if principal.rpm is None and principal.tpm is None and principal.max_in_flight is None:
            return principal.key_id, NO_LIMITS
        return principal.key_id, Limits(
            rpm=principal.rpm, tpm=principal.tpm, max_in_flight=principal.max_in_flight
        )
    return principal.key_id, Limits(
        rpm=d.rpm if principal.rpm is None else principal.rpm,
        tpm=d.tpm if principal.tpm is None else principal.tpm,
        max_in_flight=(
            d.max_in_flight if principal.max_in_flight is None else principal.max_in_flight
        ),
    )


class limited:  # lower case: read as a phase of the chain, `async with limited(call, model)`
    """The limit phase around the upstream phases: checked on entry (a 429 when a limit
    refuses), settled on every way out (slots in flight freed, the token estimate corrected)."""

    __slots__ = ("call", "grant", "limiter", "model")

    def __init__(self, call: Call, model: str) -> None:
        self.call = call
        self.model = model
        self.grant: Grant | None = None
        self.limiter = call.request.app[LIMITER]

    async def __aenter__(self) -> None:
        call = self.call
        config = call.state.config
        key, own = key_limits(call.ex.principal, config.auth)
        entry = config.models.get(self.model)
        model_limits = NO_LIMITS if entry is None or entry.limits is None else entry.limits
        if own is NO_LIMITS and model_limits is NO_LIMITS:
            return  # the common case, at the cost of two lookups
        ttl = call.deadline - asyncio.get_running_loop().time()
        decided = await self.limiter.admit(
            key,
            own,
            self.model if model_limits is not NO_LIMITS else None,
            model_limits,
            len(call.body),
            ttl,
        )
        if decided is None:
            return
        verdict, grant = decided
        call.ex.limit_headers = headers(verdict)
        if not verdict.allowed:
            assert verdict.denied_by is not None
            metrics = call.state.metrics
            metrics.rate_limited[call.ex.model_label, verdict.denied_by.kind] += 1
            raise RateLimitExceeded(message(verdict), retry_after=retry_after(verdict))
        self.grant = grant

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.grant is not None:
            ex = self.call.ex
            self.limiter.settle(self.grant, ex.usage, answered=ex.first_byte_at is not None)


async def add_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the request's x-ratelimit-* headers go out with any answer's
    head (a stream's too, before its first byte), whoever built the response."""
    ex = request.get(EXCHANGE)  # every request the middleware saw has one
    extra = ex.limit_headers if ex is not None else None
    if extra:
        response.headers.update(extra)
