"""The real openai SDK, sync and async, works through the gateway, errors included."""

from __future__ import annotations

import asyncio

import openai
import pytest

from bench.simbackend import start_simbackend
from tests.conftest import one_backend

MODELS = "models:\n  chat: {targets: [{backend: gpu, model: sim-model}]}\n"


@pytest.fixture
async def sim_gateway(gateway_factory):
    sim = await start_simbackend(models=("sim-model",))
    gw = await gateway_factory(one_backend(sim.url, models=MODELS), {"API_KEYS": "sk-test"})
    yield gw
    await sim.close()


def sync_client(url: str, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def sync_calls(url: str) -> dict:
    """Every call of the sync client, run in a thread so the gateway's loop keeps serving."""
    client = sync_client(url)
    out: dict = {}
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    out["chat"] = reply
    out["stream"] = list(
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    out["completion"] = client.completions.create(model="chat", prompt="hi", max_tokens=3)
    out["embedding"] = client.embeddings.create(model="chat", input=["a", "b"])
    out["models"] = list(client.models.list())
    out["model"] = client.models.retrieve("chat")
    with client.chat.completions.with_streaming_response.create(
        model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True
    ) as raw:
        out["stream_headers"] = dict(raw.headers)
        raw.read()
    return out


async def test_sync_sdk_every_call(sim_gateway) -> None:
    """chat, streaming chat with usage, completions, embeddings, models: all parse."""
    out = await asyncio.to_thread(sync_calls, sim_gateway.url)
    assert "length" == out["chat"].choices[0].finish_reason
    assert 4 == out["chat"].usage.completion_tokens
    text_chunks = [c for c in out["stream"] if c.choices and c.choices[0].delta.content]
    assert 5 == len(text_chunks)
    assert 5 == out["stream"][-1].usage.completion_tokens
    assert 3 == out["completion"].usage.completion_tokens
    assert 2 == len(out["embedding"].data)
    assert ["chat"] == [m.id for m in out["models"]]
    assert "chat" == out["model"].id
    assert "no" == out["stream_headers"]["x-accel-buffering"]


async def test_async_sdk_streams(sim_gateway) -> None:
    """The async client streams chat and reads the usage chunk."""
    client = openai.AsyncOpenAI(base_url=sim_gateway.url + "/v1", api_key="sk-test", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        reply = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert 3 == chunks[-1].usage.completion_tokens
    assert 2 == reply.usage.completion_tokens


def sdk_errors(url: str) -> dict[str, type[Exception]]:
    got: dict[str, type[Exception]] = {}
    cases = {
        "unknown model": (sync_client(url), {"model": "nope"}),
        "bad key": (sync_client(url, key="wrong"), {"model": "chat"}),
        "bad stream": (sync_client(url), {"model": "chat", "extra_body": {"stream": "yes"}}),
    }
    for name, (client, kwargs) in cases.items():
        try:
            client.chat.completions.create(messages=[{"role": "user", "content": "x"}], **kwargs)
        except openai.APIStatusError as exc:
            got[name] = type(exc)
            assert isinstance(exc.body, dict)
            assert {"type", "message"} == set(exc.body)
    return got


async def test_sdk_raises_its_own_exceptions_for_our_errors(sim_gateway) -> None:
    """Our envelopes surface as the SDK's NotFoundError, AuthenticationError, BadRequestError."""
    got = await asyncio.to_thread(sdk_errors, sim_gateway.url)
    assert {
        "unknown model": openai.NotFoundError,
        "bad key": openai.AuthenticationError,
        "bad stream": openai.BadRequestError,
    } == got


async def test_sdk_sees_gateway_timeout(gateway_factory, upstream) -> None:
    """A deadline that runs out is an InternalServerError with status 504 in the SDK."""
    from tests.fakes import slow_json_script

    upstream.script["/v1/chat/completions"] = slow_json_script(5)
    gw = await gateway_factory(one_backend(upstream.url))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    async with client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"OICM-Request-Timeout": "0.2"},
            )
    assert 504 == info.value.status_code
    assert "backend_timeout" == info.value.body["type"]
