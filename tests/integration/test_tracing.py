"""Tracing against a real OTLP/HTTP receiver on 127.0.0.1: the request's SERVER span with
its GenAI attributes, one CLIENT span per upstream attempt, the W3C trace context continued
from the client and sent upstream naming the attempt; sampling; a collector that hangs or
refuses costs requests nothing, and what it did not take is counted."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.conftest import one_backend, wait_for
from tests.fakes import stream_script
from tests.integration.test_metrics import samples, value

CHAT = "/v1/chat/completions"
BODY = b'{"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}'
STREAM = b'{"model": "qwen", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
README = Path(__file__).resolve().parents[2] / "README.md"


class Receiver:
    """An OTLP/HTTP collector: decodes each ExportTraceServiceRequest posted to /v1/traces
    and keeps its spans; with `hang`, it reads each request and never answers it."""

    def __init__(self, hang: bool = False, status: int = 200) -> None:
        self.hang = hang
        self.status = status  # what it answers (500: it takes nothing)
        self.spans: list[Span] = []
        self.posts = 0
        self.answered = 0
        self.release = asyncio.Event()  # set at the end: a hung answer finally goes
        self.services: set[str] = set()  # the resources' service.name
        self.url = ""

    async def traces(self, request: web.Request) -> web.Response:
        payload = ExportTraceServiceRequest.FromString(await request.read())
        self.posts += 1
        if self.hang:
            await asyncio.wait_for(self.release.wait(), 60)
        for resource in payload.resource_spans:
            self.services.add(attrs(resource.resource)["service.name"])
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        self.answered += 1
        if self.status != 200:
            return web.Response(status=self.status, text="collector broken")
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def kind(self, kind: int) -> list[Span]:
        return [s for s in self.spans if s.kind == kind]


@pytest.fixture(autouse=True)
def quick_batches(monkeypatch) -> None:
    """Spans leave for the collector 20 ms after they end (the SDK's default is 5 s)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")


async def start_receiver(hang: bool = False, status: int = 200) -> tuple[Receiver, TestServer]:
    receiver = Receiver(hang, status)
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.traces)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    receiver.url = f"http://127.0.0.1:{server.port}/v1/traces"
    return receiver, server


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver, server = await start_receiver()
    yield receiver
    await server.close()


def refused_url() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/traces"


def traced_config(url: str, endpoint: str, tracing: str = "", models: str = "") -> str:
    models = models or "models:\n  qwen: {targets: [{backend: gpu, model: Qwen/Qwen2.5-7B}]}\n"
    return one_backend(
        url, models=models, extra=f"tracing: {{otlp_endpoint: '{endpoint}'{tracing}}}\n"
    )


def attrs(item) -> dict:
    """A span's (or event's) attributes as plain values."""
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in item.attributes}


async def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + CHAT, data=body, headers=headers) as r:
            await r.read()
            return r.status


def traceparent_of(upstream) -> tuple[str, str, str]:
    """(trace id, parent id, flags) of the traceparent the backend got last."""
    version, trace_id, parent, flags = upstream.last.headers["traceparent"].split("-")
    assert "00" == version
    return trace_id, parent, flags


async def test_a_request_span_and_its_attempt_continue_the_client_s_trace(
    gateway_factory, upstream, receiver
) -> None:
    """A JSON answer: the SERVER span is the client span's child and carries the GenAI
    attributes (model asked, model answered, usage 5 + 2); the one CLIENT span is its
    child, names the backend, and is the parent the backend's traceparent names."""
    gw = await gateway_factory(traced_config(upstream.url, receiver.url))
    sent = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc,x=1"}
    assert 200 == await post(gw.url, BODY, sent)
    await wait_for(lambda: len(receiver.spans) == 2)
    (server,), (client,) = (
        receiver.kind(Span.SPAN_KIND_SERVER),
        receiver.kind(Span.SPAN_KIND_CLIENT),
    )
    assert (TRACE_ID, TRACE_ID) == (server.trace_id.hex(), client.trace_id.hex())
    assert (CLIENT_SPAN, server.span_id) == (server.parent_span_id.hex(), client.parent_span_id)
    assert "chat qwen" == server.name
    assert {
        "http.request.method": "POST",
        "http.route": CHAT,
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "qwen",
        "gen_ai.response.model": "Qwen/Qwen2.5-7B",
        "gen_ai.provider.name": "vllm",
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 2,
        "inference_proxy.backend": "gpu",
        "inference_proxy.attempts": 1,
    }.items() <= attrs(server).items()
    port = int(upstream.url.rsplit(":", 1)[1])
    assert {
        "server.address": "127.0.0.1",
        "server.port": port,
        "inference_proxy.backend": "gpu",
        "inference_proxy.attempt_reason": "only",
        "gen_ai.request.model": "Qwen/Qwen2.5-7B",
        "http.response.status_code": 200,
    }.items() <= attrs(client).items()
    assert (TRACE_ID, client.span_id.hex(), "01") == traceparent_of(upstream)
    assert "vendor=abc,x=1" == upstream.last.headers["tracestate"]
    assert Status.STATUS_CODE_ERROR not in (server.status.code, client.status.code)


