"""vLLM's and SGLang's helper routes, /tokenize and /detokenize, routed by the body's model."""

from __future__ import annotations

import aiohttp
import pytest

from tests.fakes import json_script

TOKENIZE = b'{"model": "m",  "prompt": "Hello there", "add_special_tokens": true}'


def config(url: str, kind: str) -> str:
    return (
        f"backends:\n  gpu: {{url: '{url}', kind: {kind}}}\n"
        "models:\n  m: {targets: [{backend: gpu, model: org/up-m}]}\n"
    )


@pytest.mark.parametrize("kind", ["vllm", "sglang", "llamacpp"])
@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_helper_route_is_forwarded(gateway_factory, upstream, kind, path) -> None:
    """The body goes to the target's same path as sent, only `model` set to its upstream id;
    the backend's answer comes back unchanged."""
    gw = await gateway_factory(config(upstream.url, kind))
    answer = {"count": 3, "max_model_len": 4096, "tokens": [9906, 1070, 13]}
    upstream.script[path] = json_script(200, answer)
    async with aiohttp.ClientSession() as s, s.post(gw.url + path, data=TOKENIZE) as r:
        assert 200 == r.status
        assert answer == await r.json()
    assert path == upstream.last.path
    assert TOKENIZE.replace(b'"m"', b'"org/up-m"') == upstream.last.body


@pytest.mark.parametrize(
    ("kind", "path"),
    [("ollama", "/tokenize"), ("openai", "/tokenize"), ("tgi", "/detokenize")],
)
async def test_helper_route_unsupported_by_kind(gateway_factory, upstream, kind, path) -> None:
    """A kind without the route answers 501 `unsupported`, and nothing goes upstream."""
    gw = await gateway_factory(config(upstream.url, kind))
    async with aiohttp.ClientSession() as s, s.post(gw.url + path, data=TOKENIZE) as r:
        assert 501 == r.status
        error = (await r.json())["error"]
    assert "unsupported" == error["type"]
    assert f"does not serve {path}" in error["message"]
    assert [] == upstream.posts


async def test_tgi_serves_tokenize(gateway_factory, upstream) -> None:
    """TGI has /tokenize (not /detokenize): it is forwarded there."""
    gw = await gateway_factory(config(upstream.url, "tgi"))
    upstream.script["/tokenize"] = json_script(200, [{"id": 1, "text": "Hello"}])
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/tokenize", data=TOKENIZE) as r:
        assert 200 == r.status
    assert "/tokenize" == upstream.last.path


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b'{"prompt": "hi"}', 400, "invalid_request"),
        (b'{"model": "nope", "prompt": "hi"}', 404, "not_found"),
        (b"not json", 400, "invalid_request"),
    ],
)
async def test_helper_route_bad_requests(gateway_factory, upstream, body, status, kind) -> None:
    """Without a routable model the helper routes answer like the OpenAI routes do."""
    gw = await gateway_factory(config(upstream.url, "vllm"))
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/tokenize", data=body) as r:
        assert status == r.status
        assert kind == (await r.json())["error"]["type"]
    assert [] == upstream.posts


async def test_helper_route_needs_a_key(gateway_factory, upstream) -> None:
    """With keys configured, /tokenize without one is a 401 like every model route."""
    gw = await gateway_factory(config(upstream.url, "vllm"), env={"API_KEYS": "sk-1"})
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/tokenize", data=TOKENIZE) as r:
        assert 401 == r.status
    assert [] == upstream.posts
