"""Databricks-style clients through the gateway: the openai SDK on the `/mlflow/v1` and
`/openai/v1` bases (and their `/gateway/` forms), and curl with `-u token:$KEY`."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest

from bench.simbackend import start_simbackend
from tests.fakes import json_script

KEY = "dapi-test"
BASES = ["/mlflow/v1", "/openai/v1", "/gateway/mlflow/v1", "/gateway/openai/v1"]


@pytest.fixture
async def sim_gateway(gateway_factory):
    sim = await start_simbackend(models=("sim-model",))
    gw = await gateway_factory(
        f"backends:\n  sim: {{url: '{sim.url}', kind: vllm}}\n"
        "models:\n  databricks-llm: {targets: [{backend: sim, model: sim-model}]}\n",
        {"API_KEYS": KEY},
    )
    yield gw
    await sim.close()


@pytest.mark.parametrize("base", BASES)
async def test_openai_sdk_on_the_databricks_bases(sim_gateway, base) -> None:
    """chat (whole and streamed with usage), embeddings and the model list on each base."""

    def run() -> dict[str, Any]:
        with openai.OpenAI(base_url=sim_gateway.url + base, api_key=KEY, max_retries=0) as c:
            messages = [{"role": "user", "content": "Hi"}]
            return {
                "chat": c.chat.completions.create(
                    model="databricks-llm", messages=messages, max_tokens=3
                ),
                "stream": list(
                    c.chat.completions.create(
                        model="databricks-llm",
                        messages=messages,
                        max_tokens=4,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                ),
                "embedding": c.embeddings.create(model="databricks-llm", input=["a"]),
                "models": [m.id for m in c.models.list()],
            }

    out = await asyncio.to_thread(run)
    assert ("sim-model", 3, "length") == (
        out["chat"].model,
        out["chat"].usage.completion_tokens,
        out["chat"].choices[0].finish_reason,
    )
    assert 4 == len([c for c in out["stream"] if c.choices and c.choices[0].delta.content])
    assert 4 == out["stream"][-1].usage.completion_tokens
    assert 1 == len(out["embedding"].data)
    assert ["databricks-llm"] == out["models"]


async def curl(*args: str) -> tuple[int, bytes]:
    """Run curl against loopback (no proxy); the HTTP status and the body."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--noproxy", "*", "--max-time", "30", "-w", "\n%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert 0 == process.returncode
    body, _, status = out.rpartition(b"\n")
    return int(status), body


CHAT_BODY = (
    '{"model": "databricks-llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'
)


@pytest.mark.parametrize("base", ["/mlflow/v1", "/openai/v1"])
async def test_curl_basic_auth_token(sim_gateway, base) -> None:
    """`curl -u token:$KEY` is a valid key: chat answers 200; a wrong token is a 401 envelope."""
    url = sim_gateway.url + base + "/chat/completions"
    json_header = ("-H", "Content-Type: application/json")
    status, body = await curl("-u", f"token:{KEY}", *json_header, "-d", CHAT_BODY, url)
    answer = orjson.loads(body)
    assert (200, "chat.completion", 2) == (
        status,
        answer["object"],
        answer["usage"]["completion_tokens"],
    )
    status, body = await curl("-u", "token:wrong", *json_header, "-d", CHAT_BODY, url)
    assert (401, "authentication_error") == (status, orjson.loads(body)["error"]["type"])


async def test_curl_streams_and_invokes(sim_gateway) -> None:
    """curl -N streams chat to [DONE], and curl -u works on an MLflow invocations route."""
    status, body = await curl(
        "-N", "-u", f"token:{KEY}", "-H", "Content-Type: application/json",
        "-d", CHAT_BODY.replace('"max_tokens": 2', '"max_tokens": 2, "stream": true'),
        sim_gateway.url + "/openai/v1/chat/completions",
    )  # fmt: skip
    assert 200 == status
    assert body.startswith(b"data: ")
    assert body.endswith(b"data: [DONE]\n\n")
    status, body = await curl(
        "-u", f"token:{KEY}", "-H", "Content-Type: application/json",
        "-d", '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}',
        sim_gateway.url + "/gateway/databricks-llm/invocations",
    )  # fmt: skip
    assert (200, "sim-model") == (status, orjson.loads(body)["model"])


async def test_curl_responses_on_the_openai_base(gateway_factory, upstream) -> None:
    """curl -u token:$KEY on /openai/v1/responses reaches a vllm backend's /v1/responses."""
    upstream.script["/v1/responses"] = json_script(
        200, {"id": "resp_1", "object": "response", "status": "completed", "output": []}
    )
    gw = await gateway_factory(
        f"backends:\n  gpu: {{url: '{upstream.url}', kind: vllm}}\n"
        "models:\n  databricks-llm: {targets: [{backend: gpu, model: up}]}\n",
        {"API_KEYS": KEY},
    )
    body = '{"model": "databricks-llm", "input": "Hi"}'
    status, answer = await curl(
        "-u", f"token:{KEY}", "-H", "Content-Type: application/json", "-d", body,
        gw.url + "/openai/v1/responses",
    )  # fmt: skip
    assert (200, "resp_1") == (status, orjson.loads(answer)["id"])
    assert ("/v1/responses", b'{"model": "up", "input": "Hi"}') == (
        upstream.last.path,
        upstream.last.body,
    )
    assert "authorization" not in upstream.last.headers
