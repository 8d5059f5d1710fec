"""Tracing's pure parts: traceparent read and written, span attributes from an Exchange, the
config's checks, the drop counts, and what a reload does with the tracer."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, load_config
from proxy.exchange import Exchange
from proxy.reload import changes
from proxy.supervisor import config_text
from proxy.tracing import (
    attempt_answered,
    attempt_failed,
    error_type,
    operation_of,
    parse_traceparent,
    passed_tracestate,
    request_attributes,
    span_name,
    trace_lines,
)
from proxy.tracing_sdk import SpanCounts, traces_url
from proxy.usage import Usage

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
BACKEND = "backends:\n  gpu: {url: 'http://127.0.0.1:8001', kind: vllm}\n"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([f"00-{TRACE_ID}-{SPAN_ID}-01"], (int(TRACE_ID, 16), int(SPAN_ID, 16), 1)),
        ([f"00-{TRACE_ID}-{SPAN_ID}-00"], (int(TRACE_ID, 16), int(SPAN_ID, 16), 0)),
        ([f" 00-{TRACE_ID}-{SPAN_ID}-03\t"], (int(TRACE_ID, 16), int(SPAN_ID, 16), 3)),
        ([f"01-{TRACE_ID}-{SPAN_ID}-01-what-comes-next"], (int(TRACE_ID, 16), int(SPAN_ID, 16), 1)),
        ([], None),
        ([f"00-{TRACE_ID}-{SPAN_ID}-01"] * 2, None),  # two headers: which one is meant?
        ([f"00-{TRACE_ID}-{SPAN_ID}-01-extra"], None),  # version 00 has exactly four fields
        ([f"ff-{TRACE_ID}-{SPAN_ID}-01"], None),
        ([f"00-{'0' * 32}-{SPAN_ID}-01"], None),
        ([f"00-{TRACE_ID}-{'0' * 16}-01"], None),
        ([f"00-{TRACE_ID.upper()}-{SPAN_ID}-01"], None),
        ([f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01"], None),
        ([f"00_{TRACE_ID}_{SPAN_ID}_01"], None),
        (["\u0660\u0660-" + TRACE_ID + "-" + SPAN_ID + "-01"], None),  # Arabic-Indic digits
        (["x" * 10_000], None),
    ],
)
def test_parse_traceparent(values: list[str], expected: tuple[int, int, int] | None) -> None:
    """W3C Trace Context: one valid value is read; anything else starts a new trace."""
    assert expected == parse_traceparent(values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["vendor=abc,x=1"], "vendor=abc,x=1"),
        (["a=1", "b=2"], "a=1,b=2"),  # several header lines are one list
        ([], ""),
        (["k=" + "v" * 600], ""),  # over the 512 characters every hop must pass on
        (["k=\x00"], ""),
        (["k=é"], ""),
    ],
)
def test_passed_tracestate(values: list[str], expected: str) -> None:
    """A client's tracestate goes upstream as is when short printable ASCII, else not at all."""
    assert expected == passed_tracestate(values)


def test_trace_lines_name_the_span() -> None:
    """The traceparent sent upstream names the given span, with its flags and tracestate."""
    assert (
        f"traceparent: 00-{TRACE_ID}-{SPAN_ID}-01\r\ntracestate: a=1\r\n".encode()
        == trace_lines(int(TRACE_ID, 16), int(SPAN_ID, 16), 1, "a=1")
    )
    assert f"traceparent: 00-{'0' * 31}1-{'0' * 15}2-00\r\n".encode() == trace_lines(1, 2, 0, "")


def exchange(route: str = "/v1/chat/completions", dialect: str = "openai") -> Exchange:
    ex = Exchange("req-1", route, 0.0, dialect)  # type: ignore[arg-type]
    return ex


