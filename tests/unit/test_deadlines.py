"""Request deadlines on one timer: the slots (pure) and the blocks they bound (on a loop)."""

from __future__ import annotations

import asyncio
import math

import pytest

from proxy.deadlines import Deadlines, Pending


def test_items_come_due_in_time_order_never_before_their_time() -> None:
    pending = Pending()
    pending.add(1.5, "c")
    pending.add(1.001, "a")
    pending.add(1.005, "b")
    assert pending.due(1.0) == []
    assert pending.due(1.001) == ["a"]
    assert pending.due(1.2) == ["b"]
    assert pending.next_at() == 1.5
    assert pending.due(2.0) == ["c"]
    assert pending.next_at() is None


def test_a_dropped_item_never_comes_due_and_is_skipped_at_the_top() -> None:
    pending = Pending()
    first = pending.add(1.0, "met")
    pending.add(3.0, "later")
    assert pending.next_at() == 1.0
    pending.drop(first)
    assert pending.next_at() == 3.0  # the marked one at the top is dropped
    pending.drop(first)  # twice: nothing
    assert pending.due(10.0) == ["later"]
    assert pending.heap == [] and pending.marked == 0


def test_dropping_an_item_after_it_came_due_counts_nothing() -> None:
    pending = Pending()
    entry = pending.add(1.0, "x")
    assert pending.due(1.0) == ["x"]
    pending.drop(entry)  # its block ends after the deadline fired
    assert pending.marked == 0


def test_the_heap_follows_the_items_held_whatever_their_times() -> None:
    """A client that asks for far deadlines and ends each request at once leaves nothing
    behind: marked entries are rebuilt away once they outnumber the held ones."""
    pending = Pending()
    held = [pending.add(5000.0 + i, f"held{i}") for i in range(10)]
    for i in range(100_000):
        pending.drop(pending.add(3600.0 - i * 0.01, i))
    assert len(pending.heap) <= 2 * len(held) + 64 + 1
    assert pending.next_at() == 5000.0
    assert pending.due(math.inf) == [f"held{i}" for i in range(10)]


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.at(started + 0.05):
            await asyncio.sleep(5)
    assert loop.time() - started >= 0.05 - 0.001  # never early (uvloop's clock: 1 ms steps)
    assert deadlines.timer is None  # nothing else held: no timer left armed


async def test_a_block_that_ends_in_time_is_left_alone() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    async with deadlines.at(loop.time() + 0.05):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # the timer fires over a met deadline and is not re-armed
    assert deadlines.timer is None and deadlines.pending.heap == []


async def test_a_deadline_already_passed_cancels_at_the_first_await() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with deadlines.at(loop.time() - 1):
            await asyncio.sleep(1)


async def test_a_cancel_from_elsewhere_passes_through_as_a_cancel() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()

    async def bounded() -> None:
        async with deadlines.at(loop.time() + 10):
            await asyncio.sleep(10)

    task = asyncio.create_task(bounded())
    await asyncio.sleep(0.01)
    task.cancel()  # the client went away: not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_deadlines_share_one_timer_armed_for_the_earliest() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    now = loop.time()
    ended: list[str] = []

    async def bounded(name: str, budget: float) -> None:
        try:
            async with deadlines.at(now + budget):
                await asyncio.sleep(5)
        except TimeoutError:
            ended.append(name)

    tasks = [asyncio.create_task(bounded(f"t{i}", 0.2 + 0.02 * i)) for i in range(20)]
    tasks.append(asyncio.create_task(bounded("first", 0.05)))
    await asyncio.sleep(0.01)
    assert deadlines.armed_at == pytest.approx(now + 0.05)  # the earliest
    timer = deadlines.timer
    tasks.append(asyncio.create_task(bounded("late", 1.0)))
    await asyncio.sleep(0)
    assert deadlines.timer is timer  # a later deadline arms nothing
    await asyncio.gather(*tasks)
    assert ended[0] == "first" and ended[-1] == "late" and len(ended) == 22
    assert ended[1:21] == [f"t{i}" for i in range(20)]
    assert deadlines.timer is None


async def test_wake_ups_share_the_deadlines_timer_and_a_dropped_one_never_runs() -> None:
    """A relay's idle wake-up waits in the same heap as the deadlines: it is called at its
    time, in order with them, and not at all once dropped."""
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    now = loop.time()
    woken: list[str] = []
    deadlines.wake_at(now + 0.03, lambda: woken.append("idle"))
    dropped = deadlines.wake_at(now + 0.01, lambda: woken.append("dropped"))
    assert deadlines.armed_at == pytest.approx(now + 0.01)
    deadlines.drop(dropped)

    async def bounded() -> None:
        try:
            async with deadlines.at(now + 0.02):
                await asyncio.sleep(5)
        except TimeoutError:
            woken.append("deadline")

    await bounded()
    await asyncio.sleep(0.03)
    assert woken == ["deadline", "idle"]
    assert deadlines.timer is None and deadlines.pending.next_at() is None
    deadlines.drop(dropped)  # after its time, and twice: nothing
    assert deadlines.pending.marked == 0
