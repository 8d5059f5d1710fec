"""Both key stores, real ones: a SQLite file in tmp_path and a redis-server of the test's own."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.keys import (
    Hasher,
    KeyExists,
    NoSuchKey,
    Store,
    StoreError,
    UsageRow,
    new_key,
    open_store,
)
from tests.redis_fixture import RedisServer

NOW = 1_800_000_000.0
HASHER = Hasher()


@pytest.fixture(params=["sqlite", "redis"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or a redis-server of the test's own."""
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    return str(request.getfixturevalue("redis_server").url)


@pytest.fixture
async def store(location: str) -> AsyncIterator[Store]:
    """A fresh store of each kind."""
    opened = await open_store(location)
    yield opened
    await opened.close()


async def test_create_list_revoke(store: Store) -> None:
    """A created key is listed (without its secret), revoking it marks it and bumps the
    version; revoking again changes nothing."""
    secret, record = new_key("team-a", HASHER, NOW, models=("qwen",), rpm=60, expires=NOW + 60)
    v0 = await store.version()
    await store.create(record)
    v1 = await store.version()
    assert v1 != v0
    assert [record] == await store.list()
    revoked = await store.revoke("team-a", NOW + 1)
    assert NOW + 1 == revoked.revoked
    v2 = await store.version()
    assert v2 != v1
    assert revoked == await store.revoke("team-a", NOW + 2)
    assert v2 == await store.version()
    version, records = await store.snapshot()
    assert (v2, [revoked]) == (version, records)
    assert secret not in repr(records)


async def test_two_creates_with_one_name(store: Store, location: str) -> None:
    """Of two creates with one name, run at once through two handles (two connections, as two
    processes would have), exactly one succeeds; the other is KeyExists."""
    other = await open_store(location)
    _, first = new_key("dup", HASHER, NOW)
    _, second = new_key("dup", HASHER, NOW)
    try:
        results = await asyncio.gather(
            store.create(first), other.create(second), return_exceptions=True
        )
    finally:
        await other.close()
    assert 1 == sum(r is None for r in results)
    assert 1 == sum(isinstance(r, KeyExists) for r in results)
    assert 1 == len(await store.list())


async def test_revoke_unknown(store: Store) -> None:
    """Revoking a name that is not there is NoSuchKey."""
    with pytest.raises(NoSuchKey):
        await store.revoke("nobody", NOW)


async def test_usage_is_summed_per_key_model_and_minute(store: Store) -> None:
    """Batches add up per key, model and minute; `usage(since)` returns the minutes from since."""
    minute = int(NOW) // 60 * 60
    await store.add_usage(
        [UsageRow("a", "qwen", 2, 10, 5, minute), UsageRow("a", "qwen", 1, 1, 1, minute)]
    )
    await store.add_usage(
        [UsageRow("a", "qwen", 1, 3, 4, minute + 60), UsageRow("b", "m", 1, 1, 0, minute)]
    )
    assert [
        UsageRow("a", "qwen", 3, 11, 6, minute),
        UsageRow("b", "m", 1, 1, 0, minute),
        UsageRow("a", "qwen", 1, 3, 4, minute + 60),
    ] == await store.usage(minute)
    assert [UsageRow("a", "qwen", 1, 3, 4, minute + 60)] == await store.usage(minute + 1)


async def test_touch_keeps_the_latest_time(store: Store) -> None:
    """last_used is the latest time touched, and touching does not bump the version."""
    _, record = new_key("used", HASHER, NOW)
    await store.create(record)
    version = await store.version()
    await store.touch({"used": NOW + 10})
    await store.touch({"used": NOW + 5})
    assert NOW + 10 == (await store.list())[0].last_used
    assert version == await store.version()


async def test_corrupt_sqlite_file_is_a_clear_error(tmp_path: Path) -> None:
    """A file that is not a SQLite database is refused at open, saying so."""
    path = tmp_path / "keys.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a database"):
        await open_store(str(path))


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A store path in a directory that does not exist is refused at open."""
    with pytest.raises(StoreError, match="no such directory"):
        await open_store(str(tmp_path / "nope" / "keys.db"))


@pytest.fixture
def read_only_db(tmp_path: Path):
    """A SQLite store file the gateway cannot write (immutable for root, mode 0444 otherwise)."""
    path = tmp_path / "keys.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o444)
    yield path
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_read_only_sqlite_file_is_a_clear_error(read_only_db: Path) -> None:
    """A store the gateway cannot write is refused at open (never used read-only)."""
    with pytest.raises(StoreError, match=r"readonly|unable to open"):
        await open_store(str(read_only_db))


async def test_unreachable_redis_fails_fast(redis_server: RedisServer) -> None:
    """A Redis that is not there fails the open within tens of milliseconds, not seconds."""
    redis_server.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(StoreError, match=r"Redis store redis://127\.0\.0\.1"):
        await open_store(redis_server.url)
    assert loop.time() - started < 0.5
