"""Request deadlines on one timer: what `asyncio.timeout_at` does, without a timer each.

A timer on uvloop costs about 3 µs to make and cancel, and every request needs one for its
deadline, although almost none fires. Here the deadlines wait in one heap; one loop timer is
armed for the earliest that is still held, and re-armed only when an earlier one comes or that
one is due. A deadline that is met is marked and left in the heap (taking it out would cost a
search); marked ones are dropped as they reach the top, and the heap is rebuilt without them
once they outnumber the held ones, so its size follows the requests in flight, whatever
deadlines clients ask for.

The same timer wakes streams that wait for their backend (`wake_at`): a relay waits for the
next piece of the body with its idle timeout in this heap, not on a timer of its own (which
costs about 500 bytes for each open stream, and 3 µs each time it is made again).

`Pending` is the pure part (values and times in, values out); `Deadlines` puts it on a loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from types import TracebackType

_COMPACT_OVER = 64  # marked entries tolerated before a rebuild is worth its pass


class Pending:
    """Items held until a time, the earliest first; an item let go of is only marked."""

    def __init__(self) -> None:
        self.heap: list[list[object]] = []  # [when, seq, item]; item None: let go of
        self.marked = 0
        self._seq = itertools.count()

    def add(self, when: float, item: object) -> list[object]:
        """Hold `item` until `when`; returns its entry (to `drop` it by)."""
        entry: list[object] = [when, next(self._seq), item]
        heapq.heappush(self.heap, entry)
        return entry

    def drop(self, entry: list[object]) -> None:
        """Let go of an entry before its time."""
        if entry[2] is not None:
            entry[2] = None
            self.marked += 1
            if self.marked > _COMPACT_OVER and self.marked * 2 > len(self.heap):
                self.heap = [e for e in self.heap if e[2] is not None]
                heapq.heapify(self.heap)
                self.marked = 0

    def due(self, now: float) -> list[object]:
        """The items whose time has come by `now`, taken out."""
        out: list[object] = []
        heap = self.heap
        while heap and heap[0][0] <= now:  # type: ignore[operator]
            entry = heapq.heappop(heap)
            if entry[2] is None:
                self.marked -= 1
            else:
                out.append(entry[2])
                entry[2] = None  # out of the heap: a later `drop` of it counts nothing
        return out

    def next_at(self) -> float | None:
        """When the earliest item still held is due (marked ones at the top are dropped)."""
        heap = self.heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self.marked -= 1
        return heap[0][0] if heap else None  # type: ignore[return-value]


class Deadlines:
    """The request deadlines and wake-ups of one event loop (the first that holds one), on
    one timer; each held item is a callable, called when its time comes."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending = Pending()
        self.timer: asyncio.TimerHandle | None = None
        self.armed_at = math.inf

    def at(self, when: float) -> Deadline:
        """`async with deadlines.at(when):` as `asyncio.timeout_at(when)` (TimeoutError)."""
        return Deadline(self, when)

    def wake_at(self, when: float, wake: Callable[[], None]) -> list[object]:
        """Call `wake` at loop time `when` (from the running loop), unless `drop`ped first."""
        return self._hold(when, wake, asyncio.get_running_loop())

    def drop(self, entry: list[object]) -> None:
        """Let go of what `wake_at` holds, before its time (or after: then nothing)."""
        self.pending.drop(entry)

    def _hold(
        self, when: float, call: Callable[[], None], loop: asyncio.AbstractEventLoop
    ) -> list[object]:
        if self.loop is not loop:
            assert self.loop is None, "one loop's deadlines"
            self.loop = loop
        entry = self.pending.add(when, call)
        if when < self.armed_at:
            self._arm(when)
        return entry

    def _arm(self, end: float) -> None:
        assert self.loop is not None
        if self.timer is not None:
            self.timer.cancel()
        self.armed_at = end
        self.timer = self.loop.call_at(end, self._fire)

    def _fire(self) -> None:
        assert self.loop is not None
        self.timer, self.armed_at = None, math.inf
        for call in self.pending.due(self.loop.time()):
            call()  # type: ignore[operator]
        end = self.pending.next_at()
        if end is not None:
            self._arm(end)


class Deadline:
    """One block's deadline: the task running it is cancelled when it passes, and the block
    raises TimeoutError (a cancel from anywhere else passes through as it came)."""

    __slots__ = ("cancelling", "deadlines", "entry", "expired", "task", "when")

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
            self.entry = None
            self.expire()  # passed already: as asyncio.timeout_at, cancelled at the next await
        else:
            self.entry = self.deadlines._hold(self.when, self.expire, loop)

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
        if self.entry is not None:
            self.deadlines.pending.drop(self.entry)
        if (
            self.expired
            and self.task.uncancel() <= self.cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
