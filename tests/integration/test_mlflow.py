"""The MLflow deployments client (mlflow-skinny) through the gateway: list_endpoints,
get_endpoint and predict for chat, completions and embeddings endpoints."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest
import requests
from mlflow.deployments import get_deploy_client

from bench.simbackend import start_simbackend
from proxy.errors import InvalidRequest
from proxy.routes.mlflow import page
from tests.conftest import MLFLOW_KEY, wait_for
from tests.fakes import json_script, slow_json_script

KEY = MLFLOW_KEY
MODELS = """
models:
  chat: {targets: [{backend: gpu, model: sim-model}]}
  completions: {targets: [{backend: gpu, model: sim-model}], endpoint_type: llm/v1/completions}
  embeddings: {targets: [{backend: gpu, model: sim-model}], endpoint_type: llm/v1/embeddings}
"""


@pytest.fixture
async def sim_gateway(gateway_factory, mlflow_env):
    sim = await start_simbackend(models=("sim-model",))
    gw = await gateway_factory(
        f"backends:\n  gpu: {{url: '{sim.url}', kind: vllm}}\n{MODELS}", {"API_KEYS": KEY}
    )
    yield gw
    await sim.close()


async def test_list_and_get_endpoints(sim_gateway) -> None:
    """list_endpoints and get_endpoint parse each model as an Endpoint with limit null."""
    url = sim_gateway.url

    def run() -> tuple[list, object]:
        client = get_deploy_client(url)
        return client.list_endpoints(), client.get_endpoint("embeddings")

    endpoints, one = await asyncio.to_thread(run)
    assert [
        ("chat", "llm/v1/chat", "sim-model", "vllm", f"{url}/gateway/chat/invocations", None),
        (
            "completions",
            "llm/v1/completions",
            "sim-model",
            "vllm",
            f"{url}/gateway/completions/invocations",
            None,
        ),
        (
            "embeddings",
            "llm/v1/embeddings",
            "sim-model",
            "vllm",
            f"{url}/gateway/embeddings/invocations",
            None,
        ),
    ] == [
        (e.name, e.endpoint_type, e.model.name, e.model.provider, e.endpoint_url, e.limit)
        for e in endpoints
    ]
    assert ("embeddings", "llm/v1/embeddings", None) == (one.name, one.endpoint_type, one.limit)


async def test_predict_chat_completions_embeddings(sim_gateway) -> None:
    """predict on chat, completions and embeddings endpoints answers from the upstream model."""

    def run() -> tuple[dict, dict, dict]:
        client = get_deploy_client(sim_gateway.url)
        chat = client.predict(
            endpoint="chat",
            inputs={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
        completion = client.predict(
            endpoint="completions", inputs={"prompt": "Hi", "max_tokens": 2}
        )
        embedding = client.predict(endpoint="embeddings", inputs={"input": ["a", "b"]})
        return chat, completion, embedding

    chat, completion, embedding = await asyncio.to_thread(run)
    assert ("chat.completion", "sim-model", "length") == (
        chat["object"],
        chat["model"],
        chat["choices"][0]["finish_reason"],
    )
    assert 3 == chat["usage"]["completion_tokens"]
    assert chat["choices"][0]["message"]["content"]
    assert ("text_completion", 2) == (
        completion["object"],
        completion["usage"]["completion_tokens"],
    )
    assert ("list", ["embedding", "embedding"]) == (
        embedding["object"],
        [d["object"] for d in embedding["data"]],
    )
    assert ["/endpoints/{endpoint}/invocations"] * 3 == [
        orjson.loads(line)["route"] for line in sim_gateway.access_lines()
    ]


async def test_unknown_endpoint_is_a_404(sim_gateway) -> None:
    """get_endpoint and predict for an unknown name raise the client's HTTP error for a 404."""

    def run() -> list[requests.Response]:
        client = get_deploy_client(sim_gateway.url)
        out = []
        for call in (
            lambda: client.get_endpoint("nope"),
            lambda: client.predict(endpoint="nope", inputs={"messages": []}),
        ):
            with pytest.raises(requests.HTTPError) as info:
                call()
            out.append(info.value.response)
        return out

    endpoint, predict = await asyncio.to_thread(run)
    assert (404, 404) == (endpoint.status_code, predict.status_code)
    assert {
        "error": {
            "type": "not_found",
            "message": "endpoint 'nope' does not exist; GET /api/2.0/endpoints/ lists them",
        }
    } == endpoint.json()
    assert "not_found" == predict.json()["error"]["type"]


