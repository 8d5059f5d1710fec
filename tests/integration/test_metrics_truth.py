"""Metrics that tell the truth: cut streams, complete streams whose client left first,
disconnects by phase, the gap between events, and process figures."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import openai
from aiohttp import web

from tests.conftest import one_backend, wait_for
from tests.fakes import Received, chunk_event, json_script, stream_script
from tests.integration.test_metrics import samples, value
from tests.integration.test_streaming import raw_request

MODELS = "models:\n  m: {targets: [{backend: gpu}]}\n"
STREAM = b'{"model": "m", "stream": true}'


async def scrape(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return samples(await r.text())


def error_ratio(got: dict) -> float:
    """The README's error-ratio expression, evaluated over the counters' values (a rate()
    over a window that starts at zero has the same ratio as the counters themselves):

    (sum(rate(proxy_requests_total{status=~"5.."}[5m]))
      + sum(rate(proxy_stream_errors_total[5m]))) / sum(rate(proxy_requests_total[5m]))
    """
    requests = {k: v for k, v in got.items() if k[0] == "proxy_requests_total"}
    failed = sum(v for k, v in requests.items() if dict(k[1])["status"].startswith("5"))
    cut = sum(v for k, v in got.items() if k[0] == "proxy_stream_errors_total")
    return (failed + cut) / sum(requests.values())


async def test_cut_stream_is_seen_by_the_error_ratio(gateway_factory, upstream) -> None:
    """A stream the backend cuts is a 200 in proxy_requests_total (its head went out) and a
    proxy_stream_errors_total sample, so the documented error ratio counts it with the 5xx."""
    gw = await gateway_factory(one_backend(upstream.url, models=MODELS))
    chat = "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        upstream.script[chat] = stream_script(tokens=5, cut_after=2)
        async with s.post(gw.url + chat, data=STREAM) as r:
            body = await r.read()
        assert b'"type":"backend_unreachable"' in body
        upstream.script[chat] = stream_script(tokens=2)
        async with s.post(gw.url + chat, data=STREAM) as r:
            assert b"data: [DONE]" in await r.read()
        upstream.script[chat] = json_script(500, {"error": "engine died"})
        async with s.post(gw.url + chat, data=b'{"model": "m"}') as r:
            assert 500 == r.status
        async with s.post(gw.url + "/v1/completions", data=b'{"model": "m"}') as r:
            assert 200 == r.status
    got = await scrape(gw.url)
    assert 2 == value(
        got, "proxy_requests_total", route=chat, model="m", backend="gpu", status="200"
    )
    assert 1 == value(
        got, "proxy_stream_errors_total", model="m", backend="gpu", type="backend_unreachable"
    )
    assert 0.5 == error_ratio(got)  # the 500 and the cut stream, of four requests


async def test_sdk_closing_after_done_is_a_200(gateway_factory, upstream) -> None:
    """The openai SDK closes its connection once it has read `data: [DONE]`; when the
    backend's end of body comes later, the stream is still a complete 200, not a 499."""

    async def late_terminator(request: web.Request, rec: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(chunk_event(i, f"t{i}"))
        await response.write(chunk_event(3, finish="stop"))
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(1.0)  # vLLM's chunked terminator, arriving after the SDK left
        await response.write_eof()
        return response

    gw = await gateway_factory(one_backend(upstream.url, models=MODELS))
    upstream.script["/v1/chat/completions"] = late_terminator
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "t0t1t2" == text
    await wait_for(lambda: len(gw.access_lines()) == 1 and gw.state.backends["gpu"].in_flight == 0)
    line = json.loads(gw.access_lines()[0])
    assert (200, False) == (line["status"], line["client_gone"])
    got = await scrape(gw.url)
    assert 1 == value(
        got,
        "proxy_requests_total",
        route="/v1/chat/completions",
        model="m",
        backend="gpu",
        status="200",
    )
    assert not any(k[0] == "proxy_client_disconnects_total" for k in got)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_client_disconnects_counted_by_phase(gateway_factory, upstream) -> None:
    """A client leaving mid-body, before the backend's head, before the first event and
    mid-stream is counted once in each phase, as a 499."""
    gw = await gateway_factory(one_backend(upstream.url, models=MODELS))
    port = _port(gw.url)
    chat = "/v1/chat/completions"
    # mid-body: the head promises 100 bytes, 10 arrive, then the client is gone
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    sock.sendall(b'{"model": ')
    await asyncio.sleep(0.2)
    sock.close()
    await wait_for(lambda: len(gw.access_lines()) == 1)
    phases = [
        stream_script(header_delay=10),
        stream_script(first_delay=10),
        stream_script(tokens=100, gap=0.05),
    ]
    for n, script in enumerate(phases, start=1):
        upstream.script[chat] = script
        sock = raw_request(port, STREAM)
        await wait_for(lambda n=n: len(upstream.posts) == n)
        await asyncio.sleep(0.3)
        sock.close()
        await wait_for(lambda n=n: len(gw.access_lines()) == n + 1)
    got = await scrape(gw.url)
    for phase, backend in (
        ("request", "none"),
        ("upstream_head", "gpu"),
        ("first_event", "gpu"),
        ("mid_stream", "gpu"),
    ):
        model = "unknown" if phase == "request" else "m"
        assert 1 == value(
            got, "proxy_client_disconnects_total", model=model, backend=backend, phase=phase
        ), phase
    statuses = [json.loads(line)["status"] for line in gw.access_lines()[:4]]
    assert [499, 499, 499, 499] == statuses


async def test_inter_event_gap_observed_once_per_stream(gateway_factory, upstream) -> None:
    """Each stream adds one observation: the mean gap between its events."""
    gw = await gateway_factory(one_backend(upstream.url, models=MODELS))
    upstream.script["/v1/chat/completions"] = stream_script(tokens=5, gap=0.05)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(gw.url + "/v1/chat/completions", data=STREAM) as r:
                await r.read()
    got = await scrape(gw.url)
    count = value(got, "proxy_inter_event_seconds_count", model="m", backend="gpu")
    total = value(got, "proxy_inter_event_seconds_sum", model="m", backend="gpu")
    assert 2 == count
    # 5 tokens 50 ms apart, then finish, usage and [DONE]: 8 events over at least 0.2 s
    assert total / count >= 0.2 / 7


async def test_process_metrics_are_served(gateway) -> None:
    """/metrics carries the serving process's RSS and open file descriptors."""
    got = await scrape(gateway.url)
    assert value(got, "process_resident_memory_bytes") > 0
    assert value(got, "process_open_fds") > 0
    assert value(got, "process_max_fds") > 0
