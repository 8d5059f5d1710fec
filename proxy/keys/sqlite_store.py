"""The embedded store: one SQLite file in WAL mode, shared by the workers of one host.

Every call runs on one thread of the store's own, which holds the connection (sqlite3 wants
a connection used by one thread), so the event loop never waits on the disk or on a lock
another process holds. WAL lets the workers read while one of them (or the CLI) writes, and
`busy_timeout` makes a writer wait its turn instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from proxy.keys.record import ALL_MODELS, KeyRecord, Models, Records, Rows, UsageRow
from proxy.keys.store import KeyExists, NoSuchKey, StoreError

T = TypeVar("T")
BUSY_TIMEOUT_MS = 5000
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('version', 0), ('schema', 1);
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    models TEXT NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    max_in_flight INTEGER,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS last_used (name TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    minute INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (key, model, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_minute ON usage (minute);
"""
_COLUMNS = "k.name, prefix, hash, models, rpm, tpm, max_in_flight, created, expires, revoked, u.at"
_SELECT = f"SELECT {_COLUMNS} FROM keys k LEFT JOIN last_used u ON u.name = k.name"  # noqa: S608  (constants only)
_BUMP = "UPDATE meta SET value = value + 1 WHERE name = 'version'"
_models_json = msgspec.json.Decoder(tuple[str, ...])


class SqliteStore:
    """Keys and usage in one SQLite file (see the module's docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keys-sqlite")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        """The store at `path` (made when absent), checked writable; `StoreError` if not."""
        store = cls(path)
        try:
            await store._call(store._connect)
        except StoreError:
            store._thread.shutdown(wait=False)
            raise
        return store

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {_reason(exc)}") from exc
        except ValueError as exc:  # a row that does not decode (msgspec's errors are these)
            raise StoreError(
                f"SQLite store {self.path}: a stored record is damaged: {exc}"
            ) from exc

    def _connect(self) -> None:
        if not Path(self.path).parent.is_dir():
            raise sqlite3.OperationalError(f"no such directory: {Path(self.path).parent}")
        with contextlib.suppress(FileExistsError):  # a new store: the gateway's user's alone
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL mode (journal mode {mode})")
            db.execute("PRAGMA synchronous = NORMAL")
            with _transaction(db):  # a write, so a read-only file is refused now, not later
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('opened', ?)", (int(time.time()),))
                schema = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
            if schema != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {schema}, this gateway reads {SCHEMA_VERSION}"
                )
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._thread.shutdown(wait=False)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("the store is closed")
        return self._db

    async def create(self, record: KeyRecord) -> None:
        await self._call(self._create, record)

    def _create(self, r: KeyRecord) -> None:
        db = self._conn()
        models = r.models if r.models == ALL_MODELS else msgspec.json.encode(r.models).decode()
        try:
            with _transaction(db):
                db.execute(
                    "INSERT INTO keys (name, prefix, hash, models, rpm, tpm, max_in_flight, "
                    "created, expires, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _row(r, models),
                )
                db.execute(_BUMP)
        except sqlite3.IntegrityError as exc:
            raise KeyExists(f"a key named '{r.name}' exists already") from exc

    async def list(self) -> Records:
        return await self._call(lambda: [_record(row) for row in self._conn().execute(_SELECT)])

    async def revoke(self, name: str, now: float) -> KeyRecord:
        return await self._call(self._revoke, name, now)

    def _revoke(self, name: str, now: float) -> KeyRecord:
        db = self._conn()
        with _transaction(db):
            row = db.execute(_SELECT + " WHERE k.name = ?", (name,)).fetchone()
            if row is None:
                raise NoSuchKey(f"no key named '{name}'")
            record = _record(row)
            if record.revoked is not None:
                return record
            db.execute("UPDATE keys SET revoked = ? WHERE name = ?", (now, name))
            db.execute(_BUMP)
        return msgspec.structs.replace(record, revoked=now)

    async def version(self) -> int:
        return await self._call(self._version)

    def _version(self) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
        return int(row[0]) if row is not None else 0

    async def snapshot(self) -> tuple[int, Records]:
        return await self._call(self._snapshot)

    def _snapshot(self) -> tuple[int, Records]:
        db = self._conn()
        with _transaction(db, "BEGIN"):  # one read transaction: the version and its rows
            return self._version(), [_record(row) for row in db.execute(_SELECT)]

    async def touch(self, used: dict[str, float]) -> None:
        if used:
            await self._call(self._touch, used)

    def _touch(self, used: dict[str, float]) -> None:
        db = self._conn()
        with _transaction(db):
            db.executemany(
                "INSERT INTO last_used (name, at) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET at = max(at, excluded.at)",
                list(used.items()),
            )

    async def add_usage(self, rows: Rows) -> None:
        if rows:
            await self._call(self._add_usage, rows)

    def _add_usage(self, rows: Rows) -> None:
        db = self._conn()
        with _transaction(db):
            db.executemany(
                "INSERT INTO usage (key, model, minute, requests, prompt_tokens, "
                "completion_tokens) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key, model, minute) "
                "DO UPDATE SET requests = requests + excluded.requests, "
                "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens",
                [
                    (r.key, r.model, r.minute, r.requests, r.prompt_tokens, r.completion_tokens)
                    for r in rows
                ],
            )

    async def usage(self, since: float) -> Rows:
        return await self._call(self._usage, since)

    def _usage(self, since: float) -> Rows:
        cursor = self._conn().execute(
            "SELECT key, model, requests, prompt_tokens, completion_tokens, minute FROM usage "
            "WHERE minute >= ? ORDER BY minute, key, model",
            (since,),
        )
        return [UsageRow(*row) for row in cursor]


class _transaction:
    """`BEGIN IMMEDIATE` (a writer takes the lock first, waiting up to busy_timeout) to
    `COMMIT`, or `ROLLBACK` on any exception."""

    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self.db, self.begin = db, begin

    def __enter__(self) -> None:
        self.db.execute(self.begin)

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _row(r: KeyRecord, models: str) -> tuple[object, ...]:
    return (
        r.name,
        r.prefix,
        r.hash,
        models,
        r.rpm,
        r.tpm,
        r.max_in_flight,
        r.created,
        r.expires,
        r.revoked,
    )


def _record(row: tuple[Any, ...]) -> KeyRecord:
    name, prefix, digest, models, rpm, tpm, max_in_flight, created, expires, revoked, at = row
    scope: Models = ALL_MODELS if models == ALL_MODELS else _models_json.decode(models)
    return KeyRecord(
        name=name,
        prefix=prefix,
        hash=digest,
        models=scope,
        rpm=rpm,
        tpm=tpm,
        max_in_flight=max_in_flight,
        created=created,
        expires=expires,
        last_used=at,
        revoked=revoked,
    )


def _reason(exc: sqlite3.Error) -> str:
    """sqlite3's message, with what to do for the usual causes."""
    text = str(exc)
    if "readonly" in text or "unable to open" in text:
        return f"{text} (the gateway's user must be able to write the file and its directory)"
    if "not a database" in text or "malformed" in text:
        return f"{text} (not a usable SQLite file: restore it or point auth.store elsewhere)"
    return text
