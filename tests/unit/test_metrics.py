"""The metric tallies render as Prometheus families with the contract's names."""

from __future__ import annotations

import itertools
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.exchange import Exchange, disconnect_phase
from proxy.metrics import (
    DISCONNECT_PHASES,
    INTER_EVENT_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    Metrics,
    duration_buckets,
)


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """A value equal to a bound falls in that bound's bucket; counts accumulate upwards."""
    h = Histogram((0.005, 0.01, 300.0))
    for value in (0.005, 0.006, 1000.0):
        h.observe(value)
    buckets = dict(h.buckets())
    assert 1 == buckets["0.005"]
    assert 2 == buckets["0.01"]
    assert 2 == buckets["300.0"]
    assert 3 == buckets["+Inf"]
    assert 1000.011 == round(h.total, 6)


def test_ttft_buckets_are_dense_between_a_tenth_and_thirty_seconds() -> None:
    """No gap wider than 50 % of its lower bound between 0.1 s and 30 s, ending at 120 s:
    a p99 interpolated between two bounds stays near the truth (2.5 s is not read as 4.85)."""
    inside = [b for b in TTFT_BUCKETS if 0.1 <= b <= 30]
    assert all(hi <= lo * 1.5 for lo, hi in itertools.pairwise(inside))
    assert {2.5, 3.0} <= set(TTFT_BUCKETS)
    assert 120.0 == TTFT_BUCKETS[-1]
    assert sorted(TTFT_BUCKETS) == list(TTFT_BUCKETS)


@pytest.mark.parametrize("max_request_s", [3600.0, 90.0, 7200.0, 0.5])
def test_duration_buckets_end_at_the_longest_deadline(max_request_s: float) -> None:
    """Request durations are bucketed up to timeouts.max_request_s, which is the last bound."""
    bounds = duration_buckets(max_request_s)
    assert max_request_s == bounds[-1]
    assert sorted(set(bounds)) == list(bounds)


def test_inter_event_buckets_cover_token_gaps() -> None:
    """Gaps from 1 ms (fast decode) to seconds (a stalled generation) are told apart."""
    assert 0.001 == INTER_EVENT_BUCKETS[0]
    assert INTER_EVENT_BUCKETS[-1] >= 5


def _exchange(backend: str = "none", status: int = 0, first: float | None = None) -> Exchange:
    ex = Exchange("id", "/v1/chat/completions", 0.0, "openai")
    ex.backend, ex.status, ex.first_byte_at = backend, status, first
    return ex


@pytest.mark.parametrize(
    ("ex", "phase"),
    [
        (_exchange(), "request"),
        (_exchange("gpu"), "upstream_head"),
        (_exchange("gpu", 200), "first_event"),
        (_exchange("gpu", 200, 0.1), "mid_stream"),
    ],
)
def test_disconnect_phase(ex: Exchange, phase: str) -> None:
    """Where a client was when it left, told from what the exchange had reached."""
    assert phase == disconnect_phase(ex)
    assert phase in DISCONNECT_PHASES


def test_render_names_and_labels() -> None:
    """Every contract name appears with its labels, parsed by prometheus_client itself."""
    m = Metrics(["gpu"])
    m.requests["/v1/chat/completions", "m", "gpu", "200"] += 2
    m.duration["/v1/chat/completions", "m"].observe(0.2)
    m.ttft["m", "gpu"].observe(0.05)
    m.upstream_error("gpu", "backend_timeout")
    m.stream_chunks["m"] += 7
    m.tokens["m", "prompt"] += 5
    m.backend_up = lambda: {"gpu": True}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.render().decode())
        for s in family.samples
    }
    assert (
        2
        == samples[
            (
                "proxy_requests_total",
                (
                    ("backend", "gpu"),
                    ("model", "m"),
                    ("route", "/v1/chat/completions"),
                    ("status", "200"),
                ),
            )
        ]
    )
    assert (
        1
        == samples[
            (
                "proxy_request_duration_seconds_count",
                (("model", "m"), ("route", "/v1/chat/completions")),
            )
        ]
    )
    assert (
        1
        == samples[
            ("proxy_time_to_first_token_seconds_count", (("backend", "gpu"), ("model", "m")))
        ]
    )
    assert 0 == samples[("proxy_in_flight_requests", (("backend", "gpu"),))]
    assert (
        1
        == samples[
            ("proxy_upstream_errors_total", (("backend", "gpu"), ("type", "backend_timeout")))
        ]
    )
    assert 7 == samples[("proxy_stream_chunks_total", (("model", "m"),))]
    assert 5 == samples[("proxy_tokens_total", (("kind", "prompt"), ("model", "m")))]
    assert 1 == samples[("proxy_backend_up", (("backend", "gpu"),))]


def _samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.render().decode())
        for s in family.samples
    }


def test_render_stream_errors_disconnects_and_inter_event() -> None:
    """The series added for cut streams, client disconnects and token gaps render."""
    m = Metrics(["gpu"])
    m.stream_errors["m", "gpu", "backend_unreachable"] += 1
    m.disconnects["m", "gpu", "mid_stream"] += 3
    m.inter_event["m", "gpu"].observe(0.02)
    samples = _samples(m)
    labels = (("backend", "gpu"), ("model", "m"))
    assert 1 == samples["proxy_stream_errors_total", (*labels, ("type", "backend_unreachable"))]
    assert 3 == samples["proxy_client_disconnects_total", (*labels, ("phase", "mid_stream"))]
    assert (
        1
        == samples[
            "proxy_inter_event_seconds_bucket", (("backend", "gpu"), ("le", "0.02"), ("model", "m"))
        ]
    )
    assert 0.02 == samples["proxy_inter_event_seconds_sum", labels]


def test_duration_histogram_uses_the_configured_longest_deadline() -> None:
    """A 1000 s request lands below the 3600 s bound, not in +Inf."""
    m = Metrics(["gpu"], max_request_s=3600)
    m.duration["/v1/chat/completions", "m"].observe(1000)
    samples = _samples(m)
    labels = (("model", "m"), ("route", "/v1/chat/completions"))
    assert 1 == samples["proxy_request_duration_seconds_bucket", (("le", "1200.0"), *labels)]
    assert 1 == samples["proxy_request_duration_seconds_bucket", (("le", "3600.0"), *labels)]


def test_process_metrics_describe_this_process() -> None:
    """process_* series (RSS, open fds) come with every scrape, read from /proc."""
    samples = _samples(Metrics([]))
    assert samples["process_resident_memory_bytes", ()] > 0
    assert abs(len(os.listdir("/proc/self/fd")) - samples["process_open_fds", ()]) < 10
    assert samples["process_max_fds", ()] > 0