def test_request_attributes_of_a_served_request() -> None:
    """A request served by a backend: route, status, model, backend, tries and usage."""
    ex = exchange()
    ex.model_label, ex.backend, ex.status = "qwen", "gpu", 200
    ex.tries = ["dead:unreachable", "gpu"]
    ex.usage = Usage(prompt=11, completion=4)
    assert {
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "inference_proxy.request_id": "req-1",
        "inference_proxy.backend": "gpu",
        "inference_proxy.attempts": 2,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "qwen",
        "gen_ai.usage.input_tokens": 11,
        "gen_ai.usage.output_tokens": 4,
    } == request_attributes(ex)
    assert "chat qwen" == span_name(ex, "POST")


def test_request_attributes_of_a_request_that_reached_no_backend() -> None:
    """A 401 before routing: no model, no usage, no error (a 4xx is the client's); named by
    its method and route."""
    ex = exchange()
    ex.status, ex.error_type = 401, "authentication_error"
    got = request_attributes(ex)
    assert {"gen_ai.request.model", "gen_ai.usage.input_tokens", "error.type"}.isdisjoint(got)
    assert ("none", 401) == (got["inference_proxy.backend"], got["http.response.status_code"])
    assert "POST /v1/chat/completions" == span_name(ex, "POST")


@pytest.mark.parametrize(
    ("status", "error", "stream_error", "expected"),
    [
        (200, None, None, None),
        (404, "not_found", None, None),
        (502, "backend_unreachable", None, "backend_unreachable"),
        (503, None, None, "503"),  # the backend's own 503, relayed
        (200, "backend_timeout", "backend_timeout", "backend_timeout"),  # a stream that stalled
    ],
)
def test_error_type(status: int, error: str | None, stream_error: str | None, expected) -> None:
    """The server span's error.type: the gateway's type on a 5xx or a broken stream."""
    ex = exchange()
    ex.status, ex.error_type, ex.stream_error = status, error, stream_error
    assert expected == error_type(ex)


@pytest.mark.parametrize(
    ("route", "dialect", "expected"),
    [
        ("/v1/chat/completions", "openai", "chat"),
        ("/gateway/openai/v1/completions", "openai", "text_completion"),
        ("/v1/embeddings", "openai", "embeddings"),
        ("/v1/responses", "openai", "chat"),
        ("/anthropic/v1/messages", "anthropic", "chat"),
        ("/gemini/{version}/models/{target}", "gemini", "generate_content"),
        ("/gateway/{endpoint}/invocations", "openai", None),
        ("/models/{endpoint}/proxy/{path}", "openai", None),
    ],
)
def test_operation_of(route: str, dialect: str, expected: str | None) -> None:
    """gen_ai.operation.name from the route template, where the route says."""
    assert expected == operation_of(exchange(route, dialect))


def test_attempt_outcomes() -> None:
    """An attempt left for a status names it; an unreachable one its reason; an answer its
    status and usage, and a 4xx answer is a client span's error."""
    assert {
        "error.type": "overloaded",
        "inference_proxy.retry_reason": "503",
        "http.response.status_code": 503,
    } == attempt_failed("503", "overloaded")
    assert {
        "error.type": "backend_unreachable",
        "inference_proxy.retry_reason": "unreachable",
    } == attempt_failed("unreachable", "backend_unreachable")
    assert {"error.type": "backend_timeout"} == attempt_failed("", "backend_timeout")
    ex = exchange()
    ex.status, ex.usage = 200, Usage(prompt=1, completion=2)
    assert {
        "http.response.status_code": 200,
        "gen_ai.usage.input_tokens": 1,
        "gen_ai.usage.output_tokens": 2,
    } == attempt_answered(ex)
    ex.status, ex.usage = 422, None
    assert {"http.response.status_code": 422, "error.type": "422"} == attempt_answered(ex)


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("https://otlp.example/v1/traces", "https://otlp.example/v1/traces"),
        ("http://c:4318/otlp/v1/traces", "http://c:4318/otlp/v1/traces"),
    ],
)
def test_traces_url(endpoint: str, url: str) -> None:
    """A collector's base URL gets the traces path; a URL with a path is used as given."""
    assert url == traces_url(endpoint)


