"""The openai SDK's Responses API through the gateway: forwarded as is to backends that serve
/v1/responses, translated to chat completions for those that do not, streams included."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from bench.simbackend import start_simbackend
from tests import fakes
from tests.fakes import (
    chat_answer,
    delta_event,
    json_script,
    sse_event,
    sse_script,
    stream_script,
    usage_event,
)

KEY = "sk-test"
CHAT = "/v1/chat/completions"
CONFIG = """
backends:
  native: {{url: '{native}', kind: vllm}}
  oai-native: {{url: '{native}', kind: openai, serves: [responses]}}
  plain: {{url: '{plain}', kind: tgi}}
  oai: {{url: '{plain}', kind: openai}}
models:
  resp-native: {{targets: [{{backend: native, model: up-resp}}]}}
  resp-same: {{targets: [{{backend: native}}]}}
  resp-oai-native: {{targets: [{{backend: oai-native, model: up-resp}}]}}
  resp: {{targets: [{{backend: plain, model: up-chat}}]}}
  resp-oai: {{targets: [{{backend: oai, model: up-chat}}]}}
"""
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
USAGE = {
    "input_tokens": 5,
    "output_tokens": 2,
    "total_tokens": 7,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens_details": {"reasoning_tokens": 0},
}
NATIVE_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "status": "completed",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "Hi there", "annotations": []}],
}
NATIVE_RESPONSE = {
    "id": "resp_native",
    "object": "response",
    "created_at": 1,
    "status": "completed",
    "model": "up-resp",
    "output": [NATIVE_MESSAGE],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "usage": USAGE,
}


text_stream = partial(fakes.text_stream, prompt=9)


def native_events() -> list[bytes]:
    """A native Responses stream, as vLLM sends it."""
    started = {**NATIVE_RESPONSE, "status": "in_progress", "output": [], "usage": None}
    empty = {"type": "output_text", "text": "", "annotations": []}
    item = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": {**NATIVE_MESSAGE, "status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", {**item, "part": empty}),
        ("response.output_text.delta", {**item, "delta": "Hi", "logprobs": []}),
        ("response.output_text.delta", {**item, "delta": " there", "logprobs": []}),
        ("response.output_text.done", {**item, "text": "Hi there", "logprobs": []}),
        ("response.content_part.done", {**item, "part": NATIVE_MESSAGE["content"][0]}),
        ("response.output_item.done", {"output_index": 0, "item": NATIVE_MESSAGE}),
        ("response.completed", {"response": NATIVE_RESPONSE}),
    ]
    return [
        sse_event({"type": name, "sequence_number": n, **data}, name)
        for n, (name, data) in enumerate(events)
    ]


@pytest.fixture
async def setup(upstream_factory, gateway_factory):
    """Backends that serve /v1/responses (vllm; openai with `serves`) on one fake, and ones that
    do not (tgi; plain openai) on another."""
    native, plain = await upstream_factory(), await upstream_factory()
    gw = await gateway_factory(CONFIG.format(native=native.url, plain=plain.url), {"API_KEYS": KEY})
    return gw, native, plain


def client(url: str, sent: list[bytes] | None = None, base: str = "/v1") -> openai.OpenAI:
    """The sync SDK at `base` on the gateway; `sent` collects the bodies it posts."""
    hooks = {"request": [lambda r: sent.append(r.read())]} if sent is not None else {}
    return openai.OpenAI(
        base_url=url + base,
        api_key=KEY,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(event_hooks=hooks),
    )


# -- the native path -----------------------------------------------------------------------


async def test_native_create_forwards_the_sdk_body(setup) -> None:
    """responses.create reaches vllm's /v1/responses as sent, but for the upstream model id."""
    gw, native, plain = setup
    native.script["/v1/responses"] = json_script(200, NATIVE_RESPONSE)
    sent: list[bytes] = []

    def run() -> Any:
        with client(gw.url, sent) as c:
            return c.responses.create(
                model="resp-native", input="Hi", instructions="be brief", max_output_tokens=16
            )

    response = await asyncio.to_thread(run)
    assert 1 == sent[0].count(b'"model":"resp-native"')
    assert sent[0].replace(b'"model":"resp-native"', b'"model":"up-resp"') == native.last.body
    assert "/v1/responses" == native.last.path
    assert [] == plain.posts
    assert ("resp_native", "Hi there", 7) == (
        response.id,
        response.output_text,
        response.usage.total_tokens,
    )


