"""The OpenTelemetry SDK side of tracing, imported only when `tracing` is configured.

`Tracing` holds a `TracerProvider` with a parent-based ratio sampler, and the SDK's
`BatchSpanProcessor` exporting over OTLP/HTTP from its own thread. The processor is wrapped so
the queue bound is ours (`SpanCounts`): a span ended past `tracing.max_queue` is dropped and
counted before it reaches the SDK, and a batch the collector did not take is counted too; the
event loop only appends to a deque and never waits on the collector. `RequestTrace` is one
request's spans: the request's own (SERVER) and one per upstream attempt (CLIENT).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from proxy.config import TracingConfig
from proxy.errors import ProxyError
from proxy.exchange import Exchange
from proxy.forward import Attempt, Retry
from proxy.routing import Target
from proxy.tracing import (
    TRACE,
    UNTRACED,
    Attributes,
    attempt_answered,
    attempt_failed,
    operation_of,
    parse_traceparent,
    passed_tracestate,
    request_attributes,
    span_name,
    trace_lines,
)
from proxy.upstream import Backend

logger = logging.getLogger("proxy")

_MAX_BATCH = 512  # spans in one export request (the SDK's default), at most max_queue


class SpanCounts:
    """Spans held for export and those dropped, shared by the loop and the export thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # queued or being sent
        self.queue_full = 0
        self.export_failed = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        """Room for one more span (else it is counted as dropped)."""
        with self.lock:
            if self.held >= self.limit:
                self.queue_full += 1
                return False
            self.held += 1
            return True

    def sent(self, count: int, ok: bool) -> None:
        """A batch of `count` spans left the queue: taken by the collector, or not."""
        with self.lock:
            self.held -= count
            if not ok:
                self.export_failed += count

    def dropped(self) -> dict[str, int]:
        """`proxy_trace_spans_dropped_total` by reason."""
        with self.lock:
            return {"queue_full": self.queue_full, "export_failed": self.export_failed}


class _Bounded(SpanProcessor):
    """The SDK's batch processor behind our own queue bound (its own bound is never reached:
    a span counts as held until its batch's export has returned)."""

    def __init__(self, inner: BatchSpanProcessor, counts: SpanCounts) -> None:
        self.inner = inner
        self.counts = counts

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled and self.counts.take():
            self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it untyped

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Counting(SpanExporter):
    """The OTLP exporter, telling `SpanCounts` how each batch went (in the export thread)."""

    def __init__(self, inner: SpanExporter, counts: SpanCounts) -> None:
        self.inner = inner
        self.counts = counts

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = SpanExportResult.FAILURE
        try:
            result = self.inner.export(spans)
        finally:
            self.counts.sent(len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def traces_url(endpoint: str) -> str:
    """The URL spans are posted to: the endpoint as given, or its `/v1/traces` when it has
    no path (a collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is given)."""
    return endpoint if urlsplit(endpoint).path.strip("/") else endpoint.rstrip("/") + "/v1/traces"


def provider(config: TracingConfig, counts: SpanCounts) -> TracerProvider:
    """The provider exporting `config`'s spans; its batch thread runs until `shutdown`.

    The SDK's own environment variables still apply where we set nothing: the schedule
    delay (OTEL_BSP_SCHEDULE_DELAY), the exporter's headers, certificate and compression
    (OTEL_EXPORTER_OTLP_TRACES_*), resource attributes (OTEL_RESOURCE_ATTRIBUTES).
    """
    made = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        resource=Resource.create({SERVICE_NAME: config.service_name}),
        shutdown_on_exit=False,  # the app's cleanup shuts it down, with a bound
    )
    exporter = OTLPSpanExporter(
        endpoint=traces_url(config.otlp_endpoint), timeout=config.export_timeout_s
    )
    batches = BatchSpanProcessor(
        _Counting(exporter, counts),
        max_queue_size=config.max_queue,
        max_export_batch_size=min(_MAX_BATCH, config.max_queue),
        export_timeout_millis=config.export_timeout_s * 1000,
    )
    made.add_span_processor(_Bounded(batches, counts))
    return made


