"""Bodies go upstream byte for byte; answers come back as the backend sent them."""

from __future__ import annotations

import hashlib

import aiohttp
import orjson
from yarl import URL

from tests.conftest import one_backend
from tests.fakes import chat_body, json_script

ODD_BODY = (
    b'{  "temperature":0.30000000000000004 ,"messages" : [ {"role":"user","content":"h\\u00e9llo \\"model\\": x"}],'
    b'\n "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"model":{"type":"string"}}}}}],'
    b'"x-vendor-field": {"nested": [1, 2.50, null, true]},   "model":"m", "stream":false }'
)


async def post(
    url: str | URL, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
        ) as r,
    ):
        return r.status, await r.read(), dict(r.headers)


async def test_odd_body_reaches_upstream_unchanged(gateway, upstream) -> None:
    """An odd body (spacing, key order, vendor fields, tools) arrives with the same sha256."""
    status, _, _ = await post(gateway.url + "/v1/chat/completions", ODD_BODY)
    assert 200 == status
    assert hashlib.sha256(ODD_BODY).hexdigest() == hashlib.sha256(upstream.last.body).hexdigest()
    assert "/v1/chat/completions" == upstream.last.path


async def test_model_rewritten_only_where_the_target_names_an_upstream_id(
    gateway_factory, upstream
) -> None:
    """Only the top-level model value changes; every other byte stays as sent."""
    models = "models:\n  m:\n    targets: [{backend: gpu, model: 'Org/Real-7B'}]\n"
    gw = await gateway_factory(one_backend(upstream.url, models=models))
    status, _, _ = await post(gw.url + "/v1/chat/completions", ODD_BODY)
    assert 200 == status
    assert ODD_BODY.replace(b'"model":"m"', b'"model":"Org/Real-7B"') == upstream.last.body


async def test_prefixed_routes_forward_to_v1(gateway, upstream) -> None:
    """The MLflow and Databricks base paths reach the backend's /v1 route."""
    for prefix in ("/gateway/mlflow", "/mlflow", "/gateway/openai", "/openai"):
        status, _, _ = await post(
            gateway.url + prefix + "/v1/embeddings", b'{"model":"m","input":"x"}'
        )
        assert 200 == status
        assert "/v1/embeddings" == upstream.last.path


async def test_headers_upstream_drop_credentials_and_hop_by_hop(gateway_factory, upstream) -> None:
    """Client credentials and hop-by-hop headers stay behind; the backend key and request id go."""
    text = f"backends:\n  gpu: {{url: '{upstream.url}', api_key_env: GPU_KEY}}\n"
    gw = await gateway_factory(text, {"API_KEYS": "k1", "GPU_KEY": "backend-secret"})
    headers = {
        "Authorization": "Bearer k1",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "hop",
        "X-Request-ID": "req-123",
    }
    status, _, resp_headers = await post(gw.url + "/v1/chat/completions", b'{"model":"m"}', headers)
    assert 200 == status
    got = upstream.last.headers
    assert "Bearer backend-secret" == got["authorization"]
    assert "kept" == got["x-custom"]
    assert "x-drop-me" not in got
    assert "req-123" == got["x-request-id"]
    assert "req-123" == resp_headers["X-Request-ID"]


async def test_no_credentials_reach_a_backend_without_a_key(gateway_factory, upstream) -> None:
    """With no api_key_env, the client's gateway key is not forwarded in any form."""
    gw = await gateway_factory(one_backend(upstream.url), {"API_KEYS": "k1"})
    status, _, _ = await post(
        gw.url + "/v1/chat/completions", b'{"model":"m"}', {"x-api-key": "k1"}
    )
    assert 200 == status
    assert not {"authorization", "x-api-key", "x-goog-api-key"} & set(upstream.last.headers)


async def test_backend_error_passes_through(gateway, upstream) -> None:
    """A backend's own error keeps its status, body and headers."""
    payload = {
        "object": "error",
        "message": "context too long",
        "type": "BadRequestError",
        "code": 400,
    }
    upstream.script["/v1/chat/completions"] = json_script(400, payload, {"X-Backend": "yes"})
    status, body, headers = await post(gateway.url + "/v1/chat/completions", b'{"model":"m"}')
    assert 400 == status
    assert payload == orjson.loads(body)
    assert "yes" == headers["X-Backend"]


async def test_query_string_forwarded(gateway, upstream) -> None:
    """The raw query string reaches the backend as sent."""
    url = URL(gateway.url + "/v1/chat/completions?api-version=2024-01-01&x=%2F", encoded=True)
    async with aiohttp.ClientSession() as s, s.post(url, data=b'{"model":"m"}') as r:
        assert 200 == r.status
    assert "api-version=2024-01-01&x=%2F" == upstream.last.query


async def test_weighted_choice_spreads_by_weight(gateway_factory, upstream_factory) -> None:
    """Two targets weighted 3:1 both receive traffic, the heavier one more."""
    a, b = await upstream_factory(), await upstream_factory()
    text = (
        f"backends:\n  a: {{url: '{a.url}'}}\n  b: {{url: '{b.url}'}}\n"
        "models:\n  m:\n    targets: [{backend: a, weight: 3}, {backend: b, weight: 1}]\n"
    )
    gw = await gateway_factory(text)
    for _ in range(80):
        await post(gw.url + "/v1/chat/completions", b'{"model":"m"}')
    assert 80 == len(a.posts) + len(b.posts)
    assert len(a.posts) > len(b.posts) > 0


async def test_fallback_used_when_backend_unreachable(gateway_factory, upstream) -> None:
    """A dead primary falls back to the fallback model's target, named by the fallback's id."""
    text = (
        f"backends:\n  dead: {{url: 'http://127.0.0.1:9'}}\n  live: {{url: '{upstream.url}'}}\n"
        "models:\n  big:\n    targets: [{backend: dead}]\n    fallbacks: [small]\n"
        "  small:\n    targets: [{backend: live}]\n"
    )
    gw = await gateway_factory(text)
    status, body, _ = await post(gw.url + "/v1/chat/completions", b'{"model": "big"}')
    assert 200 == status
    assert b'{"model": "small"}' == upstream.last.body
    assert chat_body(model="small") == orjson.loads(body)