async def test_native_same_model_is_byte_for_byte(setup) -> None:
    """Where the upstream id is the client's model, the SDK's bytes reach the backend unchanged."""
    gw, native, _ = setup
    native.script["/v1/responses"] = json_script(200, NATIVE_RESPONSE)
    sent: list[bytes] = []

    def run() -> Any:
        with client(gw.url, sent) as c:
            return c.responses.create(model="resp-same", input="Hi", tools=[WEATHER_TOOL])

    await asyncio.to_thread(run)
    assert sent == [native.last.body]
    assert "authorization" not in native.last.headers


async def test_native_stream_relays_the_backend_events(setup) -> None:
    """responses.stream on a vllm backend: the SDK reads the backend's events and final response."""
    gw, native, _ = setup
    native.script["/v1/responses"] = sse_script(native_events())
    sent: list[bytes] = []

    def run() -> tuple[list[str], Any]:
        with client(gw.url, sent) as c:
            with c.responses.stream(model="resp-native", input="Hi") as stream:
                return [e.type for e in stream], stream.get_final_response()

    types, response = await asyncio.to_thread(run)
    assert sent[0].replace(b'"model":"resp-native"', b'"model":"up-resp"') == native.last.body
    assert b'"stream":true' in native.last.body
    assert "response.completed" == types[-1]
    assert 2 == types.count("response.output_text.delta")
    assert "Hi there" == response.output_text


@pytest.mark.parametrize(
    "base", ["/openai/v1", "/gateway/openai/v1", "/mlflow/v1", "/gateway/mlflow/v1"]
)
async def test_native_under_prefixed_bases(setup, base) -> None:
    """The Databricks and MLflow base URLs serve /v1/responses the same way."""
    gw, native, _ = setup
    native.script["/v1/responses"] = json_script(200, NATIVE_RESPONSE)

    def run() -> Any:
        with client(gw.url, base=base) as c:
            return c.responses.create(model="resp-native", input="Hi")

    response = await asyncio.to_thread(run)
    assert "/v1/responses" == native.last.path
    assert "Hi there" == response.output_text


@pytest.mark.parametrize(
    ("model", "native_path"),
    [("resp-oai-native", "/v1/responses"), ("resp-oai", None)],
    ids=["openai-with-serves", "openai-without"],
)
async def test_openai_kind_serves_only_when_configured(setup, model, native_path) -> None:
    """An `openai` backend gets /v1/responses only when its `serves` lists it; else chat."""
    gw, native, plain = setup
    native.script["/v1/responses"] = json_script(200, NATIVE_RESPONSE)
    plain.script[CHAT] = json_script(200, chat_answer("Hi there"))

    def run() -> Any:
        with client(gw.url) as c:
            return c.responses.create(model=model, input="Hi")

    response = await asyncio.to_thread(run)
    assert "Hi there" == response.output_text
    if native_path:
        assert ([native_path], []) == ([r.path for r in native.posts], plain.posts)
    else:
        assert ([], [CHAT]) == (native.posts, [r.path for r in plain.posts])


async def test_native_stream_cut_is_an_sdk_error(setup) -> None:
    """A native stream cut midway ends with an error event the SDK raises as APIError."""
    gw, native, _ = setup
    native.script["/v1/responses"] = sse_script(native_events(), cut_after=5)

    def run() -> tuple[list[str], openai.APIError]:
        seen: list[str] = []
        with client(gw.url) as c, pytest.raises(openai.APIError) as info:
            for event in c.responses.create(model="resp-native", input="Hi", stream=True):
                seen.append(event.type)
        return seen, info.value

    seen, exc = await asyncio.to_thread(run)
    assert 5 == len(seen)
    assert "backend_unreachable" == exc.body["type"]