class Tracing:
    """The gateway's tracer: `begin` a request's spans; `close` flushes them at stop."""

    def __init__(self, config: TracingConfig) -> None:
        self.counts = SpanCounts(config.max_queue)
        self.provider = provider(config, self.counts)
        self.tracer = self.provider.get_tracer("inference_proxy")
        self.servers: dict[str, Attributes] = {}  # each backend's server.address and port

    def begin(self, request: web.Request, ex: Exchange) -> RequestTrace | None:
        """The request's span, a child of the client's `traceparent` when it sent a valid one
        (None for probes and scrapes, which are not traced)."""
        if ex.route in UNTRACED:
            return None
        headers = request.headers
        parent = parse_traceparent(headers.getall("traceparent", []))
        context = None
        tracestate = ""
        if parent is not None:
            trace_id, span_id, flags = parent
            client = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
            context = trace.set_span_in_context(NonRecordingSpan(client))
            tracestate = passed_tracestate(headers.getall("tracestate", []))
        started = time.time_ns()
        span = self.tracer.start_span(
            f"{request.method} {ex.route}",
            context,
            SpanKind.SERVER,
            {"http.request.method": request.method, "http.route": ex.route},
            start_time=started,
        )
        request_trace = request[TRACE] = RequestTrace(self, span, started, ex, tracestate)
        return request_trace

    def server(self, backend: Backend) -> Attributes:
        """`server.address` and `server.port` of a backend (read from its URL once)."""
        known = self.servers.get(backend.config.url)
        if known is None:
            url = urlsplit(backend.config.url)
            port = url.port or (443 if url.scheme == "https" else 80)
            known = self.servers[backend.config.url] = {
                "server.address": url.hostname or "",
                "server.port": port,
            }
        return known

    async def close(self, bound_s: float) -> None:
        """Export what is left and stop the export thread, waiting at most `bound_s` (the
        shutdown runs in a thread of its own, so a collector that hangs holds only it)."""
        stopping = threading.Thread(
            target=self.provider.shutdown, name="trace-shutdown", daemon=True
        )
        stopping.start()
        loop = asyncio.get_running_loop()
        until = loop.time() + bound_s
        while stopping.is_alive() and loop.time() < until:  # noqa: ASYNC110  (a thread, not a task)
            await asyncio.sleep(0.02)
        if stopping.is_alive():
            logger.warning(
                "tracing: the collector took no spans within %ss at stop; the rest are dropped",
                bound_s,
            )


class RequestTrace:
    """One request's spans: its own, and the attempt being made now."""

    __slots__ = (
        "current",
        "ex",
        "provider_name",
        "response_model",
        "span",
        "started",
        "tracestate",
        "tracing",
    )

    def __init__(
        self, tracing: Tracing, span: trace.Span, started: int, ex: Exchange, tracestate: str
    ) -> None:
        self.tracing = tracing
        self.span = span
        self.started = started  # the span's start, time.time_ns()
        self.ex = ex
        self.tracestate = tracestate  # the client's, passed on upstream
        self.current: trace.Span | None = None  # the attempt in progress
        self.response_model: str | None = None  # the upstream model of the attempt that answered
        self.provider_name: str | None = None

    def upstream(self) -> bytes:
        """The trace context header lines sent upstream: they name the attempt's span."""
        context = (self.current or self.span).get_span_context()
        return trace_lines(context.trace_id, context.span_id, context.trace_flags, self.tracestate)

    async def attempt(
        self, run: Attempt, backend: Backend, target: Target, may_retry: bool, why: str
    ) -> web.StreamResponse:
        """`run` on one target inside a CLIENT span of its own, which records how it went."""
        ex = self.ex
        model = target.upstream_model or ex.model_label
        attributes: Attributes = {
            **self.tracing.server(backend),
            "inference_proxy.backend": backend.name,
            "inference_proxy.attempt_reason": why,
            "gen_ai.provider.name": backend.config.kind,
            "gen_ai.request.model": model,
        }
        operation = operation_of(ex)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        span = self.current = self.tracing.tracer.start_span(
            f"{operation or 'attempt'} {model}",
            trace.set_span_in_context(self.span),
            SpanKind.CLIENT,
            attributes,
        )
        outcome: Attributes = {"error.type": "cancelled"}  # unless it returns or raises ours
        try:
            response = await run(backend, target, may_retry)
        except Retry as retry:
            outcome = attempt_failed(retry.reason, retry.error.type)
            raise
        except ProxyError as err:
            outcome = attempt_failed("", err.type)
            raise
        else:
            outcome = attempt_answered(ex)
            outcome["gen_ai.response.model"] = self.response_model = model
            self.provider_name = backend.config.kind
        finally:
            self.current = None
            if span.is_recording():
                span.set_attributes(outcome)
                if "error.type" in outcome:
                    span.set_status(Status(StatusCode.ERROR, str(outcome["error.type"])))
            span.end()
        return response

    def end(self, ex: Exchange, method: str) -> None:
        """End the request's span with what the request came to (called once, at its end)."""
        span = self.span
        if span.is_recording():
            attributes = request_attributes(ex)
            if self.response_model is not None and self.provider_name is not None:
                attributes["gen_ai.response.model"] = self.response_model
                attributes["gen_ai.provider.name"] = self.provider_name
            span.set_attributes(attributes)
            span.update_name(span_name(ex, method))
            if ex.sse and ex.first_byte_at is not None:
                ttft = ex.first_byte_at - ex.started
                span.add_event(
                    "first_token",
                    {"gen_ai.server.time_to_first_token": ttft},
                    timestamp=self.started + int(ttft * 1e9),
                )
            if "error.type" in attributes:
                span.set_status(Status(StatusCode.ERROR, str(attributes["error.type"])))
        span.end()