async def test_invocations_aliases_and_bad_kind(gateway_factory, upstream, mlflow_env) -> None:
    """The /gateway invocations aliases set the upstream model; a body of no known kind is a 400."""
    gw = await gateway_factory(
        f"backends:\n  gpu: {{url: '{upstream.url}', kind: vllm}}\n{MODELS}", {"API_KEYS": KEY}
    )
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}'
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for path in ("/gateway/chat/invocations", "/gateway/chat/mlflow/invocations"):
            async with session.post(gw.url + path, data=body, headers=headers) as response:
                assert 200 == response.status
            assert b'{"model":"sim-model","messages"' + body[len(b'{"messages"') :] == (
                upstream.last.body
            )
        async with session.post(
            gw.url + "/gateway/chat/invocations", data=b'{"question": "Hi"}', headers=headers
        ) as response:
            assert (400, "invalid_request") == (
                response.status,
                (await response.json())["error"]["type"],
            )


async def test_retry_after_lets_the_client_retry(
    gateway_factory, upstream, mlflow_env, monkeypatch
) -> None:
    """A 503 carries Retry-After, and the client's own retry then gets the answer."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    upstream.script["/v1/chat/completions"] = slow_json_script(0.3)
    gw = await gateway_factory(
        f"backends:\n  gpu: {{url: '{upstream.url}', kind: vllm, max_in_flight: 1}}\n{MODELS}"
        "server: {queue_timeout_s: 0.05}\n",
        {"API_KEYS": KEY},
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "first"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        first = asyncio.ensure_future(
            session.post(gw.url + "/v1/chat/completions", json=body, headers=headers)
        )
        await wait_for(lambda: len(upstream.posts) == 1)
        upstream.script["/v1/chat/completions"] = json_script(200, {"object": "chat.completion"})

        def run() -> tuple[dict, float]:
            started = time.monotonic()
            answer = get_deploy_client(gw.url).predict(
                endpoint="chat", inputs={"messages": [{"role": "user", "content": "second"}]}
            )
            return answer, time.monotonic() - started

        answer, took = await asyncio.to_thread(run)
        (await first).release()
    statuses = [
        orjson.loads(line)["status"] for line in gw.access_lines() if b"/invocations" in line
    ]
    assert {"object": "chat.completion"} == answer
    assert [503, 200] == statuses
    assert took >= 0.9  # the client waited out Retry-After: 1


async def test_list_endpoints_follows_pages(gateway_factory, upstream, mlflow_env) -> None:
    """With more models than one page holds, list_endpoints follows next_page_token to the end."""
    names = [f"m{i:04d}" for i in range(1001)]
    models = "models:\n" + "".join(f"  {n}: {{targets: [{{backend: gpu}}]}}\n" for n in names)
    gw = await gateway_factory(
        f"backends:\n  gpu: {{url: '{upstream.url}', kind: vllm}}\n{models}", {"API_KEYS": KEY}
    )
    endpoints = await asyncio.to_thread(lambda: get_deploy_client(gw.url).list_endpoints())
    assert names == [e.name for e in endpoints]
    queries = [
        orjson.loads(line)["path"] for line in gw.access_lines() if b"/api/2.0/endpoints" in line
    ]
    assert 2 == len(queries)


def test_page_splits_and_resumes() -> None:
    """page() splits the listing with an opaque token, and refuses a token it did not make."""
    items = [{"name": str(i)} for i in range(5)]
    first = page(items, None, 2)
    second = page(items, str(first["next_page_token"]), 2)
    last = page(items, str(second["next_page_token"]), 2)
    assert [items[0:2], items[2:4], items[4:5]] == [
        first["endpoints"],
        second["endpoints"],
        last["endpoints"],
    ]
    assert "next_page_token" not in last
    assert {"endpoints": items} == page(items, None, 5)
    assert {"endpoints": []} == page([], None, 5)
    with pytest.raises(InvalidRequest):
        page(items, "not a token!", 2)