# -- the translated path -------------------------------------------------------------------


async def test_translated_create(setup) -> None:
    """Instructions, input items, limits and tools become the chat request; usage comes back."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("Fine, thanks."))

    def run() -> Any:
        with client(gw.url) as c:
            return c.responses.create(
                model="resp",
                instructions="Be brief.",
                input=[
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": [{"type": "input_text", "text": "How are you?"}]},
                ],
                max_output_tokens=64,
                temperature=0.2,
                top_p=0.9,
                tools=[WEATHER_TOOL],
            )

    response = await asyncio.to_thread(run)
    assert CHAT == plain.last.path
    assert {
        "model": "up-chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER_TOOL["parameters"],
                },
            }
        ],
    } == orjson.loads(plain.last.body)
    assert response.id.startswith("resp_")
    assert ("response", "completed", "resp") == (response.object, response.status, response.model)
    assert "Fine, thanks." == response.output_text
    assert ("Be brief.", 64, 0.2) == (
        response.instructions,
        response.max_output_tokens,
        response.temperature,
    )
    assert (11, 4, 15) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
        response.usage.total_tokens,
    )


async def test_translated_function_call_round_trip(setup) -> None:
    """A tool call becomes a function_call item; its output goes back as a tool message."""
    gw, _, plain = setup
    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    plain.script[CHAT] = json_script(200, chat_answer(None, "tool_calls", tool_calls=[tool_call]))

    def first() -> Any:
        with client(gw.url) as c:
            return c.responses.create(model="resp", input="Weather in Paris?", tools=[WEATHER_TOOL])

    response = await asyncio.to_thread(first)
    [call] = response.output
    assert ("function_call", "call_1", "get_weather", '{"city":"Paris"}', "completed") == (
        call.type,
        call.call_id,
        call.name,
        call.arguments,
        call.status,
    )
    plain.script[CHAT] = json_script(200, chat_answer("18C and sunny."))

    def second() -> Any:
        with client(gw.url) as c:
            return c.responses.create(
                model="resp",
                tools=[WEATHER_TOOL],
                input=[
                    {"role": "user", "content": "Weather in Paris?"},
                    {
                        "type": "function_call",
                        "call_id": call.call_id,
                        "name": call.name,
                        "arguments": call.arguments,
                    },
                    {"type": "function_call_output", "call_id": "call_1", "output": "18C sunny"},
                ],
            )

    answer = await asyncio.to_thread(second)
    assert [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
    ] == orjson.loads(plain.last.body)["messages"]
    assert "18C and sunny." == answer.output_text


async def test_translated_length_is_incomplete(setup) -> None:
    """A chat answer cut by max_tokens is an incomplete Response (reason max_output_tokens)."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("Once upon", "length"))

    def run() -> Any:
        with client(gw.url) as c:
            return c.responses.create(model="resp", input="A story", max_output_tokens=2)

    response = await asyncio.to_thread(run)
    assert ("incomplete", "max_output_tokens", "Once upon") == (
        response.status,
        response.incomplete_details.reason,
        response.output_text,
    )


async def test_translated_stream_event_sequence(setup) -> None:
    """responses.stream over a chat stream: every event, numbered, and the final response."""
    gw, _, plain = setup
    plain.script[CHAT] = sse_script(text_stream("Hel", "lo", "!"))

    def run() -> tuple[list[Any], Any]:
        with client(gw.url) as c:
            with c.responses.stream(model="resp", input="Hi", instructions="be brief") as stream:
                return list(stream), stream.get_final_response()

    events, response = await asyncio.to_thread(run)
    sent = orjson.loads(plain.last.body)
    assert (True, {"include_usage": True}) == (sent["stream"], sent["stream_options"])
    assert [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ] == [e.type for e in events]
    assert list(range(len(events))) == [e.sequence_number for e in events]
    assert ["Hel", "lo", "!"] == [e.delta for e in events if e.type == "response.output_text.delta"]
    assert ("completed", "Hello!", "resp") == (
        response.status,
        response.output_text,
        response.model,
    )
    assert (9, 3) == (response.usage.input_tokens, response.usage.output_tokens)


