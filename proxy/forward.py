"""The chain's upstream phases: plan the order, admit, attempt, relay; retry only before a byte."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from proxy import relay
from proxy.balance import Load, order
from proxy.chain import Call
from proxy.errors import BackendTimeout, BackendUnreachable, Overloaded, ProxyError
from proxy.fleet import request_failed, request_succeeded
from proxy.headers import upstream_headers
from proxy.routing import Plan, Step, Target
from proxy.signals import fresh
from proxy.state import GatewayState
from proxy.tracing import TRACE
from proxy.upstream import Backend, Response, send

Attempt = Callable[[Backend, Target, bool], Awaitable[web.StreamResponse]]

# A backend's answers that another target may do better with: too busy, or a gateway error.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
_SATURATED_S = 1.0  # a backend that answered 429 or 503 is tried after the others this long


class HeadTimeout(Exception):
    """The backend sent no answer's head within `timeouts.head_s`."""


class Retry(Exception):
    """This target cannot serve the request and nothing reached the client: try the next."""

    def __init__(self, reason: str, error: ProxyError) -> None:
        super().__init__(error.message)
        self.reason = reason  # proxy_retries_total: unreachable, timeout, 429, 502, 503, 504
        self.error = error


async def try_plan(call: Call, route: Plan, run: Attempt, key: bytes = b"") -> web.StreamResponse:
    """Serve the request from the first target that answers: the chain as a newcomer reads it.

    For each model of the plan (the requested one, then its fallbacks), its policy orders the
    targets; each is tried once: a free slot is taken, the request sent, the slot given back
    in `finally`. A target that fails before any byte reached the client (unreachable, reset,
    or a 429/502/503/504 answer while other targets remain) passes the request on. When every
    target left is full, the request waits in the deadline-ordered queue for a slot.
    """
    state, loop = call.state, asyncio.get_running_loop()
    failure: ProxyError | None = None  # what the last target that failed said
    # a list, not a set: a plan has a few targets, and a set is 216 bytes for the stream's
    # life; each target goes in once (the loop skips it, the queue waits only for the untried),
    # so its length counts the distinct targets tried
    tried: list[tuple[str, str | None]] = []
    pending = distinct_targets(route)
    while True:
        full: list[tuple[Step, Target]] = []
        # by index, not enumerate: the loops live as long as the stream, and an enumerate
        # holds an object and a tuple more for each
        steps = route.steps
        for index in range(len(steps)):
            step = steps[index]
            ordered, reason = arrange(state, step, key, loop.time())
            for place in range(len(ordered)):
                target = ordered[place]
                if (target.backend, target.upstream_model) in tried:
                    continue
                backend = state.backends[target.backend]
                if not state.admission.take(backend):
                    full.append((step, target))
                    continue
                why = "fallback" if index else reason if place == 0 else "retry"
                tried.append((target.backend, target.upstream_model))
                last = len(tried) == pending
                try:
                    return await attempt(call, route, backend, target, run, why, last)
                except Retry as retry:
                    failure = retry.error
        # a target full in one step may have been tried in a later one: not waited for again
        full = [(s, t) for s, t in full if (t.backend, t.upstream_model) not in tried]
        if not full:
            raise failure or BackendUnreachable("no backend could take the request")
        started = loop.time()
        backends = {state.backends[t.backend].name: state.backends[t.backend] for _, t in full}
        give_up = started + state.config.server.queue_timeout_s
        backend = await state.admission.wait(backends.values(), call.deadline, give_up)
        state.metrics.queue_wait[route.model_label,].observe(loop.time() - started)
        step, target = next((s, t) for s, t in full if t.backend == backend.name)
        tried.append((target.backend, target.upstream_model))
        try:
            last = len(tried) == pending
            return await attempt(call, route, backend, target, run, "queued", last)
        except Retry as retry:
            failure = retry.error


