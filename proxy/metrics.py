"""The gateway's Prometheus metrics, on a registry of its own (names are a contract)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every series the gateway exports; label values come from the config only."""

    def __init__(self, backends: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "proxy_requests_total",
            "Requests answered, by route template, model, backend and HTTP status.",
            ["route", "model", "backend", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "proxy_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "proxy_time_to_first_token_seconds",
            "Time from a streaming request's arrival to the first body bytes from the backend.",
            ["model", "backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "proxy_in_flight_requests",
            "Requests a backend is serving now through this gateway.",
            ["backend"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "proxy_upstream_errors_total",
            "Failures talking to a backend, by error type.",
            ["backend", "type"],
            registry=r,
        )
        self.stream_chunks = Counter(
            "proxy_stream_chunks_total",
            "SSE events relayed to clients.",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "proxy_tokens_total",
            "Tokens the backends reported in usage, by kind (prompt or completion).",
            ["model", "kind"],
            registry=r,
        )
        self.backend_up = Gauge(
            "proxy_backend_up",
            "1 when the backend's last health check passed, else 0.",
            ["backend"],
            registry=r,
        )
        for name in backends:
            self.in_flight.labels(name)
            self.backend_up.labels(name)

        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: the per-request path skips the lookup cost.

        The cache is bounded because every label value comes from the config.
        """
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
