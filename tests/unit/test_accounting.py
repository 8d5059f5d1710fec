"""Per-key usage: summed in memory by key, model and minute, written in batches, kept (within a
bound) while the store fails, and carried over a reload."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.accesslog import AccessLog
from proxy.accounting import UsageFlusher, UsageTally, flushing
from proxy.auth import KeySet
from proxy.config import load_config
from proxy.keys import StoreError, UsageRow
from proxy.metrics import Metrics
from proxy.reload import successor
from proxy.state import GatewayState
from proxy.usage import Usage

T0 = 1_800_000_000.0  # a minute's start (a multiple of 60)


def test_requests_and_tokens_sum_per_key_model_and_minute() -> None:
    """Each request adds one and its counts to its key's row for the model and the minute."""
    tally = UsageTally()
    tally.add("team-a", "m", Usage(prompt=11, completion=4), T0 + 1)
    tally.add("team-a", "m", Usage(prompt=5, completion=2), T0 + 59.9)
    tally.add("team-a", "m", None, T0 + 30)  # a request whose backend sent no usage
    tally.add("team-a", "m", Usage(prompt=1, completion=1), T0 + 60)  # the next minute
    tally.add("key-0", "m", Usage(prompt=3, completion=3), T0)
    tally.add("team-a", "other", Usage(prompt=7, completion=0), T0)
    assert [
        UsageRow("team-a", "m", 3, 16, 6, int(T0)),
        UsageRow("team-a", "m", 1, 1, 1, int(T0) + 60),
        UsageRow("key-0", "m", 1, 3, 3, int(T0)),
        UsageRow("team-a", "other", 1, 7, 0, int(T0)),
    ] == tally.drain()
    assert [] == tally.drain()


def test_rows_kept_after_a_failure_sum_with_new_ones() -> None:
    """Rows a write did not take come back and add to what arrived since."""
    tally = UsageTally()
    tally.add("a", "m", Usage(prompt=2, completion=1), T0)
    rows = tally.drain()
    tally.add("a", "m", Usage(prompt=3, completion=3), T0)
    tally.keep(rows)
    assert [UsageRow("a", "m", 2, 5, 4, int(T0))] == tally.drain()


def test_what_is_kept_is_bounded_oldest_minutes_first() -> None:
    """Past `max_rows` the oldest minutes are given up and counted, never the newest."""
    tally = UsageTally(max_rows=10)
    for minute in range(10):
        tally.add("a", "m", None, T0 + 60 * minute)
    tally.add("a", "m", None, T0 + 600)  # an eleventh row: the oldest tenth goes
    assert 10 == len(tally)
    assert 1 == tally.dropped
    assert int(T0) + 60 == min(row.minute for row in tally.drain())
    kept = [UsageRow("b", "m", 1, 0, 0, int(T0) + 60 * i) for i in range(12)]
    tally.keep(kept)
    assert (10, 3) == (len(tally), tally.dropped)
    assert {int(T0) + 60 * i for i in range(2, 12)} == {row.minute for row in tally.drain()}


class FlakyStore:
    """A store whose first `failures` writes fail."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.written: list[list[UsageRow]] = []

    async def add_usage(self, rows: list[UsageRow]) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreError("SQLite store /x: disk I/O error")
        self.written.append(rows)


async def test_a_failing_store_keeps_the_rows_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three failed writes keep the rows (one error line), the fourth writes them once."""
    store = FlakyStore(failures=3)
    tally = UsageTally()
    flusher = UsageFlusher(tally, lambda: store)
    with caplog.at_level(logging.INFO, logger="proxy"):
        for i in range(4):
            tally.add("a", "m", Usage(prompt=1, completion=2), T0 + i)
            assert (i == 3) == await flusher.flush()
    assert [[UsageRow("a", "m", 4, 4, 8, int(T0))]] == store.written
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert 1 == len(errors)
    assert "disk I/O error" in errors[0].getMessage()
    assert "written" in caplog.records[-1].getMessage()  # the recovery, said once
    assert True is await flusher.flush()  # nothing left: no write at all
    assert 1 == len(store.written)


async def test_no_store_yet_keeps_the_rows() -> None:
    """Before the store is open (or after it closed), rows wait in the tally."""
    tally = UsageTally()
    tally.add("a", "m", None, T0)
    assert False is await UsageFlusher(tally, lambda: None).flush()
    assert 1 == len(tally)


async def test_the_flush_task_writes_in_batches_and_once_more_at_stop() -> None:
    """The background task writes every `every_s`; stopping writes what is left."""
    store = FlakyStore()
    tally = UsageTally()
    context = flushing(tally, lambda: store, lambda: 0.05)
    running = context(None)
    await running.__anext__()
    tally.add("a", "m", Usage(prompt=1, completion=1), T0)
    for _ in range(100):
        if store.written:
            break
        await asyncio.sleep(0.01)
    assert [[UsageRow("a", "m", 1, 1, 1, int(T0))]] == store.written
    tally.add("a", "m", Usage(prompt=2, completion=2), T0)
    with pytest.raises(StopAsyncIteration):
        await running.__anext__()
    assert [UsageRow("a", "m", 1, 2, 2, int(T0))] == store.written[-1]


async def test_a_reload_keeps_the_tally() -> None:
    """Usage not yet written survives a reload: the new state sums into the same tally."""
    config = load_config("backends: {b: {url: 'http://127.0.0.1:1'}}\n")
    old = GatewayState(config, KeySet([]), {}, Metrics(["b"], 60.0), AccessLog(None))
    old.usage_tally = UsageTally()
    new, _ = successor(old, config, {})
    assert old.usage_tally is new.usage_tally
