"""The gateway's Prometheus metrics (names and labels are a contract).

Requests are tallied in plain dictionaries on the event loop, with no lock and no
prometheus_client object per request; a collector turns the tallies into metric families
when `/metrics` is scraped. Label values come from the config only, so the dictionaries
stay bounded.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy.exposition import Family, Series, from_prometheus, render

# Time to first token: dense where interactive targets live (0.1 s to 30 s), up to 120 s.
TTFT_BUCKETS: tuple[float, ...] = (
    0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0,
    7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
)  # fmt: skip
# Whole requests: from a fast embedding to the longest deadline the config allows.
_DURATION_STEPS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
)  # fmt: skip
# The mean gap between a stream's events (inter-token latency when one event is one token).
INTER_EVENT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

# Time a request waited in the queue for a free target (up to server.queue_timeout_s).
QUEUE_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip

# Where a client was when it went away (label values of proxy_client_disconnects_total).
DISCONNECT_PHASES = ("request", "upstream_head", "first_event", "mid_stream")

CONTENT_TYPE = CONTENT_TYPE_LATEST


def duration_buckets(max_request_s: float) -> tuple[float, ...]:
    """Request-duration bounds up to `timeouts.max_request_s`, which is always the last one."""
    return (*(b for b in _DURATION_STEPS if b < max_request_s), float(max_request_s))


class Histogram:
    """Bucket counts and a sum for one label set."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, as the exposition format wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class Histograms(dict[tuple[str, ...], Histogram]):
    """One histogram per label set, all with the same bounds."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__()
        self.bounds = bounds

    def __missing__(self, key: tuple[str, ...]) -> Histogram:
        histogram = self[key] = Histogram(self.bounds)
        return histogram


class Metrics:
    """Every series the gateway exports, tallied per request and rendered on scrape."""

    def __init__(self, backends: list[str], max_request_s: float = 3600.0) -> None:
        self.backends = backends
        self.requests: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)
        self.duration = Histograms(duration_buckets(max_request_s))
        self.ttft = Histograms(TTFT_BUCKETS)
        self.inter_event = Histograms(INTER_EVENT_BUCKETS)
        self.upstream_errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.stream_errors: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.disconnects: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.stream_chunks: defaultdict[str, int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.retries: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.decisions: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.ejections: defaultdict[str, int] = defaultdict(int)
        self.queue_wait = Histograms(QUEUE_BUCKETS)
        self.backend_up: Callable[[], dict[str, bool]] = lambda: dict.fromkeys(backends, False)
        self.in_flight: Callable[[], dict[str, int]] = lambda: dict.fromkeys(backends, 0)
        self.queue_depth: Callable[[], int] = lambda: 0
        self.rate_limited: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.store_errors: defaultdict[str, int] = defaultdict(int)
        self.limits_degraded: Callable[[], int] = lambda: 0
        self.trace_spans_dropped: Callable[[], dict[str, int]] = dict  # by reason; {}: no tracing
        # process_resident_memory_bytes, process_open_fds, process_max_fds, CPU seconds...
        # of the serving process, read from /proc at scrape time.
        self.process = ProcessCollector(registry=None)

    def upstream_error(self, backend: str, kind: str) -> None:
        self.upstream_errors[backend, kind] += 1

    def render(self) -> bytes:
        """The text exposition format."""
        return render(self.families())

    def families(self) -> list[Family]:
        """The tallies as metric families, then the process's."""
        return [*self._families(), *from_prometheus(self.process.collect())]

    def _families(self) -> Iterator[Family]:
        yield _counter(
            "proxy_requests",
            "Requests answered, by route template, model, backend and HTTP status.",
            ("route", "model", "backend", "status"),
            self.requests,
        )
        yield _histogram(
            "proxy_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ("route", "model"),
            self.duration,
        )
        yield _histogram(
            "proxy_time_to_first_token_seconds",
            "Time from a streaming request's arrival to the first body bytes from the backend.",
            ("model", "backend"),
            self.ttft,
        )
        yield _histogram(
            "proxy_inter_event_seconds",
            "Mean gap between the SSE events of one stream, observed once at its end.",
            ("model", "backend"),
            self.inter_event,
        )
        yield _gauge(
            "proxy_in_flight_requests",
            "Requests a backend is serving now through this gateway.",
            ("backend",),
            self.in_flight(),
        )
        yield _counter(
            "proxy_upstream_errors",
            "Failures talking to a backend, by error type.",
            ("backend", "type"),
            self.upstream_errors,
        )
        yield _counter(
            "proxy_stream_errors",
            "Responses that failed after their head went out (counted as their status, 200, in "
            "proxy_requests_total): the stream stalled, ran out of time or was cut by the backend.",
            ("model", "backend", "type"),
            self.stream_errors,
        )
        yield _counter(
            "proxy_client_disconnects",
            "Clients that went away before their answer was complete, by where they were: "
            "request (sending the body), upstream_head (waiting for the backend's head), "
            "first_event (head sent, no body yet), mid_stream.",
            ("model", "backend", "phase"),
            self.disconnects,
        )
        yield _counter(
            "proxy_stream_chunks", "SSE events relayed to clients.", ("model",), self.stream_chunks
        )
        yield _counter(
            "proxy_tokens",
            "Tokens the backends reported in usage, by kind (prompt or completion).",
            ("model", "kind"),
            self.tokens,
        )
        yield _gauge(
            "proxy_backend_up",
            "1 when the backend may get traffic (its health checks pass and it is not ejected).",
            ("backend",),
            {name: int(up) for name, up in self.backend_up().items()},
        )
        yield _counter(
            "proxy_retries",
            "Targets given up before any byte reached the client, and why (unreachable, timeout, "
            "or the backend's 429, 502, 503 or 504): the request went on to the next target.",
            ("model", "reason"),
            self.retries,
        )
        yield _counter(
            "proxy_routing_decisions",
            "Targets tried, by why each was chosen (affinity, rebalanced, least_loaded, "
            "weighted, only, retry, fallback, queued).",
            ("model", "backend", "reason"),
            self.decisions,
        )
        yield _counter(
            "proxy_backend_ejections",
            "Times a backend was ejected by outlier detection.",
            ("backend",),
            self.ejections,
        )
        yield _histogram(
            "proxy_queue_wait_seconds",
            "Time requests waited for a free target (every target at its max_in_flight).",
            ("model",),
            self.queue_wait,
        )
        yield _gauge(
            "proxy_queue_depth",
            "Requests waiting for a free target now.",
            (),
            {(): self.queue_depth()},
        )
        yield _counter(
            "proxy_rate_limited",
            "Requests refused with 429 by a rate limit, by model and limit kind (requests, "
            "tokens, in_flight), the key's or the model's.",
            ("model", "limit"),
            self.rate_limited,
        )
        yield _counter(
            "proxy_store_errors",
            "Calls to the shared store (Redis) that failed or ran out of time, by operation.",
            ("op",),
            self.store_errors,
        )
        yield _gauge(
            "proxy_limits_degraded",
            "1 while Redis is away and each worker enforces its share of every limit alone.",
            (),
            {(): self.limits_degraded()},
        )
        yield _counter(
            "proxy_trace_spans_dropped",
            "Trace spans never exported, by reason: queue_full (tracing.max_queue spans were "
            "already waiting) or export_failed (the collector did not take their batch in time).",
            ("reason",),
            self.trace_spans_dropped(),
        )


def _values(key: tuple[str, ...] | str) -> list[str]:
    return [key] if isinstance(key, str) else list(key)


def _counter(name: str, doc: str, labels: tuple[str, ...], series: Mapping[Any, int]) -> Family:
    rows = [Series(_values(key), [float(count)]) for key, count in series.items()]
    return Family(name, "counter", doc, labels, rows)


def _gauge(name: str, doc: str, labels: tuple[str, ...], series: Mapping[Any, int]) -> Family:
    rows = [Series(_values(key), [float(value)]) for key, value in series.items()]
    return Family(name, "gauge", doc, labels, rows)


def _histogram(name: str, doc: str, labels: tuple[str, ...], series: Histograms) -> Family:
    rows = [
        Series(list(key), [*map(float, itertools.accumulate(h.counts)), h.total])
        for key, h in series.items()
    ]
    return Family(name, "histogram", doc, labels, rows, series.bounds)
