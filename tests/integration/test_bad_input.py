"""Every bad input gets its 4xx envelope: never a 500, never a crash, nothing leaked."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest

from tests.conftest import one_backend, wait_for


async def call(
    url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, dict, dict[str, str]]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, data=body, headers=headers) as r:
            raw = await r.read()
            return r.status, orjson.loads(raw) if raw else {}, dict(r.headers)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"model": "m",', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"model"', "must be a JSON object"),
        (b"", "empty"),
        (b'{"messages": []}', "'model' is required"),
        (b'{"model": 7}', "'model' must be a non-empty string"),
        (b'{"model": null}', "'model' must be a non-empty string"),
        (b'{"model": "m", "stream": "yes"}', "'stream' must be true or false"),
        (b'{"model": "\xff\xfe"}', "UTF-8"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{}x", "not valid JSON"),
    ],
)
async def test_bad_bodies_are_400(gateway, upstream, body, fragment) -> None:
    """Each malformed body is a 400 invalid_request naming the problem; nothing goes upstream."""
    status, payload, _ = await call(gateway.url + "/v1/chat/completions", body)
    assert 400 == status
    assert "invalid_request" == payload["error"]["type"]
    assert fragment in payload["error"]["message"]
    assert {"type", "message"} == set(payload["error"])
    assert [] == upstream.posts


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf", "1s", "", "1e3"])
async def test_bad_timeout_header_is_400(gateway, value) -> None:
    """OICM-Request-Timeout must be a finite positive decimal number."""
    status, payload, _ = await call(
        gateway.url + "/v1/chat/completions", b'{"model": "m"}', {"OICM-Request-Timeout": value}
    )
    assert 400 == status
    assert "OICM-Request-Timeout" in payload["error"]["message"]


async def test_timeout_header_above_max_is_clamped(gateway_factory, upstream) -> None:
    """A value above timeouts.max_request_s is accepted and clamped, not refused."""
    gw = await gateway_factory(one_backend(upstream.url, extra="timeouts: {max_request_s: 200}\n"))
    status, _, _ = await call(
        gw.url + "/v1/chat/completions", b'{"model": "m"}', {"OICM-Request-Timeout": "99999"}
    )
    assert 200 == status


async def test_body_over_limit_is_413(gateway_factory, upstream) -> None:
    """A body over server.max_body_mb is a 413 payload_too_large, sized or chunked."""
    gw = await gateway_factory(one_backend(upstream.url, extra="server: {max_body_mb: 0.01}\n"))
    big = b'{"model": "m", "pad": "' + b"x" * 20000 + b'"}'
    status, payload, _ = await call(gw.url + "/v1/chat/completions", big)
    assert (413, "payload_too_large") == (status, payload["error"]["type"])

    async def chunks():
        for _ in range(20):
            yield b"x" * 1000

    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", data=chunks()) as r:
            assert 413 == r.status
            assert "payload_too_large" == (await r.json())["error"]["type"]
    assert [] == upstream.posts


async def test_unknown_route_is_404_envelope(gateway) -> None:
    """An unknown path gets the not_found envelope."""
    status, payload, _ = await call(gateway.url + "/v1/nope", b"{}")
    assert (404, "not_found") == (status, payload["error"]["type"])


async def test_wrong_method_is_405_envelope(gateway) -> None:
    """GET on a POST route gets an envelope, not aiohttp's HTML."""
    status, payload, _ = await call(gateway.url + "/v1/chat/completions", b"", method="GET")
    assert 405 == status
    assert "invalid_request" == payload["error"]["type"]


async def test_unknown_model_is_404(gateway_factory, upstream) -> None:
    """A model the config does not name is a 404 not_found."""
    gw = await gateway_factory(
        one_backend(upstream.url, models="models:\n  m: {targets: [{backend: gpu}]}\n")
    )
    status, payload, _ = await call(gw.url + "/v1/chat/completions", b'{"model": "nope"}')
    assert (404, "not_found") == (status, payload["error"]["type"])
    assert "nope" in payload["error"]["message"]


async def test_unreachable_backend_is_502(gateway_factory) -> None:
    """A backend that refuses connections gives 502 backend_unreachable."""
    gw = await gateway_factory(one_backend("http://127.0.0.1:9"))
    status, payload, _ = await call(gw.url + "/v1/chat/completions", b'{"model": "m"}')
    assert (502, "backend_unreachable") == (status, payload["error"]["type"])


async def test_overloaded_is_503_with_retry_after(gateway_factory, upstream) -> None:
    """A backend at max_in_flight for longer than server.queue_timeout_s gives 503 overloaded
    with Retry-After."""
    from tests.fakes import slow_json_script

    text = (
        f"backends:\n  gpu: {{url: '{upstream.url}', max_in_flight: 1}}\n"
        "server: {queue_timeout_s: 0.1}\n"
    )
    gw = await gateway_factory(text)
    upstream.script["/v1/chat/completions"] = slow_json_script(0.5)
    first = asyncio.create_task(call(gw.url + "/v1/chat/completions", b'{"model": "m"}'))
    await wait_for(lambda: len(upstream.posts) == 1)
    status, payload, headers = await call(gw.url + "/v1/chat/completions", b'{"model": "m"}')
    assert (503, "overloaded") == (status, payload["error"]["type"])
    assert "Retry-After" in headers
    assert 200 == (await first)[0]


async def test_half_body_then_vanish_leaks_nothing(gateway, upstream) -> None:
    """A client that sends half its body and disconnects gets nothing and leaks nothing."""
    port = int(gateway.url.rsplit(":", 1)[1])
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"'
        )
        await asyncio.sleep(0.05)
        sock.close()
    await asyncio.sleep(0.1)
    assert [] == upstream.posts
    assert 0 == gateway.state.backends["gpu"].in_flight
    status, _, _ = await call(gateway.url + "/v1/chat/completions", b'{"model": "m"}')
    assert 200 == status
    metrics = await call_text(gateway.url + "/metrics")
    assert 'status="499"' in metrics


async def call_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


async def test_request_id_returned_on_errors(gateway) -> None:
    """Even an error response carries the client's X-Request-ID."""
    _, _, headers = await call(
        gateway.url + "/v1/chat/completions", b"[]", {"X-Request-ID": "abc-1"}
    )
    assert "abc-1" == headers["X-Request-ID"]


async def test_embeddings_on_tgi_is_501(gateway_factory, upstream) -> None:
    """TGI has no /v1/embeddings: the gateway answers 501 unsupported and sends nothing."""
    text = f"backends:\n  gpu: {{url: '{upstream.url}', kind: tgi}}\n"
    gw = await gateway_factory(text)
    status, payload, _ = await call(gw.url + "/v1/embeddings", b'{"model": "m", "input": "x"}')
    assert (501, "unsupported") == (status, payload["error"]["type"])
    assert "does not serve /v1/embeddings" in payload["error"]["message"]
    assert [] == upstream.posts