async def test_translated_stream_true_with_a_tool_call(setup) -> None:
    """create(stream=True) over a streamed tool call: argument deltas, a completed item."""
    gw, _, plain = setup
    start = {"index": 0, "id": "call_5", "type": "function"}
    plain.script[CHAT] = sse_script(
        [
            delta_event({"tool_calls": [{**start, "function": {"name": "get_weather"}}]}),
            delta_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
            delta_event({"tool_calls": [{"index": 0, "function": {"arguments": '"Rome"}'}}]}),
            delta_event({}, "tool_calls"),
            usage_event(20, 8),
            b"data: [DONE]\n\n",
        ]
    )

    def run() -> list[Any]:
        with client(gw.url) as c:
            return list(
                c.responses.create(
                    model="resp", input="Weather in Rome?", tools=[WEATHER_TOOL], stream=True
                )
            )

    events = await asyncio.to_thread(run)
    assert [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ] == [e.type for e in events]
    [call] = events[-1].response.output
    assert ("call_5", "get_weather", '{"city":"Rome"}', "completed") == (
        call.call_id,
        call.name,
        call.arguments,
        call.status,
    )
    assert 8 == events[-1].response.usage.output_tokens


async def test_translated_against_the_simulated_backend(gateway_factory) -> None:
    """On the simulated vLLM (tgi kind), create and stream parse with usage, as incomplete."""
    sim = await start_simbackend(models=("sim-model",))
    try:
        gw = await gateway_factory(
            f"backends:\n  sim: {{url: '{sim.url}', kind: tgi}}\n"
            "models:\n  resp: {targets: [{backend: sim, model: sim-model}]}\n",
            {"API_KEYS": KEY},
        )

        def run() -> tuple[Any, Any]:
            with client(gw.url) as c:
                whole = c.responses.create(model="resp", input="Hi", max_output_tokens=4)
                with c.responses.stream(model="resp", input="Hi", max_output_tokens=5) as stream:
                    return whole, list(stream)

        whole, events = await asyncio.to_thread(run)
    finally:
        await sim.close()
    assert ("incomplete", 4) == (whole.status, whole.usage.output_tokens)
    assert whole.output_text
    # A stream cut by max_output_tokens ends with response.incomplete, as OpenAI's does (the
    # SDK's get_final_response() waits for response.completed only).
    assert 5 == len([e for e in events if e.type == "response.output_text.delta"])
    streamed = events[-1].response
    assert ("response.incomplete", "incomplete", 5) == (
        events[-1].type,
        streamed.status,
        streamed.usage.output_tokens,
    )
    assert streamed.output_text