async def test_a_stream_s_span_has_its_usage_and_first_token_event(
    gateway_factory, upstream, receiver
) -> None:
    """A stream: usage from its usage chunk (7 + 3), and a `first_token` event within the
    span, carrying the time to first token."""
    upstream.script[CHAT] = stream_script(tokens=3)
    gw = await gateway_factory(traced_config(upstream.url, receiver.url))
    assert 200 == await post(gw.url, STREAM)
    await wait_for(lambda: len(receiver.spans) == 2)
    (server,) = receiver.kind(Span.SPAN_KIND_SERVER)
    got = attrs(server)
    assert (7, 3) == (got["gen_ai.usage.input_tokens"], got["gen_ai.usage.output_tokens"])
    (event,) = server.events
    assert "first_token" == event.name
    ttft = attrs(event)["gen_ai.server.time_to_first_token"]
    assert server.start_time_unix_nano + int(ttft * 1e9) == event.time_unix_nano
    assert server.start_time_unix_nano <= event.time_unix_nano <= server.end_time_unix_nano
    (client,) = receiver.kind(Span.SPAN_KIND_CLIENT)
    assert (7, 3) == (
        attrs(client)["gen_ai.usage.input_tokens"],
        attrs(client)["gen_ai.usage.output_tokens"],
    )


