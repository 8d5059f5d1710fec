"""Every client surface through the gateway against a real llama.cpp llama-server.

The model is Gemma 3 270M base, so only protocol shape, usage and finish reasons are asserted,
never the text. Sync SDKs run in a thread so the gateway's loop keeps serving.
"""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from tests.conftest import MLFLOW_KEY, one_backend

pytestmark = pytest.mark.real_backend

KEY = "sk-real"
MODELS = (
    "models:\n"
    "  gemma: {targets: [{backend: gpu, model: gemma-3-270m}]}\n"
    "  gemma-text: {targets: [{backend: gpu, model: gemma-3-270m}], endpoint_type: llm/v1/completions}\n"
)
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
async def real_gateway(llama_server, gateway_factory):
    text = one_backend(llama_server.url, models=MODELS).replace("kind: vllm", "kind: llamacpp")
    return await gateway_factory(text, {"API_KEYS": KEY})


def openai_calls(url: str) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    chat = client.chat.completions.create(model="gemma", messages=HI, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="gemma",
            messages=HI,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    completion = client.completions.create(
        model="gemma", prompt="Once", max_tokens=6, temperature=0
    )
    response = client.responses.create(model="gemma", input="Say hello.", max_output_tokens=16)
    return {"chat": chat, "chunks": chunks, "completion": completion, "response": response}


async def test_openai_sdk_through_gateway(real_gateway) -> None:
    """Chat, streaming chat with include_usage, completions and Responses (passed through)."""
    out = await asyncio.to_thread(openai_calls, real_gateway.url)
    chat = out["chat"]
    assert "length" == chat.choices[0].finish_reason
    assert 8 == chat.usage.completion_tokens
    assert chat.usage.prompt_tokens > 0
    chunks = out["chunks"]
    assert (
        "length"
        == next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        .choices[0]
        .finish_reason
    )
    assert 8 == chunks[-1].usage.completion_tokens
    assert [] == chunks[-1].choices
    assert "length" == out["completion"].choices[0].finish_reason
    assert 6 == out["completion"].usage.completion_tokens
    assert out["response"].status in ("completed", "incomplete")
    assert out["response"].usage.output_tokens > 0
    metrics = real_gateway.state.metrics.render().decode()
    assert 'proxy_tokens_total{kind="completion",model="gemma"}' in metrics


def anthropic_calls(url: str) -> dict:
    client = anthropic.Anthropic(base_url=url + "/anthropic", api_key=KEY, max_retries=0)
    message = client.messages.create(
        model="gemma", max_tokens=8, messages=HI, system="Be brief.", extra_body={"temperature": 0}
    )
    with client.messages.stream(model="gemma", max_tokens=8, messages=HI) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    return {"message": message, "events": events, "final": final}


async def test_anthropic_sdk_passes_through(real_gateway) -> None:
    """messages.create and messages.stream reach llama-server's own /v1/messages."""
    out = await asyncio.to_thread(anthropic_calls, real_gateway.url)
    assert "max_tokens" == out["message"].stop_reason
    assert 8 == out["message"].usage.output_tokens
    assert "message_start" == out["events"][0]
    assert "message_stop" == out["events"][-1]
    assert "content_block_delta" in out["events"]
    assert "max_tokens" == out["final"].stop_reason


def gemini_calls(url: str) -> dict:
    out = {}
    for version in ("v1", "v1beta"):
        client = genai.Client(
            api_key=KEY,
            http_options=genai_types.HttpOptions(base_url=url + "/gemini", api_version=version),
        )
        config = genai_types.GenerateContentConfig(max_output_tokens=8, temperature=0)
        out[version] = client.models.generate_content(
            model="gemma", contents="Say hello.", config=config
        )
        out[version + "-stream"] = list(
            client.models.generate_content_stream(
                model="gemma", contents="Say hello.", config=config
            )
        )
    return out


async def test_gemini_sdk_translated_to_chat(real_gateway) -> None:
    """generate_content and generate_content_stream on v1 and v1beta, translated to chat."""
    out = await asyncio.to_thread(gemini_calls, real_gateway.url)
    for version in ("v1", "v1beta"):
        reply = out[version]
        assert "MAX_TOKENS" == reply.candidates[0].finish_reason.name
        assert 8 == reply.usage_metadata.candidates_token_count
        stream = out[version + "-stream"]
        assert "MAX_TOKENS" == stream[-1].candidates[0].finish_reason.name
        assert stream[-1].usage_metadata.prompt_token_count > 0


def mlflow_calls(url: str) -> dict:
    from mlflow.deployments import get_deploy_client

    client = get_deploy_client(url)
    return {
        "list": client.list_endpoints(),
        "one": client.get_endpoint("gemma"),
        "chat": client.predict(
            endpoint="gemma", inputs={"messages": HI, "max_tokens": 6, "temperature": 0}
        ),
        "completion": client.predict(
            endpoint="gemma-text", inputs={"prompt": "Once", "max_tokens": 6, "temperature": 0}
        ),
    }


async def test_mlflow_deployments_client(llama_server, gateway_factory, mlflow_env) -> None:
    """list_endpoints, get_endpoint and predict (chat, completions) through the gateway."""
    text = one_backend(llama_server.url, models=MODELS).replace("kind: vllm", "kind: llamacpp")
    real_gateway = await gateway_factory(text, {"API_KEYS": MLFLOW_KEY})
    out = await asyncio.to_thread(mlflow_calls, real_gateway.url)
    assert ["gemma", "gemma-text"] == [e.name for e in out["list"]]
    assert "llm/v1/completions" == out["list"][1].endpoint_type
    assert "llm/v1/chat" == out["one"].endpoint_type
    assert 6 == out["chat"]["usage"]["completion_tokens"]
    assert "length" == out["completion"]["choices"][0]["finish_reason"]


def embed_call(url: str) -> object:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    return client.embeddings.create(model="gemma", input=["a", "b"])


async def test_embeddings_through_gateway(llama_embed_server, gateway_factory) -> None:
    """The SDK's base64 embeddings come back from llama-server's embeddings instance."""
    text = one_backend(llama_embed_server.url, models=MODELS).replace(
        "kind: vllm", "kind: llamacpp"
    )
    gw = await gateway_factory(text, {"API_KEYS": KEY})
    result = await asyncio.to_thread(embed_call, gw.url)
    assert 2 == len(result.data)
    assert 640 == len(result.data[0].embedding)


async def test_disconnect_stops_real_generation(real_gateway, llama_server) -> None:
    """A client that leaves mid-stream frees the llama-server slot at once."""
    client = openai.AsyncOpenAI(base_url=real_gateway.url + "/v1", api_key=KEY, max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model="gemma", messages=HI, max_tokens=2000, stream=True
        )
        async for _ in stream:
            break
        await stream.close()
    await asyncio.sleep(0.5)
    assert 0 == real_gateway.state.backends["gpu"].in_flight
    # Both slots serve a new request at once: nothing keeps generating for the gone client.
    reply = await asyncio.to_thread(
        lambda: openai.OpenAI(
            base_url=real_gateway.url + "/v1", api_key=KEY, max_retries=0
        ).chat.completions.create(model="gemma", messages=HI, max_tokens=4, temperature=0)
    )
    assert 4 == reply.usage.completion_tokens
