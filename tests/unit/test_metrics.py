"""The metric tallies render as Prometheus families with the contract's names."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import LATENCY_BUCKETS, Histogram, Metrics


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """A value equal to a bound falls in that bound's bucket; counts accumulate upwards."""
    h = Histogram()
    for value in (0.005, 0.006, 1000.0):
        h.observe(value)
    buckets = dict(h.buckets())
    assert 1 == buckets["0.005"]
    assert 2 == buckets["0.01"]
    assert 2 == buckets[repr(float(LATENCY_BUCKETS[-1]))]
    assert 3 == buckets["+Inf"]
    assert 1000.011 == round(h.total, 6)


def test_render_names_and_labels() -> None:
    """Every contract name appears with its labels, parsed by prometheus_client itself."""
    m = Metrics(["gpu"])
    m.requests["/v1/chat/completions", "m", "gpu", "200"] += 2
    m.duration["/v1/chat/completions", "m"].observe(0.2)
    m.ttft["m", "gpu"].observe(0.05)
    m.upstream_error("gpu", "backend_timeout")
    m.stream_chunks["m"] += 7
    m.tokens["m", "prompt"] += 5
    m.backend_up["gpu"] = 1
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
