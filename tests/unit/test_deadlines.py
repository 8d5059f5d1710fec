"""Request deadlines on one timer: the slots (pure) and the blocks they bound (on a loop)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.deadlines import Deadlines, Slots


def test_items_come_due_with_their_slot_never_before_it() -> None:
    slots = Slots(0.01)
    slots.add(1.001, "a")  # slot ends at 1.01
    slots.add(1.005, "b")
    slots.add(1.5, "c")
    assert slots.due(1.0) == []
    assert slots.due(1.009) == []
    assert sorted(slots.due(1.01)) == ["a", "b"]  # type: ignore[type-var]
    assert slots.due(1.2) == []
    assert slots.due(2.0) == ["c"]
    assert slots.next_at() is None


def test_a_met_deadline_leaves_its_slot_and_an_empty_slot_is_skipped() -> None:
    slots = Slots(0.5)
    first = slots.add(1.0, "met")
    slots.add(3.0, "later")
    assert slots.next_at() == 1.0
    slots.discard(first, "met")
    assert slots.next_at() == 3.0  # the emptied slot is dropped
    slots.discard(first, "met")  # twice, or after its slot is gone: nothing
    assert slots.due(10.0) == ["later"]
    assert slots.slots == {} and slots.order == []


def test_memory_follows_the_deadlines_held_not_those_met() -> None:
    slots = Slots(0.01)
    for i in range(10_000):
        slot = slots.add(100.0 + i * 0.001, i)
        slots.discard(slot, i)
    assert sum(len(held) for held in slots.slots.values()) == 0
    assert slots.next_at() is None and not slots.slots


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.at(started + 0.05):
            await asyncio.sleep(5)
    assert loop.time() - started >= 0.05  # late by a slot at most, never early
    assert deadlines.timer is None  # nothing else held: no timer left armed


async def test_a_block_that_ends_in_time_is_left_alone() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    async with deadlines.at(loop.time() + 0.05):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # the timer fires over an empty slot and is not re-armed
    assert deadlines.timer is None and not deadlines.slots.slots


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
    deadlines = Deadlines(slot_s=0.01)
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
    assert deadlines.armed_at == pytest.approx(now + 0.05, abs=0.011)  # the earliest slot
    timer = deadlines.timer
    tasks.append(asyncio.create_task(bounded("late", 1.0)))
    await asyncio.sleep(0)
    assert deadlines.timer is timer  # a later deadline arms nothing
    await asyncio.gather(*tasks)
    assert ended[0] == "first" and ended[-1] == "late" and len(ended) == 22
    assert ended[1:21] == [f"t{i}" for i in range(20)]
    assert deadlines.timer is None
