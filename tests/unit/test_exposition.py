"""The text renderer writes what prometheus_client's own writer writes, byte for byte."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from proxy.exposition import Family, Series, render
from proxy.metrics import Metrics


class AsPrometheus:
    """The same families built with prometheus_client's family classes."""

    def __init__(self, families: list[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for f in self.families:
            if f.type == "histogram":
                h = HistogramMetricFamily(f.name, f.help, labels=f.labels)
                les = [*(repr(float(b)) for b in f.bounds), "+Inf"]
                for s in f.series:
                    h.add_metric(s.labels, list(zip(les, s.values, strict=False)), s.values[-1])
                yield h
            else:
                kind = CounterMetricFamily if f.type == "counter" else GaugeMetricFamily
                metric = kind(f.name, f.help, labels=f.labels)
                for s in f.series:
                    metric.add_metric(s.labels, s.values[0])
                yield metric


def busy_metrics() -> Metrics:
    m = Metrics(["gpu", "b"], max_request_s=7200)
    for i in range(20):
        model = f"model-{i}"
        m.requests["/v1/chat/completions", model, "gpu", "200"] += i + 1
        m.duration["/v1/chat/completions", model].observe(i * 0.7)
        m.ttft[model, "gpu"].observe(0.1 * i)
        m.tokens[model, "completion"] += 1_234_567 * i
        m.stream_chunks[model] += 3
    m.requests["/x", 'we"ird\\na\nme', "none", "404"] += 1
    m.queue_wait["m"].observe(0.2)
    m.backend_up = lambda: {"gpu": True, "b": False}
    m.queue_depth = lambda: 2
    return m


def test_the_gateways_families_render_as_prometheus_client_writes_them() -> None:
    """Every family the gateway has, with escapes and large numbers, byte for byte."""
    families = busy_metrics().families()
    assert generate_latest(AsPrometheus(families)) == render(families)


def test_special_values_and_help_escapes() -> None:
    """+Inf, NaN, exponents, an empty family and a help text with a newline and backslash."""
    families = [
        Family("a", "gauge", "line\\one\ntwo", ("z", "a"), [Series(["1", "2"], [float("inf")])]),
        Family("b", "gauge", "h", (), [Series([], [float("nan")]), Series([], [-2.5e-9])]),
        Family("c", "counter", "h", ("x",), []),
        Family("d", "histogram", "h", ("z", "a"), [Series(["1", "2"], [1, 2, 3, 4.5])], (1, 2)),
    ]
    assert generate_latest(AsPrometheus(families)) == render(families)
