"""The store of managed keys and usage: what every implementation offers, and opening one."""

from __future__ import annotations

from typing import Protocol

from proxy.config import store_kind
from proxy.keys.record import KeyRecord, Records, Rows


class StoreError(Exception):
    """The store cannot be opened, read or written; the message says which and why (never a
    key or a hash)."""


class KeyExists(StoreError):
    """A key of that name is already in the store (revoked keys keep their name)."""


class NoSuchKey(StoreError):
    """No key of that name is in the store."""


class Store(Protocol):
    """Managed keys and usage, kept where every worker and host of the gateway reads them.

    Every change to the keys (create, revoke) bumps `version` in the same step, so a cache
    that polls `version` knows when to read `snapshot` again; `touch` and `add_usage` do not.
    """

    async def create(self, record: KeyRecord) -> None:
        """Add a key; `KeyExists` when its name is taken (atomically: of two creates with
        one name, exactly one succeeds)."""

    async def list(self) -> Records:
        """Every key, revoked ones too, by name, with `last_used` filled in."""

    async def revoke(self, name: str, now: float) -> KeyRecord:
        """Mark a key revoked at `now` (again: no change); `NoSuchKey` when there is none."""

    async def version(self) -> int:
        """A number that changes whenever a key is added or revoked."""

    async def snapshot(self) -> tuple[int, Records]:
        """The version and every key as of that version, read together."""

    async def touch(self, used: dict[str, float]) -> None:
        """Record when keys were last used (name -> Unix time); later times win."""

    async def add_usage(self, rows: Rows) -> None:
        """Add rows to the tallies: rows for the same key, model and minute are summed."""

    async def usage(self, since: float) -> Rows:
        """The tallies of every minute that starts at or after `since` (Unix time)."""

    async def close(self) -> None:
        """Release connections and threads; the store is not used after."""


async def open_store(location: str, timeout_s: float | None = None) -> Store:
    """The store `auth.store` names, opened and checked (its schema made if it is new);
    `StoreError` with one line saying why it cannot be used. `timeout_s`: Redis's socket
    timeouts (default: the gateway's tens of milliseconds)."""
    kind = store_kind(location)
    if kind == "redis":
        from proxy.keys.redis_store import TIMEOUT_S, RedisStore  # only when configured

        return await RedisStore.open(location, TIMEOUT_S if timeout_s is None else timeout_s)
    if kind == "sqlite":
        from proxy.keys.sqlite_store import SqliteStore

        return await SqliteStore.open(location)
    raise StoreError(f"auth.store: '{location[:200]}' is neither a SQLite path nor a redis:// URL")
