"""Rate limits as arithmetic: GCRA over a clock passed in, and what the headers say. [pure]

Each per-minute limit is one number per bucket, its theoretical arrival time (TAT), as in
the Generic Cell Rate Algorithm (ITU-T I.371; the same arithmetic as a token bucket that
holds `limit` and refills `limit` per `period`). A request of cost `c` moves the TAT on by
`c * period / limit`; it is admitted while the TAT stays within one `period` of now. So a
caller may spend the whole limit at once and then earns it back evenly over the period:
in any window of `w` seconds at most `limit * (1 + w / period)` is admitted, and over a
long run `limit` per period. One float per bucket is also what the Redis script stores.

Requests in flight are a count against a cap. Every check of one request is all or nothing:
when one of its limits refuses, none of the others is charged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import msgspec

PERIOD_S = 60.0  # rpm and tpm are per minute
Kind = Literal["requests", "tokens", "in_flight"]
Scope = Literal["key", "model"]
KINDS: tuple[Kind, ...] = ("requests", "tokens", "in_flight")
BYTES_PER_TOKEN = 4  # BPE tokenizers average about 4 bytes of English text per token
_EPS = 1e-9  # of a period: float slack, so that the 7th of 7 per minute is not refused


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The limits one key or one model is held to (None: no such limit); also the config's
    `auth.default_limits` and `models.NAME.limits`."""

    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None


NO_LIMITS = Limits()


class Rule(msgspec.Struct, frozen=True):
    """One limit one request is checked against, with what the request costs it.

    `limit` is what this process enforces (`full` times its share: a worker's part of the
    limit without Redis); `full` is the configured limit, which Redis enforces as is.
    """

    scope: Scope
    kind: Kind
    name: str  # the model's name, or the key's id (never shown: messages say "this key")
    bucket: str  # e.g. "k:key-0:rpm", "m:qwen:tpm"
    limit: float
    full: int
    cost: float  # requests: 1, tokens: the estimate, in flight: 1


class Standing(msgspec.Struct, frozen=True):
    """Where one rule stands after a check: what is left, and when it is whole again."""

    rule: Rule
    remaining: int
    reset_s: float  # seconds until the bucket is full again (0 for in flight)


class Verdict(msgspec.Struct, frozen=True):
    """The answer to one request's checks."""

    allowed: bool
    standings: tuple[Standing, ...]
    denied_by: Rule | None = None
    retry_s: float = 0.0  # when the refusing limit would admit the request


def bucket_id(scope: Scope, name: str, kind: Kind) -> str:
    """The bucket's id; the scope first and the kind last, so no two ids collide."""
    suffix = {"requests": "rpm", "tokens": "tpm", "in_flight": "inflight"}[kind]
    return f"{scope[0]}:{name}:{suffix}"


def estimate_tokens(body_bytes: int, cap: float) -> int:
    """The prompt tokens charged before a request is forwarded: its body bytes / 4.

    JSON punctuation and field names count too, so this errs high for text (the safe side: the
    refund comes when the backend's usage arrives); an image in base64 errs far higher, so the
    estimate is capped at the whole limit (`cap`), which lets any single request through a full
    bucket. At least 1: an empty body still asks for a completion.
    """
    return max(1, min(math.ceil(body_bytes / BYTES_PER_TOKEN), math.floor(cap)))


def rules_for(
    key: str | None,
    key_limits: Limits,
    model: str | None,
    model_limits: Limits,
    body_bytes: int,
    share: float = 1.0,
) -> tuple[Rule, ...]:
    """The rules one request is held to: its key's, then its model's; `share` (0 < share <= 1)
    is this process's part of each limit."""
    rules: list[Rule] = []
    scopes: tuple[tuple[Scope, str | None, Limits], ...] = (
        ("key", key, key_limits),
        ("model", model, model_limits),
    )
    for scope, name, limits in scopes:
        if name is None:
            continue
        for kind, full in _by_kind(limits):
            if full is None:
                continue
            limit = shared(full, share, whole=kind == "in_flight")
            cost = estimate_tokens(body_bytes, limit) if kind == "tokens" else 1.0
            rules.append(Rule(scope, kind, name, bucket_id(scope, name, kind), limit, full, cost))
    return tuple(rules)


def _by_kind(limits: Limits) -> tuple[tuple[Kind, int | None], ...]:
    return (
        ("requests", limits.rpm),
        ("tokens", limits.tpm),
        ("in_flight", limits.max_in_flight),
    )


def shared(full: int, share: float, *, whole: bool = False) -> float:
    """A process's part of a limit: never below one request (else none would ever pass),
    a whole number for counts in flight."""
    if share >= 1.0:
        return float(full)
    part = full * share
    return float(max(1, math.floor(part))) if whole else max(1.0, part)


def clamp(tat: float, now: float, period: float) -> float:
    """A stored TAT seen from `now`: an idle bucket is full (not fuller), and a TAT further
    ahead than two periods (the clock went back, or debts piled up) counts as two periods
    (and is stored so: see `decide`)."""
    return min(max(tat, now), now + 2 * period)


def remaining(tat: float, now: float, limit: float, period: float) -> int:
    """Whole units left in a bucket whose TAT is `tat`."""
    return max(0, math.floor((now + period - tat) * limit / period + _EPS))


def adjust(
    tat: float | None, now: float, delta: float, limit: float, period: float = PERIOD_S
) -> float:
    """The TAT after charging `delta` more (a refund when negative) after the fact: a refund
    never makes a bucket fuller than full, a charge may run into debt (up to one period)."""
    held = clamp(now if tat is None else tat, now, period)
    return clamp(held + delta * period / limit, now, period)