def test_span_counts_bound_what_is_held() -> None:
    """Past the limit a span is dropped (queue_full); a batch sent frees its room, and a
    failed one counts its spans as export_failed."""
    counts = SpanCounts(2)
    assert [True, True, False, False] == [counts.take() for _ in range(4)]
    counts.sent(2, ok=False)
    assert [True, True, False] == [counts.take() for _ in range(3)]
    counts.sent(2, ok=True)
    assert {"queue_full": 3, "export_failed": 2} == counts.dropped()
    assert 0 == counts.held


def test_tracing_config_defaults() -> None:
    """Only the endpoint is required; the rest have their documented defaults."""
    config = load_config(BACKEND + "tracing: {otlp_endpoint: 'http://127.0.0.1:4318'}\n")
    assert config.tracing is not None
    assert ("inference-proxy", 1.0, 2048, 5.0) == (
        config.tracing.service_name,
        config.tracing.sample_ratio,
        config.tracing.max_queue,
        config.tracing.export_timeout_s,
    )
    assert load_config(BACKEND).tracing is None
    assert load_config(BACKEND + "tracing:\n").tracing is None  # as the supervisor writes it


def test_tracing_config_errors_name_their_keys() -> None:
    """--check names each bad tracing value by its key, every one in one run."""
    bad = (
        "tracing: {otlp_endpoint: 'grpc://collector:4317', service_name: '', sample_ratio: 1.5,"
        " max_queue: 0, export_timeout_s: 0, sampler: always}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(BACKEND + bad)
    assert [
        "tracing.sampler: unknown key",
        "tracing.otlp_endpoint: 'grpc://collector:4317' is not an http(s) URL with a host "
        "(OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces)",
        "tracing.service_name: must not be empty",
        "tracing.sample_ratio: must be a number from 0 to 1",
        "tracing.max_queue: must be at least 1",
        "tracing.export_timeout_s: must be a positive number",
    ] == caught.value.errors


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ("tracing: {otlp_endpoint: 'http://c:99999'}\n", "tracing.otlp_endpoint: not a valid URL"),
        ("tracing: {otlp_endpoint: 'c:4318'}\n", "tracing.otlp_endpoint: 'c:4318' is not"),
        ("tracing: {otlp_endpoint: 'http://c', sample_ratio: -0.1}\n", "tracing.sample_ratio"),
        ("tracing: {otlp_endpoint: 'http://c', sample_ratio: .nan}\n", "tracing.sample_ratio"),
        ("tracing: {sample_ratio: 0.5}\n", "tracing: object missing required field"),
        ("tracing: yes\n", "tracing: expected `object`"),
    ],
)
def test_a_bad_tracing_section_is_refused(section: str, error: str) -> None:
    """Each of these is a config error starting with its key."""
    with pytest.raises(ConfigError) as caught:
        load_config(BACKEND + section)
    assert [e for e in caught.value.errors if e.startswith(error)], caught.value.errors


def test_a_reload_that_changes_tracing_waits_for_a_restart() -> None:
    """A changed tracing section is named restart-only (the tracer is the app's)."""
    old = load_config(BACKEND + "tracing: {otlp_endpoint: 'http://a:4318'}\n")
    new = load_config(BACKEND + "tracing: {otlp_endpoint: 'http://b:4318'}\n")
    assert ("tracing",) == changes(old, new).restart_only
    assert () == changes(old, old).restart_only


def test_the_supervisor_s_copy_keeps_tracing() -> None:
    """Workers read the tracing section in force, and no section as none."""
    traced = load_config(
        BACKEND + "tracing: {otlp_endpoint: 'http://c:4318', sample_ratio: 0.25}\n"
    )
    assert traced == load_config(config_text(traced))
    plain = load_config(BACKEND)
    assert plain == load_config(config_text(plain))
