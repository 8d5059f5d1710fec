"""The shared store: Redis, for several gateway hosts. Every key lives under `ipx:`.

`ipx:keys` is a hash of name -> the record as JSON, `ipx:version` a counter that every change
to it increments in the same Lua script (so a cache never sees one without the other),
`ipx:last_used` a hash of name -> time, and usage a hash per minute (`ipx:usage:MINUTE`, with
fields `[key, model, "r"|"p"|"c"]` as JSON) indexed by the sorted set `ipx:usage:minutes`.

The socket timeouts are tens of milliseconds and redis-py's own retries are off: a Redis that
does not answer fails the call at once, and the caller (the key cache polls four times a
second) decides what to do; a gateway never waits seconds on it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.keys.record import KeyRecord, Records, Rows, UsageRow
from proxy.keys.store import KeyExists, NoSuchKey, StoreError

T = TypeVar("T")
PREFIX = "ipx:"
KEYS, VERSION, LAST_USED = PREFIX + "keys", PREFIX + "version", PREFIX + "last_used"
MINUTES = PREFIX + "usage:minutes"
TIMEOUT_S = 0.05  # the gateway's: connect and each command
_REVOKE_TRIES = 10

# KEYS[1] the key hash, KEYS[2] the version; ARGV name, record.
_CREATE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
return redis.call('INCR', KEYS[2])
"""
# Replace a record only if it is still the one read (compare and set); -1 if it changed.
_REPLACE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return redis.call('INCR', KEYS[2])
"""
_SNAPSHOT = """
return {redis.call('GET', KEYS[2]) or '0', redis.call('HVALS', KEYS[1])}
"""
# KEYS[1] last_used; ARGV name, time pairs: the later time wins.
_TOUCH = """
for i = 1, #ARGV, 2 do
  local at = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > at then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 0
"""
_decode_record = msgspec.json.Decoder(KeyRecord)
_decode_field = msgspec.json.Decoder(tuple[str, str, str])


def _decode(value: bytes) -> KeyRecord:
    try:
        return _decode_record.decode(value)
    except msgspec.DecodeError as exc:
        raise StoreError(f"Redis store: a record under {KEYS} is damaged: {exc}") from exc


class RedisStore:
    """Keys and usage in Redis (see the module's docstring)."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S) -> None:
        self.url = url
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._create = self.redis.register_script(_CREATE)
        self._replace = self.redis.register_script(_REPLACE)
        self._snapshot = self.redis.register_script(_SNAPSHOT)
        self._touch = self.redis.register_script(_TOUCH)

    @classmethod
    async def open(cls, url: str, timeout_s: float = TIMEOUT_S) -> RedisStore:
        """The store at `url`, answering a PING; `StoreError` when it does not."""
        store = cls(url, timeout_s)
        try:
            await store._call(store.redis.ping())
        except StoreError:
            await store.close()
            raise
        return store

    @property
    def where(self) -> str:
        """The URL without any password, for messages."""
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"

    async def _call(self, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis store {self.where}: {exc or type(exc).__name__}") from exc

    async def close(self) -> None:
        await self.redis.aclose()

    async def create(self, record: KeyRecord) -> None:
        value = msgspec.json.encode(msgspec.structs.replace(record, last_used=None))
        if not await self._call(self._create(keys=[KEYS, VERSION], args=[record.name, value])):
            raise KeyExists(f"a key named '{record.name}' exists already")

    async def list(self) -> Records:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hvals(KEYS)
        pipe.hgetall(LAST_USED)
        values, used = await self._call(pipe.execute())
        at = {name.decode(): float(when) for name, when in used.items()}
        records = [_decode(v) for v in values]
        return sorted(
            (msgspec.structs.replace(r, last_used=at.get(r.name)) for r in records),
            key=lambda r: r.name,
        )

    async def revoke(self, name: str, now: float) -> KeyRecord:
        for _ in range(_REVOKE_TRIES):
            value = await self._call(cast(Awaitable[bytes | None], self.redis.hget(KEYS, name)))
            if value is None:
                raise NoSuchKey(f"no key named '{name}'")
            record = _decode(value)
            if record.revoked is not None:
                return record
            revoked = msgspec.structs.replace(record, revoked=now)
            new = msgspec.json.encode(revoked)
            if await self._call(self._replace(keys=[KEYS, VERSION], args=[name, value, new])) > 0:
                return revoked
        raise StoreError(f"Redis store {self.where}: key '{name}' kept changing; try again")

    async def version(self) -> int:
        value = await self._call(cast(Awaitable[bytes | None], self.redis.get(VERSION)))
        return int(value or 0)

    async def snapshot(self) -> tuple[int, Records]:
        version, values = await self._call(self._snapshot(keys=[KEYS, VERSION]))
        return int(version), [_decode(v) for v in values]

    async def touch(self, used: dict[str, float]) -> None:
        if used:
            args: list[Any] = [x for name, at in used.items() for x in (name, repr(at))]
            await self._call(self._touch(keys=[LAST_USED], args=args))

    async def add_usage(self, rows: Rows) -> None:
        if not rows:
            return
        pipe = self.redis.pipeline(transaction=True)  # all of the batch or none of it
        for row in rows:
            bucket = f"{PREFIX}usage:{row.minute}"
            for kind, count in (
                ("r", row.requests),
                ("p", row.prompt_tokens),
                ("c", row.completion_tokens),
            ):
                pipe.hincrby(bucket, msgspec.json.encode((row.key, row.model, kind)), count)
            pipe.zadd(MINUTES, {str(row.minute): row.minute})
        await self._call(pipe.execute())

    async def usage(self, since: float) -> Rows:
        found = await self._call(self.redis.zrangebyscore(MINUTES, since, "+inf"))
        minutes = [int(m) for m in cast(list[bytes], found)]
        pipe = self.redis.pipeline(transaction=False)
        for minute in minutes:
            pipe.hgetall(f"{PREFIX}usage:{minute}")
        buckets = await self._call(pipe.execute()) if minutes else []
        rows: Rows = []
        for minute, bucket in zip(minutes, buckets, strict=True):
            tallies: dict[tuple[str, str], dict[str, int]] = {}
            for field, count in bucket.items():
                key, model, kind = _decode_field.decode(field)
                tallies.setdefault((key, model), {})[kind] = int(count)
            rows.extend(
                UsageRow(key, model, t.get("r", 0), t.get("p", 0), t.get("c", 0), minute)
                for (key, model), t in sorted(tallies.items())
            )
        return rows
