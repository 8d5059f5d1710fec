"""Per-key usage: requests and tokens by key, model and minute, summed in memory and written to
the key store (`auth.store`) in batches, never once per request.

`UsageTally` is pure: the request's end adds to it (a dict update), `drain` hands over what it
holds as rows. `UsageFlusher` writes those rows every `usage.flush_s` and once more when the
gateway stops; when the store fails, the rows go back into the tally (summed with what came
since) and are written with the next batch. What is kept so is bounded (`MAX_ROWS`): past it
the oldest minutes are given up, counted and logged. A failure is logged once, and its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from proxy.keys import Store, StoreError, UsageRow
from proxy.usage import Usage

logger = logging.getLogger("proxy")

MAX_ROWS = 100_000  # (key, model, minute) rows kept while the store fails: about 20 MB
LAST_FLUSH_S = 5.0  # how long the flush at the gateway's stop may take

_Tallies = dict[tuple[str, str, int], list[int]]  # (key, model, minute) -> [requests, in, out]


class UsageTally:
    """Requests and tokens per key, model and minute, until drained."""

    __slots__ = ("dropped", "max_rows", "rows")

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        self.rows: _Tallies = {}
        self.max_rows = max_rows
        self.dropped = 0  # rows given up, oldest first, while the store could not take them

    def add(self, key: str, model: str, usage: Usage | None, now: float) -> None:
        """One request of `key` for `model` ended at `now` (Unix time), with these counts."""
        minute = int(now) // 60 * 60
        row = self.rows.get((key, model, minute))
        if row is None:
            if len(self.rows) >= self.max_rows:  # a tenth at once: rare, never per request
                self._give_up(max(len(self.rows) - self.max_rows + 1, self.max_rows // 10))
            row = self.rows[key, model, minute] = [0, 0, 0]
        row[0] += 1
        if usage is not None:
            row[1] += usage.prompt
            row[2] += usage.completion

    def drain(self) -> list[UsageRow]:
        """Everything tallied so far, as rows; the tally starts again empty."""
        rows, self.rows = self.rows, {}
        return [UsageRow(k, m, r[0], r[1], r[2], minute) for (k, m, minute), r in rows.items()]

    def keep(self, rows: list[UsageRow]) -> None:
        """Take back rows a write did not take, summed with what was added since."""
        for row in rows:
            tally = self.rows.setdefault((row.key, row.model, row.minute), [0, 0, 0])
            tally[0] += row.requests
            tally[1] += row.prompt_tokens
            tally[2] += row.completion_tokens
        if len(self.rows) > self.max_rows:
            self._give_up(len(self.rows) - self.max_rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _give_up(self, count: int) -> None:
        """Drop the `count` rows of the oldest minutes (only while the store fails)."""
        for name in sorted(self.rows, key=lambda k: k[2])[:count]:
            del self.rows[name]
        self.dropped += count


class UsageFlusher:
    """Writes a tally's rows to the store; keeps them when it cannot, and says so once."""

    def __init__(self, tally: UsageTally, store: Callable[[], Store | None]) -> None:
        self.tally = tally
        self.store = store  # the store once it is open (it opens before the gateway serves)
        self.failing = False
        self.dropped_logged = False

    async def flush(self) -> bool:
        """Write what the tally holds; whether the store took it (True: nothing to write)."""
        rows = self.tally.drain()
        if not rows:
            return True
        store = self.store()
        try:
            if store is None:
                raise StoreError("the key store is not open")
            await store.add_usage(rows)
        except StoreError as exc:
            self.tally.keep(rows)
            self._failed(exc)
            return False
        except asyncio.CancelledError:  # stopped mid-write: the rows stay for the count
            self.tally.keep(rows)
            raise
        if self.failing:
            self.failing = False
            logger.warning("usage: the key store takes usage again; %d row(s) written", len(rows))
        return True

    def _failed(self, exc: StoreError) -> None:
        if not self.failing:
            self.failing = True
            logger.error(
                "usage: cannot write to the key store (%s); keeping up to %d row(s) in memory "
                "and writing them with the next batch",
                exc,
                self.tally.max_rows,
            )
        if self.tally.dropped and not self.dropped_logged:
            self.dropped_logged = True
            logger.error(
                "usage: the key store has failed for so long that the oldest minutes' usage "
                "is given up (%d row(s) so far)",
                self.tally.dropped,
            )

    async def run(self, every_s: Callable[[], float]) -> None:
        """Flush every `every_s()` seconds (read each time: a reload may change it), until
        cancelled."""
        while True:
            await asyncio.sleep(every_s())
            await self.flush()


def flushing(
    tally: UsageTally, store: Callable[[], Store | None], every_s: Callable[[], float]
) -> Callable[[object], AsyncIterator[None]]:
    """A `cleanup_ctx` that flushes the tally in the background while the gateway serves, and
    once more (for at most `LAST_FLUSH_S`) when it stops, before the store closes."""

    async def context(_app: object) -> AsyncIterator[None]:
        flusher = UsageFlusher(tally, store)
        task = asyncio.create_task(flusher.run(every_s), name="usage-flush")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            written = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LAST_FLUSH_S):
                    written = await flusher.flush()
            if not written:
                logger.error("usage: %d row(s) could not be written at stop", len(tally))

    return context
