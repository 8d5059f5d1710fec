"""Request deadlines on one timer: what `asyncio.timeout_at` does, without a timer each.

A timer on uvloop costs about 3 µs to make and cancel, and every request needs one for its
deadline, although almost none fires. Here the deadlines wait in slots of `SLOT_S` (a set
each, so one that is met leaves in O(1)); one loop timer is armed for the earliest slot that
holds any, and re-armed only when an earlier one fills or that slot is done. A deadline is
kept to within one slot, late, never early.

`Slots` is the pure part (values and times in, values out); `Deadlines` puts it on a loop.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from types import TracebackType

SLOT_S = 0.01  # how late a deadline may fire: a request's budget is counted in seconds


class Slots:
    """Deadlines grouped by the slot they end in; the earliest slot first."""

    def __init__(self, slot_s: float = SLOT_S) -> None:
        self.slot_s = slot_s
        self.slots: dict[int, set[object]] = {}
        self.order: list[int] = []  # slot numbers, a heap; each once while its slot exists

    def add(self, when: float, item: object) -> int:
        """Keep `item` until `when`; returns its slot (to `discard` it by)."""
        slot = math.ceil(when / self.slot_s)
        held = self.slots.get(slot)
        if held is None:
            held = self.slots[slot] = set()
            heapq.heappush(self.order, slot)
        held.add(item)
        return slot

    def discard(self, slot: int, item: object) -> None:
        held = self.slots.get(slot)
        if held is not None:
            held.discard(item)

    def due(self, now: float) -> list[object]:
        """The items whose slot has ended by `now`, taken out; empty slots go with them."""
        out: list[object] = []
        order, slots = self.order, self.slots
        while order and order[0] * self.slot_s <= now:
            out.extend(slots.pop(heapq.heappop(order)))
        return out

    def next_at(self) -> float | None:
        """When the earliest slot still holding an item ends (empty ones are dropped)."""
        order, slots = self.order, self.slots
        while order and not slots[order[0]]:
            del slots[heapq.heappop(order)]
        return order[0] * self.slot_s if order else None


class Deadlines:
    """The request deadlines of one event loop (the first that holds one), on one timer."""

    def __init__(self, slot_s: float = SLOT_S) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.slots = Slots(slot_s)
        self.timer: asyncio.TimerHandle | None = None
        self.armed_at = math.inf

    def at(self, when: float) -> Deadline:
        """`async with deadlines.at(when):` as `asyncio.timeout_at(when)` (TimeoutError)."""
        return Deadline(self, when)

    def _hold(self, deadline: Deadline, loop: asyncio.AbstractEventLoop) -> int:
        if self.loop is not loop:
            assert self.loop is None, "one loop's deadlines"
            self.loop = loop
        slot = self.slots.add(deadline.when, deadline)
        end = slot * self.slots.slot_s
        if end < self.armed_at:
            self._arm(end)
        return slot

    def _arm(self, end: float) -> None:
        assert self.loop is not None
        if self.timer is not None:
            self.timer.cancel()
        self.armed_at = end
        self.timer = self.loop.call_at(end, self._fire)

    def _fire(self) -> None:
        assert self.loop is not None
        self.timer, self.armed_at = None, math.inf
        for deadline in self.slots.due(self.loop.time()):
            assert isinstance(deadline, Deadline)
            deadline.expire()
        end = self.slots.next_at()
        if end is not None:
            self._arm(end)


class Deadline:
    """One block's deadline: the task running it is cancelled when it passes, and the block
    raises TimeoutError (a cancel from anywhere else passes through as it came)."""

    __slots__ = ("cancelling", "deadlines", "expired", "slot", "task", "when")

    def __init__(self, deadlines: Deadlines, when: float) -> None:
        self.deadlines = deadlines
        self.when = when
        self.expired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None, "a deadline belongs to a task"
        self.task = task
        self.cancelling = task.cancelling()
        loop = task.get_loop()
        if self.when <= loop.time():
            self.slot = -1
            self.expire()  # passed already: as asyncio.timeout_at, cancelled at the next await
        else:
            self.slot = self.deadlines._hold(self, loop)

    def expire(self) -> None:
        if not self.expired:
            self.expired = True
            self.task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.slot >= 0:
            self.deadlines.slots.discard(self.slot, self)
        if (
            self.expired
            and self.task.uncancel() <= self.cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
