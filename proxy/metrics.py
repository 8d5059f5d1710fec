"""The gateway's Prometheus metrics (names and labels are a contract).

Requests are tallied in plain dictionaries on the event loop, with no lock and no
prometheus_client object per request; a collector turns the tallies into metric families
when `/metrics` is scraped. Label values come from the config only, so the dictionaries
stay bounded.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Histogram:
    """Bucket counts and a sum for one label set."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, as the exposition format wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class Metrics:
    """Every series the gateway exports, tallied per request and rendered on scrape."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.requests: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)
        self.duration: defaultdict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.ttft: defaultdict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.upstream_errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.stream_chunks: defaultdict[str, int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.backend_up: dict[str, int] = dict.fromkeys(backends, 0)
        self.in_flight: Callable[[], dict[str, int]] = lambda: dict.fromkeys(backends, 0)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def upstream_error(self, backend: str, kind: str) -> None:
        self.upstream_errors[backend, kind] += 1

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _Collector:
    """Turns the tallies into Prometheus metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        requests = CounterMetricFamily(
            "proxy_requests",
            "Requests answered, by route template, model, backend and HTTP status.",
            labels=["route", "model", "backend", "status"],
        )
        for request_labels, count in m.requests.items():
            requests.add_metric(list(request_labels), count)
        yield requests
        yield _histogram(
            "proxy_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["route", "model"],
            m.duration,
        )
        yield _histogram(
            "proxy_time_to_first_token_seconds",
            "Time from a streaming request's arrival to the first body bytes from the backend.",
            ["model", "backend"],
            m.ttft,
        )
        in_flight = GaugeMetricFamily(
            "proxy_in_flight_requests",
            "Requests a backend is serving now through this gateway.",
            labels=["backend"],
        )
        for name, count in m.in_flight().items():
            in_flight.add_metric([name], count)
        yield in_flight
        errors = CounterMetricFamily(
            "proxy_upstream_errors",
            "Failures talking to a backend, by error type.",
            labels=["backend", "type"],
        )
        for labels, count in m.upstream_errors.items():
            errors.add_metric(list(labels), count)
        yield errors
        chunks = CounterMetricFamily(
            "proxy_stream_chunks", "SSE events relayed to clients.", labels=["model"]
        )
        for model, count in m.stream_chunks.items():
            chunks.add_metric([model], count)
        yield chunks
        tokens = CounterMetricFamily(
            "proxy_tokens",
            "Tokens the backends reported in usage, by kind (prompt or completion).",
            labels=["model", "kind"],
        )
        for labels, count in m.tokens.items():
            tokens.add_metric(list(labels), count)
        yield tokens
        up = GaugeMetricFamily(
            "proxy_backend_up",
            "1 when the backend's last health check passed, else 0.",
            labels=["backend"],
        )
        for name, value in m.backend_up.items():
            up.add_metric([name], value)
        yield up


def _histogram(
    name: str, doc: str, labels: list[str], series: dict[tuple[str, str], Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, histogram in series.items():
        family.add_metric(list(values), histogram.buckets(), histogram.total)
    return family
