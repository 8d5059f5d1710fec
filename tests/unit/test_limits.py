"""Rate-limit arithmetic (proxy.limits): GCRA over a clock passed in, headers, messages."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.limits import (
    NO_LIMITS,
    Limits,
    LocalLimits,
    Rule,
    Scope,
    adjust,
    decide,
    duration,
    estimate_tokens,
    headers,
    message,
    remaining,
    retry_after,
    rules_for,
    shared,
)

P = 60.0


def rpm(limit: float, scope: Scope = "key", name: str = "k") -> Rule:
    return Rule(scope, "requests", name, f"{scope[0]}:{name}:rpm", limit, int(limit), 1.0)


def tpm(limit: float, cost: float, scope: Scope = "key", name: str = "k") -> Rule:
    return Rule(scope, "tokens", name, f"{scope[0]}:{name}:tpm", limit, int(limit), cost)


def inflight(limit: int, scope: Scope = "key", name: str = "k") -> Rule:
    return Rule(scope, "in_flight", name, f"{scope[0]}:{name}:inflight", limit, limit, 1.0)


def test_a_full_bucket_admits_the_limit_at_once_then_one_per_interval() -> None:
    """30 rpm: 30 at t=0, the 31st refused for 2 s, then one more every 2 s."""
    local = LocalLimits()
    rules = [rpm(30)]
    assert [True] * 30 + [False] == [local.check(rules, 100.0).allowed for _ in range(31)]
    refused = local.check(rules, 100.0)
    assert pytest.approx(2.0) == refused.retry_s
    assert 2 == retry_after(refused)
    assert not local.check(rules, 101.99).allowed
    assert local.check(rules, 102.0).allowed
    assert not local.check(rules, 102.0).allowed


def test_seven_per_minute_admits_seven() -> None:
    """Float slack: 60/7 s steps add up to 60 s without refusing the 7th request."""
    local = LocalLimits()
    assert [True] * 7 + [False] == [local.check([rpm(7)], 0.0).allowed for _ in range(8)]


def test_headers_of_an_allowed_request() -> None:
    """The OpenAI trio per kind: the limit, what is left, and when the bucket is full again."""
    local = LocalLimits()
    rules = [rpm(60), tpm(1000, 100)]
    local.check(rules, 0.0)
    verdict = local.check(rules, 0.0)
    assert {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "58",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "800",
        "x-ratelimit-reset-tokens": "12s",
    } == headers(verdict)


def test_headers_name_the_tightest_scope() -> None:
    """With a key's and a model's rpm, the headers speak for the one with less left."""
    local = LocalLimits()
    rules = [rpm(100, "key"), rpm(10, "model", "qwen")]
    verdict = local.check(rules, 0.0)
    assert ("10", "9") == (
        headers(verdict)["x-ratelimit-limit-requests"],
        headers(verdict)["x-ratelimit-remaining-requests"],
    )


def test_a_refusal_charges_nothing() -> None:
    """All or nothing: a key's rpm is not spent by a request its model's tpm refuses."""
    local = LocalLimits()
    key, model = rpm(10), tpm(100, 80, "model", "qwen")
    assert local.check([key, model], 0.0).allowed
    refused = local.check([key, model], 0.0)
    assert (False, model) == (refused.allowed, refused.denied_by)
    assert 9 == refused.standings[0].remaining  # the key's rpm: one spent, not two
    assert 20 == refused.standings[1].remaining


def test_refusal_message_and_headers_name_the_limit() -> None:
    """The 429 says which limit refused, whose it is, and when to retry; the headers agree."""
    local = LocalLimits()
    rules = [tpm(1000, 600, "model", "qwen")]
    local.check(rules, 0.0)
    refused = local.check(rules, 0.0)
    assert "rate limit reached: 1000 tokens per minute for model 'qwen'; retry in 12s" == (
        message(refused)
    )
    assert 12 == retry_after(refused)
    assert "400" == headers(refused)["x-ratelimit-remaining-tokens"]
    assert "36s" == headers(refused)["x-ratelimit-reset-tokens"]


def test_in_flight_cap_and_release() -> None:
    """Two in flight at most; a third is refused until one ends; release never goes below 0."""
    local = LocalLimits()
    rules = [inflight(2)]
    assert [True, True, False] == [local.check(rules, 0.0).allowed for _ in range(3)]
    refused = local.check(rules, 0.0)
    assert (
        "rate limit reached: 2 requests in flight at once for this key; retry when one of them ends"
        == (message(refused))
    )
    assert 1 == retry_after(refused)
    local.release(rules)
    assert local.check(rules, 0.0).allowed
    for _ in range(5):
        local.release(rules)
    assert {} == local.running


def test_clock_backwards_refuses_for_at_most_two_periods() -> None:
    """A TAT a day ahead (the clock went back a day) is stored back as two periods ahead:
    60 rpm refuses until one period and one interval later, not for a day."""
    local = LocalLimits()
    local.tats["k:k:rpm"] = 86_400.0 + 60.0
    refused = local.check([rpm(60)], 0.0)
    assert (False, 0) == (refused.allowed, refused.standings[0].remaining)
    assert 120.0 == local.tats["k:k:rpm"]
    assert pytest.approx(61.0) == refused.retry_s
    assert not local.check([rpm(60)], 60.9).allowed
    assert local.check([rpm(60)], 61.0).allowed


def test_clock_forwards_fills_the_bucket_but_no_fuller() -> None:
    """After a jump forward of a day the bucket is full: the limit is left, never more."""
    local = LocalLimits()
    for _ in range(30):
        local.check([rpm(30)], 0.0)
    verdict = local.check([rpm(30)], 86_400.0)
    assert 29 == verdict.standings[0].remaining


def test_refund_and_charge_after_the_fact() -> None:
    """A refund gives tokens back but never past full; a charge may run into debt."""
    assert 0.0 == adjust(None, 0.0, -500, 1000)  # refund to a full bucket: still full
    tat = adjust(None, 0.0, 1500, 1000)  # 1.5 limits charged: half a period of debt
    assert pytest.approx(90.0) == tat
    assert 0 == remaining(tat, 0.0, 1000, P)
    assert pytest.approx(30.0) == adjust(tat, 0.0, -1000, 1000)
    assert 120.0 == adjust(None, 0.0, 10**9, 1000)  # debt is capped at one period


def test_local_adjust_forgets_full_buckets() -> None:
    """A bucket refunded back to full is dropped (it reads the same as a new one)."""
    local = LocalLimits()
    rule = tpm(1000, 100)
    local.check([rule], 0.0)
    local.adjust(rule, -100, 0.0)
    assert {} == local.tats
    local.check([rule], 0.0)
    local.prune(60.0)
    assert {} == local.tats


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-3, "0s"),
        (0.0004, "1ms"),
        (0.25, "250ms"),
        (0.9999, "1s"),
        (1, "1s"),
        (8.64, "8.64s"),
        (59.9991, "1m0s"),
        (86.4, "1m26.4s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3725.5, "1h2m5.5s"),
    ],
)
def test_duration_is_openais_notation(seconds: float, text: str) -> None:
    """x-ratelimit-reset-* durations as OpenAI writes them (Go's notation, ms, rounded up)."""
    assert text == duration(seconds)


def test_estimate_is_bytes_over_four_bounded() -> None:
    """Body bytes / 4, at least 1, at most the whole limit."""
    assert (1, 1, 250, 1000) == (
        estimate_tokens(0, 1000),
        estimate_tokens(3, 1000),
        estimate_tokens(1000, 1000),
        estimate_tokens(10**9, 1000),
    )


def test_rules_for_key_and_model_with_a_share() -> None:
    """A key's three limits then a model's two; a share divides each, in flight whole."""
    rules = rules_for(
        "key-0",
        Limits(rpm=60, tpm=10_000, max_in_flight=5),
        "qwen",
        Limits(rpm=100, tpm=None),
        400,
        share=0.5,
    )
    assert [
        ("key", "requests", "k:key-0:rpm", 30.0, 60, 1.0),
        ("key", "tokens", "k:key-0:tpm", 5000.0, 10_000, 100),
        ("key", "in_flight", "k:key-0:inflight", 2.0, 5, 1.0),
        ("model", "requests", "m:qwen:rpm", 50.0, 100, 1.0),
    ] == [(r.scope, r.kind, r.bucket, r.limit, r.full, r.cost) for r in rules]
    assert () == rules_for(None, NO_LIMITS, "qwen", NO_LIMITS, 10)


def test_share_never_below_one() -> None:
    """A limit smaller than the number of workers still lets one request through each."""
    assert (1.0, 1.0, 2.5) == (shared(2, 0.25, whole=True), shared(2, 0.25), shared(10, 0.25))


# -- properties ---------------------------------------------------------------------------

steps = st.lists(
    st.tuples(st.floats(0, 20, allow_nan=False), st.integers(1, 400)), min_size=1, max_size=120
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 50), arrivals=steps, window=st.floats(1, 120))
def test_no_window_admits_more_than_the_limit_and_its_refill(limit, arrivals, window) -> None:
    """In any window of w seconds, requests admitted <= limit * (1 + w / period)."""
    local = LocalLimits()
    now, admitted = 0.0, []
    for gap, _ in arrivals:
        now += gap
        if local.check([rpm(limit)], now).allowed:
            admitted.append(now)
    for i, start in enumerate(admitted):
        inside = sum(1 for t in admitted[i:] if t <= start + window)
        assert inside <= math.floor(limit * (1 + window / P) + 1e-6)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(100, 5000),
    arrivals=steps,
    refunds=st.lists(st.integers(-5000, 5000), min_size=1, max_size=120),
)
def test_refunds_never_push_remaining_above_the_limit(limit, arrivals, refunds) -> None:
    """Whatever is charged and refunded in whatever order, 0 <= remaining <= limit."""
    local = LocalLimits()
    now = 0.0
    for (gap, cost), delta in zip(arrivals, refunds, strict=False):
        now += gap
        rule = tpm(limit, estimate_tokens(cost * 4, limit))
        verdict = local.check([rule], now)
        assert 0 <= verdict.standings[0].remaining <= limit
        local.adjust(rule, delta, now)
        left = remaining(local.tats.get(rule.bucket, now), now, limit, P)
        assert 0 <= left <= limit


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 30),
    jumps=st.lists(st.floats(-100_000, 100_000, allow_nan=False), min_size=1, max_size=60),
)
def test_a_jumping_clock_never_admits_more_than_a_full_bucket(limit, jumps) -> None:
    """Clock jumps either way: at one instant at most `limit` pass, and a wait of two periods
    always brings the bucket back."""
    local = LocalLimits()
    now = 0.0
    for jump in jumps:
        now += jump
        passed = sum(local.check([rpm(limit)], now).allowed for _ in range(limit + 2))
        assert passed <= limit
    assert local.check([rpm(limit)], now + 2 * P + 1e-6).allowed


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.integers(1, 500), min_size=1, max_size=40),
    limit=st.integers(1, 1000),
)
def test_decide_is_all_or_nothing(costs, limit) -> None:
    """A refusal leaves every TAT where it stood; an allowance moves each bucket by its cost."""
    rules = [rpm(5), tpm(limit, min(costs[0], limit))]
    verdict, tats = decide(rules, [None, None], [], 0.0)
    assert verdict.allowed
    assert pytest.approx([P / 5, min(costs[0], limit) * P / limit]) == tats
    again, same = decide(rules, [1.0, P], [], 0.0)  # the tokens' bucket is empty
    assert (False, [1.0, P]) == (again.allowed, same)
