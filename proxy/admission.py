"""Slots on backends (`max_in_flight`) and the queue for them, ordered by deadline.

A request takes a slot on a backend before it is sent there and gives it back in `finally`,
on every path (forwarded, translated, MLflow, OICM): `in_flight` is what `least_loaded` reads.
When every target of a model is full, the request waits for a slot. A slot given back goes
straight to the waiting request whose deadline comes first (it never becomes free in between,
so a request that arrives later cannot take it); a waiter is woken with the slot it now holds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Iterable

from proxy.errors import BackendTimeout, Overloaded
from proxy.upstream import Backend

_Waiter = tuple[float, int, "asyncio.Future[Backend]"]


class Admission:
    """Every backend's waiters, each backend's in deadline order."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        # Keyed by the Backend itself, not its name: after a reload that rebuilt a backend,
        # a slot on the old one must never go to a request that queued for the new one.
        self.queues: dict[Backend, list[_Waiter]] = {}
        self.waiting = 0  # requests in the queue now (proxy_queue_depth)
        self._order = itertools.count()

    def take(self, backend: Backend) -> bool:
        """Take a free slot on `backend` now, if it has one."""
        limit = backend.config.max_in_flight
        if limit is not None and backend.in_flight >= limit:
            return False
        backend.in_flight += 1
        return True

    def give_back(self, backend: Backend) -> None:
        """The slot's request is done: hand the slot to the earliest-deadline waiter, if any."""
        queue = self.queues.get(backend)
        while queue:
            _, _, waiter = heapq.heappop(queue)
            if not queue:
                del self.queues[backend]
            if not waiter.done():
                waiter.set_result(backend)  # the slot changes hands; in_flight stays
                return
        backend.in_flight -= 1

    async def wait(self, backends: Iterable[Backend], deadline: float, give_up: float) -> Backend:
        """Wait for a slot on any of `backends`; the backend whose slot is now held.

        Raises `BackendTimeout` when the request's `deadline` comes first (it never reaches a
        backend), `Overloaded` when the queue is full or `give_up` (the queue timeout) comes.
        """
        backends = list(backends)
        for backend in backends:  # a slot may have come free since the caller looked
            if self.take(backend):
                return backend
        if self.waiting >= self.max_queue:
            raise Overloaded(
                f"the gateway's queue is full ({self.max_queue} requests wait already)",
                retry_after=1,
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Backend] = loop.create_future()
        entry = (deadline, next(self._order), waiter)
        for backend in backends:
            heapq.heappush(self.queues.setdefault(backend, []), entry)
        self.waiting += 1
        try:
            async with asyncio.timeout_at(min(deadline, give_up)):
                return await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return waiter.result()  # the slot came as time ran out: it is ours
            if loop.time() >= deadline:
                raise BackendTimeout(
                    "the request's deadline passed while it waited for a free backend"
                ) from None
            raise Overloaded(
                "every target of the model stayed at its max_in_flight for server.queue_timeout_s",
                retry_after=1,
            ) from None
        except asyncio.CancelledError:  # the client went away
            if waiter.done() and not waiter.cancelled():
                self.give_back(waiter.result())  # woken as it left: pass the slot on
            raise
        finally:
            self.waiting -= 1
            if not waiter.done():
                waiter.cancel()
            if waiter.cancelled():  # it left without a slot: out of every queue it joined
                self._forget(entry, backends)

    def _forget(self, entry: _Waiter, backends: list[Backend]) -> None:
        """Take a waiter that left (timed out, cancelled) out of every queue it joined, so
        the queues hold only the living: they never grow past `max_queue` entries each."""
        for backend in backends:
            queue = self.queues.get(backend)
            if queue is not None and entry in queue:
                queue.remove(entry)
                heapq.heapify(queue)
                if not queue:
                    del self.queues[backend]
