"""Metric values after known traffic, read back with prometheus_client's own parser."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import one_backend
from tests.fakes import stream_script

MODELS = "models:\n  m: {targets: [{backend: gpu, model: up-m}]}\n"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(all_samples, name: str, **labels: str) -> float:
    return all_samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_after_known_traffic(gateway_factory, upstream) -> None:
    """Requests, tokens, stream events, TTFT and errors count exactly what was sent."""
    gw = await gateway_factory(one_backend(upstream.url, models=MODELS))
    upstream.script["/v1/chat/completions"] = stream_script(tokens=4)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # JSON answers with usage 5 + 2
            async with s.post(gw.url + "/v1/completions", data=b'{"model": "m"}') as r:
                assert 200 == r.status
        for _ in range(3):  # streams: 4 tokens, finish, usage (7 + 4), [DONE] = 7 events
            async with s.post(
                gw.url + "/v1/chat/completions",
                data=b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}',
            ) as r:
                await r.read()
        async with s.post(gw.url + "/v1/chat/completions", data=b'{"model": "zzz"}') as r:
            assert 404 == r.status
        async with s.get(gw.url + "/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            got = samples(await r.text())
    assert 2 == value(
        got, "proxy_requests_total", route="/v1/completions", model="m", backend="gpu", status="200"
    )
    assert 3 == value(
        got,
        "proxy_requests_total",
        route="/v1/chat/completions",
        model="m",
        backend="gpu",
        status="200",
    )
    assert 1 == value(
        got,
        "proxy_requests_total",
        route="/v1/chat/completions",
        model="unknown",
        backend="none",
        status="404",
    )
    assert 2 * 5 + 3 * 7 == value(got, "proxy_tokens_total", model="m", kind="prompt")
    assert 2 * 2 + 3 * 4 == value(got, "proxy_tokens_total", model="m", kind="completion")
    assert 3 * 7 == value(got, "proxy_stream_chunks_total", model="m")
    assert 3 == value(got, "proxy_time_to_first_token_seconds_count", model="m", backend="gpu")
    assert 2 == value(
        got, "proxy_request_duration_seconds_count", route="/v1/completions", model="m"
    )
    assert 0 == value(got, "proxy_in_flight_requests", backend="gpu")
    assert 1 == value(got, "proxy_backend_up", backend="gpu")


async def test_upstream_errors_counted_by_type(gateway_factory) -> None:
    """A refused connection counts as backend_unreachable for that backend."""
    gw = await gateway_factory(one_backend("http://127.0.0.1:9"))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", data=b'{"model": "m"}') as r:
            assert 502 == r.status
        async with s.get(gw.url + "/metrics") as r:
            got = samples(await r.text())
    assert 1 == value(got, "proxy_upstream_errors_total", backend="gpu", type="backend_unreachable")
    assert 0 == value(got, "proxy_backend_up", backend="gpu")


async def test_junk_paths_do_not_mint_series(gateway) -> None:
    """Unmatched paths share one route label, so scanners cannot blow up the series count."""
    async with aiohttp.ClientSession() as s:
        for path in ("/a.php", "/b/c", "/wp-admin"):
            async with s.get(gateway.url + path) as r:
                assert 404 == r.status
        async with s.get(gateway.url + "/metrics") as r:
            text = await r.text()
    assert 'route="unmatched"' in text
    assert "wp-admin" not in text


async def test_one_access_log_line_per_request(gateway_factory, upstream) -> None:
    """Each request writes one JSON line with its id, route, model, backend, status and sizes."""
    import orjson

    gw = await gateway_factory(one_backend(upstream.url, models=MODELS), {"API_KEYS": "secret-k"})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            gw.url + "/v1/chat/completions",
            data=b'{"model": "m"}',
            headers={"Authorization": "Bearer secret-k", "X-Request-ID": "trace-7"},
        ) as r:
            body = await r.read()
    lines = [line for line in gw.access_lines() if b'"/metrics"' not in line]
    assert 1 == len(lines)
    record = orjson.loads(lines[0])
    assert {
        "request_id": "trace-7",
        "method": "POST",
        "route": "/v1/chat/completions",
        "model": "m",
        "backend": "gpu",
        "status": 200,
        "bytes_in": 14,
        "bytes_out": len(body),
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "key": "key-0",
    }.items() <= record.items()
    assert record["duration_ms"] >= record["ttfb_ms"] > 0
    assert b"secret-k" not in lines[0]