async def test_async_client_translated(setup) -> None:
    """The async SDK creates and streams over the translated path too."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("async ok"))
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0) as c:
        response = await c.responses.create(model="resp", input="x")
        plain.script[CHAT] = sse_script(text_stream("as", "ync"))
        async with c.responses.stream(model="resp", input="x") as stream:
            final = await stream.get_final_response()
    assert ("async ok", "async") == (response.output_text, final.output_text)


# -- bad input and failures ----------------------------------------------------------------


def sdk_error(url: str, **call: Any) -> openai.APIStatusError:
    with client(url) as c:
        try:
            c.responses.create(**call)
        except openai.APIStatusError as exc:
            return exc
    raise AssertionError("the gateway accepted a bad request")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            {"input": "x", "previous_response_id": "resp_1"},
            "previous_response_id: not supported: this gateway stores no responses, "
            "conversations or prompts; send the whole input instead",
        ),
        (
            {"input": "x", "tools": [{"type": "web_search"}]},
            "tools[0].type: built-in tool 'web_search' is not supported on this backend; "
            "only function tools are",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_video", "url": "x"}]}]},
            "input[0].content[0].type: unknown content type 'input_video'",
        ),
    ],
    ids=["previous_response_id", "built-in tool", "unknown content type"],
)
async def test_translated_bad_input_is_a_400(setup, call, message) -> None:
    """What a chat backend cannot be asked is a BadRequestError naming it; nothing goes upstream."""
    gw, _, plain = setup
    exc = await asyncio.to_thread(sdk_error, gw.url, model="resp", **call)
    assert isinstance(exc, openai.BadRequestError)
    assert {"type": "invalid_request", "message": message} == exc.body
    assert [] == plain.posts


async def test_translated_backend_error(setup) -> None:
    """A chat backend's 500 is a 502 backend_unreachable envelope keeping its message."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(500, {"error": {"message": "CUDA out of memory"}})
    exc = await asyncio.to_thread(sdk_error, gw.url, model="resp", input="x")
    assert isinstance(exc, openai.InternalServerError)
    assert 502 == exc.status_code
    assert {
        "type": "backend_unreachable",
        "message": "backend answered 500: CUDA out of memory",
    } == (exc.body)


async def test_translated_stream_cut_ends_with_response_failed(setup) -> None:
    """A translated stream cut midway ends with response.failed, never response.completed."""
    gw, _, plain = setup
    plain.script[CHAT] = sse_script(text_stream("a", "b", "c"), cut_after=3)

    def run() -> list[Any]:
        with client(gw.url) as c:
            return list(c.responses.create(model="resp", input="x", stream=True))

    events = await asyncio.to_thread(run)
    assert "response.failed" == events[-1].type
    assert "response.completed" not in [e.type for e in events]
    failed = events[-1].response
    assert ("failed", "server_error") == (failed.status, failed.error.code)
    [item] = failed.output
    assert ("incomplete", "ab") == (item.status, item.content[0].text)

    body = {"model": "resp", "input": "x", "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            gw.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as response:
            raw = await response.read()
    assert raw.endswith(b"\n\n")
    assert raw.rsplit(b"\n\n", 2)[-2].startswith(b"event: response.failed\n")
    assert b"[DONE]" not in raw


async def test_translated_stream_deadline_ends_with_response_failed(setup) -> None:
    """A stream that stalls past the request's OICM-Request-Timeout ends with response.failed."""
    gw, _, plain = setup
    plain.script[CHAT] = stream_script(tokens=3, gap=5)

    def run() -> list[Any]:
        with client(gw.url) as c:
            return list(
                c.responses.create(
                    model="resp",
                    input="x",
                    stream=True,
                    extra_headers={"OICM-Request-Timeout": "0.5"},
                )
            )

    events = await asyncio.to_thread(run)
    assert ("response.failed", "failed") == (events[-1].type, events[-1].response.status)
    assert "t0" == events[-1].response.output[0].content[0].text


async def test_client_leaving_a_translated_stream_cancels_the_backend(setup) -> None:
    """Closing the SDK's stream after the first delta closes the backend's stream at once."""
    gw, _, plain = setup
    plain.script[CHAT] = stream_script(tokens=200, gap=0.05)

    def run() -> None:
        with client(gw.url) as c:
            with c.responses.stream(model="resp", input="x") as stream:
                for event in stream:
                    if event.type == "response.output_text.delta":
                        break

    await asyncio.to_thread(run)
    await asyncio.wait_for(plain.aborted.wait(), timeout=5)
    assert plain.last.aborted_at is not None


async def test_image_to_a_model_without_vision_is_a_400(setup) -> None:
    """A translated Responses request with an input_image for a model without vision: a 400."""
    gw, _, plain = setup
    body = {
        "model": "resp",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                ],
            }
        ],
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as response:
            status, payload = response.status, await response.json()
    assert 400 == status
    assert (
        "input[0].content[1]: image input needs a model with vision" in payload["error"]["message"]
    )
    assert [] == plain.posts