def arrange(
    state: GatewayState, step: Step, key: bytes, now: float
) -> tuple[Sequence[Target], str]:
    """The step's targets in the order to try them, and why the first one leads (its policy
    over a snapshot of their backends; `key`: the request's `affinity` key, or b"")."""
    if len(step.candidates) == 1:  # what `order` says of one, without a snapshot
        return step.candidates, "only"
    loads = snapshot(state, step.candidates, now)
    routing = state.config.routing
    placed = None
    if key and step.policy == "affinity":  # where the index has the key, for this model
        index = state.prefix_index
        factor = routing.key_load_factor
        placed = index.affinity(step.model, key, step.candidates, loads, factor, now)
    return order(step.policy, step.candidates, loads, state.rng, placed, routing.load_factor)


def distinct_targets(route: Plan) -> int:
    """How many different targets (backend and upstream model) the plan can try."""
    steps = route.steps
    if len(steps) == 1 and len(steps[0].candidates) == 1:
        return 1
    return len({(t.backend, t.upstream_model) for step in steps for t in step.candidates})


async def attempt(
    call: Call, route: Plan, backend: Backend, target: Target, run: Attempt, why: str, last: bool
) -> web.StreamResponse:
    """One try on one target whose slot is held; the slot is given back on every way out,
    and the backend's health learns how it went."""
    state, ex = call.state, call.ex
    m, now = state.metrics, asyncio.get_running_loop().time
    ex.backend = backend.name
    ex.tries.append(backend.name)
    m.decisions[route.model_label, backend.name, why] += 1
    health = state.fleet[backend.name]
    outlier = state.config.outlier_detection
    try:
        response = await (
            run(backend, target, not last)
            if state.tracer is None
            else call.request[TRACE].attempt(run, backend, target, not last, why)
        )
    except Retry as retry:
        ex.tries[-1] = f"{backend.name}:{retry.reason}"
        m.retries[route.model_label, retry.reason] += 1
        m.upstream_error(backend.name, retry.error.type)
        if retry.reason in ("429", "503"):
            state.saturated[backend.name] = now() + _SATURATED_S
        elif request_failed(health, outlier, now()):
            m.ejections[backend.name] += 1
        raise
    except BackendUnreachable as err:  # the last target: no retry left
        m.upstream_error(backend.name, err.type)
        if request_failed(health, outlier, now()):
            m.ejections[backend.name] += 1
        raise
    except BackendTimeout as err:
        m.upstream_error(backend.name, err.type)
        raise
    finally:
        state.admission.give_back(backend)
    if ex.status in (429, 503):  # shedding load, not failing: last for a while, not ejected
        state.saturated[backend.name] = now() + _SATURATED_S
    elif ex.status >= 500 or ex.stream_error == "backend_unreachable":
        if request_failed(health, outlier, now()):
            m.ejections[backend.name] += 1
    else:
        request_succeeded(health)
    return response


def snapshot(state: GatewayState, targets: tuple[Target, ...], now: float) -> dict[str, Load]:
    """What routing needs to know of each target's backend at this instant."""
    interval = state.config.health.interval_s
    backends, fleet, signals, saturated = (
        state.backends,
        state.fleet,
        state.signals,
        state.saturated,
    )
    loads = {}
    for t in targets:
        name = t.backend
        backend = backends[name]
        healthy = fleet[name].up(now)
        up = healthy and not saturated.get(name, 0.0) > now  # it answered 429 or 503 lately
        own = fresh(signals.get(name), now, interval)
        queued, kv = ((own.queued or 0.0), (own.kv or 0.0)) if own is not None else (0.0, 0.0)
        loads[name] = Load(backend.in_flight, backend.config.max_in_flight, up, queued, kv, healthy)
    return loads


async def exchange(
    call: Call, backend: Backend, path: str, body: bytes | None, may_retry: bool = False
) -> web.StreamResponse:
    """One backend, one try: send, relay; the upstream response is closed on every way out.

    With `may_retry`, a failure before any byte reached the client, or an answer in
    RETRY_STATUSES, raises `Retry` instead (the answer is not relayed).
    """
    request, state, ex, deadline = call.request, call.state, call.ex, call.deadline
    trace = request[TRACE].upstream() if state.tracer is not None else b""
    attempt = UpstreamTry(call, backend, may_retry)
    try:
        async with state.deadlines.at(deadline):
            # the request line's target and headers made in the call: no local of this frame,
            # which lives as long as the stream, holds their bytes once they went out
            upstream = await attempt.send(
                request.method,
                backend.target(path, request.raw_path.partition("?")[2]),
                upstream_headers(request.raw_headers, request_id=ex.request_id, trace=trace),
                body,
            )
            attempt.response, attempt.complete = await relay.start(request, upstream, ex)
            if not attempt.complete:
                idle_s = state.config.timeouts.idle_s
                attempt.complete = await relay.pump(
                    request, upstream, attempt.response, ex, deadline, idle_s, state.deadlines
                )
    except (TimeoutError, HeadTimeout, BackendUnreachable) as exc:
        response, err = attempt.broken(exc)
        await relay.end_with_error(request, response, err, ex)
    finally:
        attempt.settle()
    assert attempt.response is not None
    return attempt.response