async def test_each_attempt_has_its_span_with_why_it_was_left(
    gateway_factory, upstream, receiver
) -> None:
    """A target that refuses connections, then the fallback that answers: two CLIENT spans
    under the one SERVER span, the first an error saying it was left as unreachable; the
    backend's traceparent names the second."""
    models = (
        "models:\n"
        "  qwen: {targets: [{backend: dead}], fallbacks: [small]}\n"
        "  small: {targets: [{backend: gpu}]}\n"
    )
    config = traced_config(upstream.url, receiver.url, models=models).replace(
        "backends:\n", f"backends:\n  dead: {{url: '{refused_url()[:-10]}', kind: vllm}}\n"
    )
    gw = await gateway_factory(config)
    assert 200 == await post(gw.url, BODY)
    await wait_for(lambda: len(receiver.spans) == 3)
    (server,) = receiver.kind(Span.SPAN_KIND_SERVER)
    first, second = sorted(
        receiver.kind(Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano
    )
    assert [server.span_id] * 2 == [first.parent_span_id, second.parent_span_id]
    assert {
        "inference_proxy.backend": "dead",
        "inference_proxy.attempt_reason": "only",
        "inference_proxy.retry_reason": "unreachable",
        "error.type": "backend_unreachable",
    }.items() <= attrs(first).items()
    assert Status.STATUS_CODE_ERROR == first.status.code
    assert {
        "inference_proxy.backend": "gpu",
        "inference_proxy.attempt_reason": "fallback",
        "http.response.status_code": 200,
    }.items() <= attrs(second).items()
    assert "error.type" not in attrs(second)
    assert (2, "gpu") == (
        attrs(server)["inference_proxy.attempts"],
        attrs(server)["inference_proxy.backend"],
    )
    trace_id, parent, flags = traceparent_of(upstream)
    assert (server.trace_id.hex(), second.span_id.hex(), 1) == (
        trace_id,
        parent,
        int(flags, 16) & 1,
    )


async def test_a_translated_request_sends_the_attempt_s_traceparent(
    gateway_factory, upstream, receiver
) -> None:
    """The Anthropic route translated to chat (a tgi backend): the backend's traceparent
    names the attempt span too, in the client's trace."""
    config = traced_config(upstream.url, receiver.url).replace("kind: vllm", "kind: tgi")
    gw = await gateway_factory(config)
    body = b'{"model": "qwen", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/anthropic/v1/messages", data=body, headers=headers) as r:
            assert 200 == r.status
    await wait_for(lambda: len(receiver.spans) == 2)
    (client,) = receiver.kind(Span.SPAN_KIND_CLIENT)
    assert (TRACE_ID, client.span_id.hex(), "01") == traceparent_of(upstream)
    assert "chat" == attrs(client)["gen_ai.operation.name"]


async def test_sample_ratio_0_exports_nothing_and_still_sends_trace_context(
    gateway_factory, upstream, receiver
) -> None:
    """With sample_ratio 0 a request without a traceparent, and one whose client did not
    sample it, export nothing; the backend still gets a traceparent (unsampled; the
    client's trace id where it sent one). A client's sampled flag is honoured."""
    gw = await gateway_factory(traced_config(upstream.url, receiver.url, ", sample_ratio: 0"))
    assert 200 == await post(gw.url, BODY)
    trace_id, _, flags = traceparent_of(upstream)
    assert (32, 0) == (len(trace_id), int(flags, 16) & 1)  # not sampled
    assert 200 == await post(gw.url, BODY, {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-00"})
    trace_id, parent, flags = traceparent_of(upstream)
    assert (TRACE_ID, "00") == (trace_id, flags)
    assert CLIENT_SPAN != parent
    sampled = "0af7651916cd43dd8448eb211c80319c"
    assert 200 == await post(gw.url, BODY, {"traceparent": f"00-{sampled}-{CLIENT_SPAN}-01"})
    await wait_for(lambda: len(receiver.spans) == 2)  # the spans after the unsampled ones
    await asyncio.sleep(0.1)  # one more batch period: nothing else arrives
    assert {sampled} == {s.trace_id.hex() for s in receiver.spans}


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE_ID}-{CLIENT_SPAN}",  # a field short
        f"ff-{TRACE_ID}-{CLIENT_SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",  # an all-zero trace id
        f"00-{TRACE_ID.upper()}-{CLIENT_SPAN}-01",  # uppercase hex
        "x" * 4000,
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace(
    gateway_factory, upstream, receiver, value
) -> None:
    """A client's broken traceparent is not continued (nor passed on): the request span is
    a root, the backend gets a traceparent of the gateway's own trace, and no tracestate."""
    gw = await gateway_factory(traced_config(upstream.url, receiver.url))
    assert 200 == await post(gw.url, BODY, {"traceparent": value, "tracestate": "a=b"})
    await wait_for(lambda: len(receiver.spans) == 2)
    (server,) = receiver.kind(Span.SPAN_KIND_SERVER)
    assert b"" == server.parent_span_id
    assert server.trace_id.hex() == traceparent_of(upstream)[0]
    assert "tracestate" not in upstream.last.headers


async def test_health_ready_and_metrics_are_not_traced(gateway_factory, upstream, receiver) -> None:
    """Probes and scrapes make no spans: only the model request that follows them is traced."""
    gw = await gateway_factory(traced_config(upstream.url, receiver.url))
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/ready", "/metrics"):
            async with s.get(gw.url + path) as r:
                assert 200 == r.status
    assert 200 == await post(gw.url, BODY)
    await wait_for(lambda: len(receiver.spans) == 2)
    await asyncio.sleep(0.1)  # one more batch period: nothing else arrives
    assert {"chat qwen", "chat Qwen/Qwen2.5-7B"} == {s.name for s in receiver.spans}


async def test_tracing_off_passes_the_client_s_trace_context_as_is(
    gateway_factory, upstream
) -> None:
    """Without `tracing`, the client's traceparent and tracestate reach the backend unchanged."""
    gw = await gateway_factory(one_backend(upstream.url))
    sent = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc"}
    assert 200 == await post(gw.url, BODY.replace(b"qwen", b"m"), sent)
    got = upstream.last.headers
    assert sent == {"traceparent": got["traceparent"], "tracestate": got["tracestate"]}
    assert gw.state.tracer is None


async def dropped(gw) -> dict[str, float]:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/metrics") as r:
            got = samples(await r.text())
    return {
        reason: value(got, "proxy_trace_spans_dropped_total", reason=reason)
        for reason in ("queue_full", "export_failed")
    }


async def test_a_collector_that_never_answers_costs_requests_nothing(
    gateway_factory, upstream
) -> None:
    """A collector that takes the connection and never answers: 20 requests all answer 200
    while it still holds the first batch unanswered; spans past max_queue are dropped and
    counted, and the hung batch counts as failed once its export times out."""
    receiver, server = await start_receiver(hang=True)
    try:
        tracing = ", max_queue: 4, export_timeout_s: 0.5"
        gw = await gateway_factory(traced_config(upstream.url, receiver.url, tracing))
        statuses = [await post(gw.url, BODY) for _ in range(20)]
        assert [200] * 20 == statuses
        assert 0 == receiver.answered
        assert 1 <= receiver.posts
        first = await dropped(gw)
        assert first["queue_full"] > 0
        for _ in range(100):  # the hung export times out after 0.5 s (bounded wait: 10 s)
            counts = await dropped(gw)
            if counts["export_failed"] > 0:
                break
            await asyncio.sleep(0.1)
        assert counts["export_failed"] > 0
    finally:
        receiver.release.set()
        await server.close()


async def test_a_collector_that_refuses_connections_costs_requests_nothing(
    gateway_factory, upstream
) -> None:
    """No collector listening: requests answer 200, and the spans whose export failed are
    counted."""
    tracing = ", export_timeout_s: 0.3"
    gw = await gateway_factory(traced_config(upstream.url, refused_url(), tracing))
    assert [200] * 5 == [await post(gw.url, BODY) for _ in range(5)]
    for _ in range(100):  # bounded: 10 s
        counts = await dropped(gw)
        if counts["export_failed"] >= 2:
            break
        await asyncio.sleep(0.1)
    assert counts["export_failed"] >= 2


async def test_stopping_flushes_the_last_spans(
    gateway_factory, upstream, receiver, monkeypatch
) -> None:
    """With the SDK's own 5 s batch delay, spans still queued when the gateway stops are
    exported by the stop."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "5000")
    gw = await gateway_factory(traced_config(upstream.url, receiver.url))
    assert 200 == await post(gw.url, BODY)
    assert [] == receiver.spans
    await gw.serving.close(0)
    assert 2 == len(receiver.spans)


async def test_stopping_with_a_hung_collector_ends(gateway_factory, upstream) -> None:
    """A collector that never answers does not hold the stop past export_timeout_s: the
    gateway's close returns while the collector still holds its batch."""
    receiver, server = await start_receiver(hang=True)
    try:
        gw = await gateway_factory(
            traced_config(upstream.url, receiver.url, ", export_timeout_s: 1")
        )
        assert 200 == await post(gw.url, BODY)
        await wait_for(lambda: receiver.posts == 1)
        await gw.serving.close(0)
        assert 0 == receiver.answered
    finally:
        receiver.release.set()
        await server.close()


async def test_the_readme_example_traces(gateway_factory, upstream, receiver) -> None:
    """README's Tracing example (its endpoint pointed at the test's collector) loads and
    exports a sampled request's spans under its service name."""
    section = README.read_text().split("\n## Tracing\n", 1)[1].split("\n## ", 1)[0]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    example["tracing"]["otlp_endpoint"] = receiver.url
    example["backends"] = {"gpu-a": {"url": upstream.url, "kind": "vllm"}}
    gw = await gateway_factory(orjson.dumps(example).decode())
    sampled = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}
    assert 200 == await post(gw.url, BODY.replace(b"qwen", b"m"), sampled)
    await wait_for(lambda: len(receiver.spans) == 2)
    assert {example["tracing"]["service_name"]} == receiver.services


async def test_a_collector_that_answers_500_is_counted(gateway_factory, upstream) -> None:
    """A collector that refuses every batch with a 500 (not retried): requests answer 200 and
    each refused span counts as export_failed."""
    receiver, server = await start_receiver(status=500)
    try:
        gw = await gateway_factory(traced_config(upstream.url, receiver.url))
        assert [200] * 3 == [await post(gw.url, BODY) for _ in range(3)]
        await wait_for(lambda: len(receiver.spans) == 6)
        for _ in range(100):  # bounded: 10 s
            counts = await dropped(gw)
            if counts["export_failed"] == 6:
                break
            await asyncio.sleep(0.1)
        assert {"queue_full": 0, "export_failed": 6} == counts
    finally:
        await server.close()


async def test_a_keyless_client_s_trace_gets_a_401_span_and_nothing_upstream(
    gateway_factory, upstream, receiver
) -> None:
    """A client without a key may send a sampled traceparent: it gets its 401 and one SERVER
    span (no model, no error: a 4xx is the client's); nothing reaches the backend."""
    gw = await gateway_factory(traced_config(upstream.url, receiver.url), {"API_KEYS": "k"})
    assert 401 == await post(gw.url, BODY, {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
    await wait_for(lambda: len(receiver.spans) == 1)
    (server,) = receiver.spans
    got = attrs(server)
    assert (401, "none") == (got["http.response.status_code"], got["inference_proxy.backend"])
    assert {"gen_ai.request.model", "error.type"}.isdisjoint(got)
    assert [] == upstream.posts


def test_without_tracing_the_sdk_is_never_imported() -> None:
    """A gateway built and started without `tracing` imports no OpenTelemetry module."""
    code = (
        "import asyncio, sys\n"
        "from proxy.app import create_app, serve_app\n"
        "from proxy.config import load_config\n"
        "config = load_config(\"backends: {gpu: {url: 'http://127.0.0.1:9'}}\")\n"
        "async def main():\n"
        "    serving = await serve_app(create_app(config, {}), config, '127.0.0.1', 0)\n"
        "    await serving.close(0)\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "[]" == done.stdout.strip().splitlines()[-1]
