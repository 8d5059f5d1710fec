"""The gateway's copy of the managed keys: looked up in memory, kept fresh by a version check.

A request never waits on the store. Four times a second the refresh task asks the store for
its version (one small read); only when it changed is every key read again, so a revoke or a
new key is in force on every worker and host within about `poll_s` plus one read. When the
store does not answer, the keys last read stay in force and the failure is logged (once, then
every `LOG_EVERY_S` while it lasts); the next answer brings the copy up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from proxy.keys.record import Hasher, KeyRecord
from proxy.keys.store import Store, StoreError, open_store

logger = logging.getLogger("proxy")

POLL_S = 0.25
TOUCH_EVERY_S = 5.0  # how often the times keys were last used are written
LOG_EVERY_S = 30.0


class ManagedKeys:
    """The managed keys in force, by the HMAC digest of their secret."""

    def __init__(
        self,
        location: str,
        hasher: Hasher,
        poll_s: float = POLL_S,
        timeout_s: float | None = None,
    ) -> None:
        self.location = location
        self.hasher = hasher
        self.poll_s = poll_s
        self.timeout_s = timeout_s  # Redis's socket timeouts (None: the store's default)
        self.store: Store | None = None  # open from `start` on
        self.version: int | None = None  # the store's version the map was read at
        self.by_digest: dict[bytes, KeyRecord] = {}
        self.used: dict[str, float] = {}  # name -> Unix time, written by the refresh task
        self.failing_since: float | None = None  # monotonic time the store stopped answering
        self.refreshed_at: float | None = None  # monotonic time of the last good version check

    def find(self, secret: str) -> KeyRecord | None:
        """The record of a presented secret, revoked and expired ones included (a dict
        lookup by a keyed digest: its timing depends on the digest, which says nothing
        about how much of any real key the secret matched)."""
        return self.by_digest.get(self.hasher.digest(secret))

    def mark_used(self, name: str, now: float) -> None:
        self.used[name] = now

    def replace(self, version: int, records: list[KeyRecord]) -> None:
        """Put the keys of one snapshot in force."""
        if self.version is not None and version < self.version:
            logger.warning(
                "key store %s: its version went back from %d to %d (emptied or restored?); "
                "using what it holds now",
                self.location_shown,
                self.version,
                version,
            )
        try:
            self.by_digest = {bytes.fromhex(r.hash): r for r in records}
        except ValueError as exc:
            raise StoreError(f"key store {self.location_shown}: a key's hash is damaged") from exc
        self.version = version

    @property
    def location_shown(self) -> str:
        """Where the store is, without a password a URL might carry."""
        where = getattr(self.store, "where", None)
        return where if isinstance(where, str) else self.location

    async def start(self) -> None:
        """Open the store and read every key; `StoreError` when either fails."""
        self.store = await open_store(self.location, self.timeout_s)
        try:
            self.replace(*await self.store.snapshot())
        except StoreError:
            await self.store.close()
            self.store = None
            raise
        self.refreshed_at = time.monotonic()
        logger.info(
            "managed keys: %d from %s (version %s)",
            len(self.by_digest),
            self.location_shown,
            self.version,
        )

    async def refresh(self) -> bool:
        """One version check, and a new snapshot when the version moved; whether the store
        answered."""
        assert self.store is not None
        try:
            if await self.store.version() != self.version:
                self.replace(*await self.store.snapshot())
        except StoreError as exc:
            self._failed(exc)
            return False
        if self.failing_since is not None:
            logger.warning(
                "key store %s answers again after %.1f s; keys are up to date",
                self.location_shown,
                time.monotonic() - self.failing_since,
            )
            self.failing_since = None
        self.refreshed_at = time.monotonic()
        return True

    def _failed(self, exc: StoreError) -> None:
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = self._logged_at = now
            logger.error("key store failing, serving the keys last read: %s", exc)
        elif now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            logger.error(
                "key store still failing after %.0f s, serving the keys last read: %s",
                now - self.failing_since,
                exc,
            )

    async def flush_used(self) -> None:
        """Write when keys were last used (kept for the next flush if the store fails)."""
        assert self.store is not None
        used, self.used = self.used, {}
        try:
            await self.store.touch(used)
        except StoreError:
            for name, at in used.items():
                self.used[name] = max(at, self.used.get(name, 0.0))

    async def run(self) -> None:
        """Refresh every `poll_s` and write the last-used times every `TOUCH_EVERY_S`,
        until cancelled."""
        touched = time.monotonic()
        while True:
            await asyncio.sleep(self.poll_s)
            await self.refresh()
            if time.monotonic() - touched >= TOUCH_EVERY_S:
                touched = time.monotonic()
                await self.flush_used()

    async def serving(self) -> AsyncIterator[None]:
        """`start`, then `run` in the background until the gateway stops, then `stop` (a
        `cleanup_ctx` of the app)."""
        await self.start()
        task = asyncio.create_task(self.run(), name="managed-keys")
        task.add_done_callback(_stopped)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.stop()

    async def stop(self) -> None:
        """Write the last-used times once more and close the store."""
        if self.store is None:
            return
        with contextlib.suppress(StoreError):
            await self.store.touch(self.used)
        self.used = {}
        await self.store.close()
        self.store = None


def _stopped(task: asyncio.Task[None]) -> None:
    """A refresh task that ended other than by cancelling is a bug: say so, loudly."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error(
            "managed keys: the refresh task stopped; keys are no longer updated", exc_info=exc
        )