class UpstreamTry:
    """One try on one backend: what it has sent back so far, and how it ends."""

    __slots__ = (
        "answered",
        "backend",
        "complete",
        "head_s",
        "may_retry",
        "response",
        "state",
        "upstream",
    )

    def __init__(self, call: Call, backend: Backend, may_retry: bool = False) -> None:
        self.state = call.state
        self.backend = backend
        self.may_retry = may_retry
        # a non-streamed answer's head comes only when its generation is done: no head timeout
        self.head_s = self.state.config.timeouts.head_s if call.stream else None
        self.answered = False  # the backend sent its answer's head: it has done the work
        self.upstream: Response | None = None
        self.response: web.StreamResponse | None = None
        self.complete = False

    async def send(
        self, method: str, target: bytes, headers: bytes, body: bytes | None
    ) -> Response:
        """Send the request and wait for the answer's head (for at most `timeouts.head_s`).

        An answer another target may do better with is not relayed while one remains.
        """
        if self.head_s is None:
            self.upstream = upstream = await send(self.backend, method, target, headers, body)
        else:
            head_by = asyncio.get_running_loop().time() + self.head_s
            try:
                async with self.state.deadlines.at(head_by):
                    self.upstream = upstream = await send(
                        self.backend, method, target, headers, body
                    )
            except TimeoutError:  # this one's own: the request's deadline comes as a cancel
                raise HeadTimeout from None
        self.answered = True
        if self.may_retry and upstream.status in RETRY_STATUSES:
            raise Retry(str(upstream.status), backend_status_error(self.backend, upstream.status))
        return upstream

    def broken(self, exc: Exception) -> tuple[web.StreamResponse, ProxyError]:
        """A failure during the try: raised as is while the client has nothing yet (so the
        next target may serve it); else the error its stream must end with, counted."""
        if self.response is None:
            if isinstance(exc, TimeoutError):
                raise timed_out(self.backend) from None
            if isinstance(exc, HeadTimeout):
                slow = BackendTimeout(
                    f"backend '{self.backend.name}' sent no answer within timeouts.head_s"
                )
                if self.may_retry:
                    raise Retry("timeout", slow) from None
                raise slow from None
            if self.may_retry and not self.answered and isinstance(exc, BackendUnreachable):
                raise Retry("unreachable", exc) from None  # it never answered: safe to pass on
            raise exc
        err = (
            BackendTimeout(
                f"backend '{self.backend.name}' stream stalled or ran past the request's deadline"
            )
            if isinstance(exc, TimeoutError)
            else exc
        )
        assert isinstance(err, ProxyError)
        self.state.metrics.upstream_error(self.backend.name, err.type)
        return self.response, err

    def settle(self) -> None:
        """Give a finished upstream connection back to the pool; close any other one, so the
        backend sees its connection close and stops generating."""
        if self.upstream is not None:
            if self.complete:
                self.upstream.release()
            else:
                self.upstream.close()


def backend_status_error(backend: Backend, status: int) -> ProxyError:
    """What the client gets when every target answered with a retryable status."""
    if status in (429, 503):
        return Overloaded(f"backend '{backend.name}' is overloaded (it answered {status})")
    if status == 504:
        return BackendTimeout(f"backend '{backend.name}' answered 504")
    return BackendUnreachable(f"backend '{backend.name}' answered {status}")


def timed_out(backend: Backend) -> BackendTimeout:
    """The error for a deadline that passed before the backend answered."""
    return BackendTimeout(f"backend '{backend.name}' did not answer within the request's deadline")
