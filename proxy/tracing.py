"""Traces (README: Tracing): what a request's spans say, and the W3C trace context it carries.

The gateway's side of tracing, free of the OpenTelemetry SDK: the pure parts (the spans'
names and attributes from an `Exchange`, `traceparent` parsed and written) and `traced`, which
imports `proxy.tracing_sdk` (and with it the SDK) only when `tracing` is configured. A
gateway without it never imports the SDK and pays one `is not None` test per hook.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.config import TracingConfig
from proxy.exchange import NO_BACKEND, Exchange
from proxy.usage import Usage

if TYPE_CHECKING:
    from proxy.metrics import Metrics
    from proxy.state import GatewayState
    from proxy.tracing_sdk import RequestTrace

Attributes = dict[str, str | int | float | bool]

# The request's spans, set by the middleware when tracing is on (read only then).
TRACE: web.RequestKey[RequestTrace] = web.RequestKey("trace")

# Routes whose requests make no span: load balancers' probes and Prometheus's scrapes.
UNTRACED = frozenset({"/health", "/ready", "/metrics"})

# W3C Trace Context level 1: version-traceid-parentid-flags, lowercase hex.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MAX_TRACESTATE = 512  # what the spec asks every hop to pass on at least

# GenAI operation names (gen_ai.operation.name) by the end of the route template.
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
    ("/messages", "chat"),
)


def parse_traceparent(values: list[str]) -> tuple[int, int, int] | None:
    """The (trace id, parent span id, flags) of a request's `traceparent` header values, or
    None when there is not exactly one valid value (the gateway then starts a new trace).

    Version 00 must be exactly the four fields; a later version may add fields after a
    dash (read as 00); version ff, and all-zero ids, are invalid.
    """
    if len(values) != 1:
        return None
    match = _TRACEPARENT.fullmatch(values[0].strip(" \t"))
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


def passed_tracestate(values: list[str]) -> str:
    """The client's `tracestate`, passed on as is when it is short printable ASCII ("" not)."""
    value = ",".join(values)
    if len(value) > _MAX_TRACESTATE or not (value.isascii() and value.isprintable()):
        return ""
    return value


def trace_lines(trace_id: int, span_id: int, flags: int, tracestate: str) -> bytes:
    """The `traceparent` (and `tracestate`) header lines naming span `span_id` upstream."""
    line = b"traceparent: 00-%032x-%016x-%02x\r\n" % (trace_id, span_id, flags)
    return line + (b"tracestate: " + tracestate.encode("ascii") + b"\r\n" if tracestate else b"")


def operation_of(ex: Exchange) -> str | None:
    """The GenAI operation a request's route performs, when its route says."""
    if ex.dialect == "gemini":
        return "generate_content"
    return next((name for end, name in _OPERATIONS if ex.route.endswith(end)), None)


def span_name(ex: Exchange, method: str) -> str:
    """`{operation} {model}` (GenAI's span name) for a model request, else `{method} {route}`."""
    operation = operation_of(ex)
    if operation is not None and ex.backend != NO_BACKEND:
        return f"{operation} {ex.model_label}"
    return f"{method} {ex.route}"


def usage_attributes(usage: Usage | None) -> Attributes:
    """The token counts the backend reported, as GenAI usage attributes."""
    if usage is None:
        return {}
    return {
        "gen_ai.usage.input_tokens": usage.prompt,
        "gen_ai.usage.output_tokens": usage.completion,
    }


def error_type(ex: Exchange) -> str | None:
    """Why the request failed (the gateway's error type), None when it did not: a stream
    that ended with an error, or a 5xx (a 4xx is the client's, not the server span's)."""
    if ex.stream_error is not None:
        return ex.stream_error
    if ex.status >= 500:
        return ex.error_type or str(ex.status)
    return None


def request_attributes(ex: Exchange) -> Attributes:
    """The request span's attributes once the request has ended."""
    attributes: Attributes = {
        "http.route": ex.route,
        "inference_proxy.request_id": ex.request_id,
        "inference_proxy.backend": ex.backend,
        "inference_proxy.attempts": len(ex.tries),
    }
    if ex.status:
        attributes["http.response.status_code"] = ex.status
    operation = operation_of(ex)
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    if ex.backend != NO_BACKEND:
        attributes["gen_ai.request.model"] = ex.model_label
    attributes.update(usage_attributes(ex.usage))
    error = error_type(ex)
    if error is not None:
        attributes["error.type"] = error
    return attributes


def attempt_failed(reason: str, kind: str) -> Attributes:
    """An attempt that ended in an error of the gateway's type `kind` before it answered;
    `reason` is why the next target was tried ("" when none was)."""
    attributes: Attributes = {"error.type": kind}
    if reason:
        attributes["inference_proxy.retry_reason"] = reason
        if reason.isdigit():  # the backend answered with this status
            attributes["http.response.status_code"] = int(reason)
    return attributes


def attempt_answered(ex: Exchange) -> Attributes:
    """An attempt whose answer was relayed: its status, usage, and how it ended."""
    attributes: Attributes = {"http.response.status_code": ex.status}
    attributes.update(usage_attributes(ex.usage))
    if ex.stream_error is not None:
        attributes["error.type"] = ex.stream_error
    elif ex.status >= 400:
        attributes["error.type"] = str(ex.status)
    return attributes


async def traced(
    state: GatewayState, config: TracingConfig, metrics: Metrics
) -> AsyncIterator[None]:
    """The app's tracer for its life (a `cleanup_ctx`): started with the app, then shut down
    once the gateway has drained, its last spans flushed within `export_timeout_s`."""
    from proxy import tracing_sdk  # here, not above: the SDK is imported only when configured

    tracing = tracing_sdk.Tracing(config)
    state.tracer = tracing
    metrics.trace_spans_dropped = tracing.counts.dropped
    try:
        yield
    finally:
        await tracing.close(config.export_timeout_s)