def decide(
    rules: Sequence[Rule],
    tats: Sequence[float | None],
    running: Sequence[int],
    now: float,
    period: float = PERIOD_S,
) -> tuple[Verdict, list[float]]:
    """Check every rule; the verdict and the TAT to store for each rate rule.

    `tats` holds the stored TAT of each rate rule (requests, tokens) in order, None for a
    bucket never used; `running` the count in flight of each in-flight rule, in order. A
    refusal stores the TATs as clamped (see `clamp`), so that after the clock went back a
    bucket refuses for at most two periods, not for as long as the jump.
    """
    rates = [r for r in rules if r.kind != "in_flight"]
    caps = [r for r in rules if r.kind == "in_flight"]
    held = [clamp(now if t is None else t, now, period) for t in tats]
    new = [h + r.cost * period / r.limit for r, h in zip(rates, held, strict=True)]
    denied: Rule | None = None
    retry = 0.0
    for rule, after in zip(rates, new, strict=True):
        if after - period > now + _EPS * period:
            denied, retry = rule, after - period - now
            break
    if denied is None:
        for rule, count in zip(caps, running, strict=True):
            if count >= rule.limit:
                denied, retry = rule, 1.0  # a slot frees when a request ends: no clock says when
                break
    allowed = denied is None
    at = new if allowed else held  # refused: nothing was taken anywhere
    standings = [
        Standing(rule, remaining(tat, now, rule.limit, period), max(0.0, tat - now))
        for rule, tat in zip(rates, at, strict=True)
    ]
    standings.extend(
        Standing(rule, max(0, int(rule.limit) - count - allowed), 0.0)
        for rule, count in zip(caps, running, strict=True)
    )
    return Verdict(allowed, tuple(standings), denied, retry), at


def duration(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it (Go's notation, to the
    millisecond, rounded up): `0s`, `250ms`, `1s`, `8.64s`, `6m0s`, `1h0m0s`."""
    ms = math.ceil(max(0.0, seconds) * 1000 - 1e-6)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def tightest(verdict: Verdict, kind: Kind) -> Standing | None:
    """The standing that speaks for `kind` in the headers: the refusing rule's, else the one
    with the least left (the earliest reset among equals)."""
    own = [s for s in verdict.standings if s.rule.kind == kind]
    if not own:
        return None
    if verdict.denied_by is not None:
        for s in own:
            if s.rule == verdict.denied_by:
                return s
    return min(own, key=lambda s: (s.remaining, -s.reset_s))


def headers(verdict: Verdict) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for each kind of rate limit that applies."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        s = tightest(verdict, kind)
        if s is not None:
            out[f"x-ratelimit-limit-{kind}"] = _number(s.rule.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(s.remaining)
            out[f"x-ratelimit-reset-{kind}"] = duration(s.reset_s)
    return out


def retry_after(verdict: Verdict) -> int:
    """Retry-After for a refusal: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(verdict.retry_s - 1e-9))


def message(verdict: Verdict) -> str:
    """What the 429 says: which limit, whose (this key's or the model's), and when to retry."""
    rule = verdict.denied_by
    assert rule is not None
    whose = "this key" if rule.scope == "key" else f"model '{rule.name}'"
    limit = _number(rule.limit)
    if rule.kind == "in_flight":
        return (
            f"rate limit reached: {limit} requests in flight at once for {whose}; "
            "retry when one of them ends"
        )
    return (
        f"rate limit reached: {limit} {rule.kind} per minute for {whose}; "
        f"retry in {duration(verdict.retry_s)}"
    )


def _number(value: float) -> str:
    """A limit as a header writes it: whole when whole, else to two decimals (a share)."""
    return str(int(value)) if value == int(value) else f"{value:.2f}"


class LocalLimits:
    """The buckets and in-flight counts of one process (no Redis, or Redis unreachable)."""

    __slots__ = ("running", "tats")

    def __init__(self) -> None:
        self.tats: dict[str, float] = {}
        self.running: dict[str, int] = {}

    def check(self, rules: Sequence[Rule], now: float, period: float = PERIOD_S) -> Verdict:
        """Decide, and when allowed take every rule's cost (and a slot in flight)."""
        rates = [r for r in rules if r.kind != "in_flight"]
        caps = [r for r in rules if r.kind == "in_flight"]
        tats = [self.tats.get(r.bucket) for r in rates]
        verdict, new = decide(
            rules, tats, [self.running.get(r.bucket, 0) for r in caps], now, period
        )
        for rule, tat in zip(rates, new, strict=True):
            if tat > now:
                self.tats[rule.bucket] = tat
        if verdict.allowed:
            for rule in caps:
                self.running[rule.bucket] = self.running.get(rule.bucket, 0) + 1
        return verdict

    def release(self, rules: Sequence[Rule]) -> None:
        """A request checked by `check` ended: its slots in flight are free again."""
        for rule in rules:
            if rule.kind == "in_flight":
                count = self.running.get(rule.bucket, 0) - 1
                if count > 0:
                    self.running[rule.bucket] = count
                else:
                    self.running.pop(rule.bucket, None)

    def adjust(self, rule: Rule, delta: float, now: float, period: float = PERIOD_S) -> None:
        """Charge (or refund) a rate rule's bucket `delta` after the fact."""
        tat = adjust(self.tats.get(rule.bucket), now, delta, rule.limit, period)
        if tat > now:
            self.tats[rule.bucket] = tat
        else:
            self.tats.pop(rule.bucket, None)  # full again: the same as no entry

    def prune(self, now: float) -> None:
        """Forget buckets that are full again (they read the same as absent ones)."""
        for bucket in [b for b, tat in self.tats.items() if tat <= now]:
            del self.tats[bucket]
