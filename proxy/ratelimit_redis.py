"""Limits shared by every gateway through Redis: one atomic script per check. [I/O]

The script reads each bucket's TAT and each in-flight set, and (when every limit admits the
request) stores the new TATs and adds the request to the sets, all in one step that no other
gateway's check can interleave with; the clock is Redis's own (`TIME`), so hosts whose clocks
differ still agree. It returns what it read, and `proxy.limits.decide` makes the verdict from
that, so the arithmetic is the same as in one process. Keys:

- `ipx:rl:k:<key id>:rpm` / `:tpm` (a string: the TAT), `ipx:rl:k:<key id>:inflight` (a sorted
  set of request ids scored by when they expire), and `ipx:rl:m:<model>:rpm` / `:tpm`.
- Every key expires: a TAT when its bucket is full again, a set when its last member does. A
  member expires at its request's deadline (plus a margin), so a gateway that dies mid-request
  frees its slots by then.

One check touches a key's and a model's keys together, so a Redis Cluster (which wants all keys
of a script in one slot) is not supported: use one primary (with replicas for failover).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from proxy.limits import PERIOD_S, Rule, Verdict, decide
from proxy.resp import Arg, Reply, Resp, RespConnectionError

PREFIX = "ipx:rl:"

# KEYS: the rate buckets, then the in-flight sets.
# ARGV: now ("" = Redis's clock), n, m, then (limit, period, cost) per bucket and
# (limit, member, ttl_s) per set. Returns {ok, now, tat_1..tat_n, count_1..count_m}: what each
# bucket and set held before this request (TATs as %.17g strings, exact doubles).
_CHECK = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local n, m = tonumber(ARGV[2]), tonumber(ARGV[3])
local ok = 1
local held, after, counts, clamped = {}, {}, {}, {}
for i = 1, n do
  local a = 3 + (i - 1) * 3
  local limit, period, cost = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local stored = tonumber(redis.call('GET', KEYS[i]))
  local tat = stored or now
  if tat < now then tat = now end
  if tat > now + 2 * period then tat = now + 2 * period end
  held[i] = tat
  clamped[i] = stored ~= nil and tat < stored
  after[i] = tat + cost * period / limit
  if after[i] - period > now + 1e-9 * period then ok = 0 end
end
local base = 3 + n * 3
for j = 1, m do
  local key = KEYS[n + j]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  counts[j] = redis.call('ZCARD', key)
  if counts[j] >= tonumber(ARGV[base + (j - 1) * 3 + 1]) then ok = 0 end
end
local out = {ok, string.format('%.17g', now)}
for i = 1, n do
  local tat = held[i]
  if ok == 1 then tat = after[i] end
  if ok == 1 or clamped[i] then  -- a refusal stores a clamped TAT (the clock went back)
    local ms = math.ceil((tat - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', ms)
  end
  out[#out + 1] = string.format('%.17g', held[i])
end
for j = 1, m do
  if ok == 1 then
    local a = base + (j - 1) * 3
    local key, ttl = KEYS[n + j], tonumber(ARGV[a + 3])
    redis.call('ZADD', key, now + ttl, ARGV[a + 2])
    if redis.call('PTTL', key) < ttl * 1000 then
      redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
    end
  end
  out[#out + 1] = counts[j]
end
return out
"""

# KEYS: buckets to charge (or refund), then in-flight sets to leave.
# ARGV: now ("" = Redis's clock), n, m, then (limit, period, delta) per bucket, member per set.
_SETTLE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local n, m = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, n do
  local a = 3 + (i - 1) * 3
  local limit, period, delta = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tat = tat + delta * period / limit
  if tat > now + 2 * period then tat = now + 2 * period end
  if tat > now then
    local ms = math.ceil((tat - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', ms)
  else
    redis.call('DEL', KEYS[i])
  end
end
local base = 3 + n * 3
for j = 1, m do
  redis.call('ZREM', KEYS[n + j], ARGV[base + j])
end
return n + m
"""


class Adjust(NamedTuple):
    """Charge a bucket `delta` more (a refund when negative) after the fact."""

    bucket: str
    limit: int
    delta: float


class Leave(NamedTuple):
    """A request that held a slot in flight has ended."""

    bucket: str
    member: str


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # noqa: S324  (Redis names scripts so)


def _number(reply: Reply) -> float:
    if not isinstance(reply, bytes | int):
        raise RespConnectionError(f"the script answered {reply!r}, not a number")
    return float(reply)


def _items(reply: Reply) -> list[Reply]:
    if not isinstance(reply, list):
        raise RespConnectionError(f"the script answered {reply!r}, not a list")
    return reply


class RedisLimits:
    """The checks and settlements on Redis; each is one EVALSHA (loaded at start, and sent
    whole once when Redis answers NOSCRIPT after a restart or a SCRIPT FLUSH)."""

    def __init__(self, url: str, period_s: float = PERIOD_S) -> None:
        self.client = Resp(url)
        self.period_s = period_s

    async def check(
        self, rules: Sequence[Rule], member: str, ttl_s: float, now: float | None = None
    ) -> Verdict:
        """Check (and, when allowed, take) every rule at once; `now` only in tests."""
        rates = [r for r in rules if r.kind != "in_flight"]
        caps = [r for r in rules if r.kind == "in_flight"]
        args: list[Arg] = ["" if now is None else now, len(rates), len(caps)]
        for r in rates:
            args += [r.limit, self.period_s, r.cost]
        for r in caps:
            args += [r.limit, member, round(ttl_s, 3)]
        keys = [PREFIX + r.bucket for r in (*rates, *caps)]
        out = _items(await self.client.evalsha(_CHECK_SHA, _CHECK, keys, args))
        at = _number(out[1])
        tats: list[float | None] = [_number(v) for v in out[2 : 2 + len(rates)]]
        counts = [int(_number(v)) for v in out[2 + len(rates) :]]
        ordered = [*rates, *caps]
        verdict, _ = decide(ordered, tats, counts, at, self.period_s)
        stored = bool(out[0])
        if verdict.allowed != stored:  # the same doubles, so never; else what Redis did stands
            denied = None if stored else verdict.denied_by or ordered[0]
            verdict = msgspec.structs.replace(
                verdict, allowed=stored, denied_by=denied, retry_s=0.0 if stored else 1.0
            )
        return verdict

    async def settle(self, ops: Sequence[Adjust | Leave], now: float | None = None) -> None:
        """Apply charges, refunds and ends of requests, in one script call."""
        adjusts = [op for op in ops if isinstance(op, Adjust)]
        leaves = [op for op in ops if isinstance(op, Leave)]
        args: list[Arg] = ["" if now is None else now, len(adjusts), len(leaves)]
        for a in adjusts:
            args += [a.limit, self.period_s, a.delta]
        args += [op.member for op in leaves]
        keys = [PREFIX + a.bucket for a in adjusts] + [PREFIX + op.bucket for op in leaves]
        await self.client.evalsha(_SETTLE_SHA, _SETTLE, keys, args)

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self.client.call("PING")

    async def warm(self) -> None:
        """Connect and load the scripts, so that the first requests meet neither."""
        for script, sha in ((_CHECK, _CHECK_SHA), (_SETTLE, _SETTLE_SHA)):
            if await self.client.call("SCRIPT", "LOAD", script) != sha.encode():
                raise RespConnectionError("Redis named a script by another SHA1")

    async def close(self) -> None:
        await self.client.close()


_CHECK_SHA, _SETTLE_SHA = _sha(_CHECK), _sha(_SETTLE)
