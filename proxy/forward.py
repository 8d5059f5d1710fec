"""The chain's upstream phases: admit, send, relay; fall back only before the first byte."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy import relay
from proxy.errors import BackendTimeout, BackendUnreachable, Overloaded, ProxyError
from proxy.exchange import Exchange
from proxy.headers import upstream_headers
from proxy.routing import Target
from proxy.state import GatewayState
from proxy.upstream import Backend, Response, send
from proxy.view import replace_model

Attempt = Callable[[Backend, Target], Awaitable[web.StreamResponse]]


async def try_targets(
    state: GatewayState, ex: Exchange, attempts: tuple[Target, ...], run: Attempt
) -> web.StreamResponse:
    """Run `run` on each target in turn until one answers.

    A target at its `max_in_flight`, or one that could not be reached before any byte went
    to the client, passes the request on to the next; a deadline that ran out does not.
    """
    failure: ProxyError = BackendUnreachable("no backend could take the request")
    for target in attempts:
        backend = state.backends[target.backend]
        limit = backend.config.max_in_flight
        if limit is not None and backend.in_flight >= limit:
            failure = Overloaded(
                f"backend '{backend.name}' is at its limit of {limit} requests in flight",
                retry_after=1,
            )
            state.metrics.upstream_error(backend.name, failure.type)
            continue
        ex.backend = backend.name
        backend.in_flight += 1
        try:
            return await run(backend, target)
        except BackendUnreachable as err:
            state.metrics.upstream_error(backend.name, err.type)
            failure = err
        except BackendTimeout as err:
            state.metrics.upstream_error(backend.name, err.type)
            raise
        finally:
            backend.in_flight -= 1
    raise failure


async def forward(
    request: web.Request,
    state: GatewayState,
    ex: Exchange,
    attempts: tuple[Target, ...],
    path: str,
    body: bytes | None,
    deadline: float,
) -> web.StreamResponse:
    """Forward the body as received (only `model` rewritten where a target says so)."""

    async def run(backend: Backend, target: Target) -> web.StreamResponse:
        payload = body
        if body is not None and target.upstream_model is not None:
            payload = replace_model(body, target.upstream_model)
        return await exchange(request, state, ex, backend, path, payload, deadline)

    return await try_targets(state, ex, attempts, run)


async def exchange(
    request: web.Request,
    state: GatewayState,
    ex: Exchange,
    backend: Backend,
    path: str,
    body: bytes | None,
    deadline: float,
) -> web.StreamResponse:
    """One backend, one try: send, relay; the upstream response is closed on every way out."""
    headers = upstream_headers(request.raw_headers, request_id=ex.request_id)
    target = backend.target(path, request.raw_path.partition("?")[2])
    attempt = UpstreamTry(state, backend)
    try:
        async with asyncio.timeout_at(deadline):
            attempt.upstream = upstream = await send(backend, request.method, target, headers, body)
            attempt.response, attempt.complete = await relay.start(request, upstream, ex)
            if not attempt.complete:
                attempt.complete = await relay.pump(
                    request, upstream, attempt.response, ex, deadline, state.config.timeouts.idle_s
                )
    except (TimeoutError, BackendUnreachable) as exc:
        response, err = attempt.broken(exc)
        await relay.end_with_error(request, response, err, ex)
    finally:
        attempt.settle()
    assert attempt.response is not None
    return attempt.response


class UpstreamTry:
    """One try on one backend: what it has sent back so far, and how it ends."""

    def __init__(self, state: GatewayState, backend: Backend) -> None:
        self.state = state
        self.backend = backend
        self.upstream: Response | None = None
        self.response: web.StreamResponse | None = None
        self.complete = False

    def broken(self, exc: Exception) -> tuple[web.StreamResponse, ProxyError]:
        """A failure during the try: raised as is while the client has nothing yet (so the
        next target may serve it); else the error its stream must end with, counted."""
        if self.response is None:
            if isinstance(exc, TimeoutError):
                raise timed_out(self.backend) from None
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


def timed_out(backend: Backend) -> BackendTimeout:
    """The error for a deadline that passed before the backend answered."""
    return BackendTimeout(f"backend '{backend.name}' did not answer within the request's deadline")
