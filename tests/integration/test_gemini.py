"""The real google-genai client through the gateway: generateContent and its stream translated
to and from chat completions, on the default API version and v1beta, errors in Google's shape."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import aiohttp
import orjson
import pytest
from google import genai
from google.genai import errors, types

from bench.simbackend import start_simbackend
from tests import fakes
from tests.fakes import (
    delta_event,
    json_script,
    sequence_script,
    sse_script,
    stream_script,
    usage_event,
)

KEY = "AIza-test"
CHAT = "/v1/chat/completions"
CONFIG = """
backends:
  gpu: {{url: '{url}', kind: vllm}}
models:
  gem: {{targets: [{{backend: gpu, model: up-gem}}]}}
  gem-vision: {{targets: [{{backend: gpu, model: up-vision}}], vision: true}}
"""
WEATHER = types.FunctionDeclaration(
    name="get_weather",
    description="Weather for a city",
    parameters=types.Schema(
        type=types.Type.OBJECT,
        properties={"city": types.Schema(type=types.Type.STRING)},
        required=["city"],
    ),
)
WEATHER_FUNCTION = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


chat_answer = partial(fakes.chat_answer, prompt=10, completion=3, model="up-gem")
text_stream = partial(fakes.text_stream, prompt=8)


@pytest.fixture
async def setup(upstream, gateway_factory):
    """A gateway whose only backend is a vllm one: Gemini is translated even for vLLM."""
    gw = await gateway_factory(CONFIG.format(url=upstream.url), {"API_KEYS": KEY})
    return gw, upstream


def client(
    url: str, version: str | None = None, key: str = KEY, base: str = "/gemini"
) -> genai.Client:
    """The sync client at the gateway's Gemini base URL, on its default API version or `version`."""
    options: dict[str, Any] = {"base_url": url + base}
    if version is not None:
        options["api_version"] = version
    return genai.Client(api_key=key, http_options=options)


def paths(gw) -> list[str]:
    """The request paths (without query) in the gateway's access log."""
    return [orjson.loads(line)["path"] for line in gw.access_lines()]


CONTENTS = [
    types.Content(role="user", parts=[types.Part(text="Hi")]),
    types.Content(role="model", parts=[types.Part(text="Hello!")]),
    types.Content(role="user", parts=[types.Part(text="Weather in Paris?")]),
]
GENERATION = {
    "system_instruction": "Be brief.",
    "max_output_tokens": 32,
    "temperature": 0.2,
    "top_p": 0.9,
    "stop_sequences": ["END"],
}
EXPECTED_CHAT = {
    "model": "up-gem",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather in Paris?"},
    ],
    "stop": ["END"],
    "max_tokens": 32,
    "temperature": 0.2,
    "top_p": 0.9,
}


@pytest.mark.parametrize(
    ("base", "version", "route"),
    [
        ("/gemini", None, "/gemini/v1"),
        ("/gemini", "v1beta", "/gemini/v1beta"),
        ("/gateway/gemini", "v1beta", "/gateway/gemini/v1beta"),
    ],
)
async def test_generate_content(setup, base, version, route) -> None:
    """generate_content with system, turns and config round-trips, on v1, v1beta and /gateway."""
    gw, upstream = setup
    upstream.script[CHAT] = json_script(200, chat_answer("Sunny, 21C."))

    def run() -> types.GenerateContentResponse:
        with client(gw.url, version, base=base) as c:
            return c.models.generate_content(
                model="gem", contents=CONTENTS, config=types.GenerateContentConfig(**GENERATION)
            )

    response = await asyncio.to_thread(run)
    assert [f"{route}/models/gem:generateContent"] == paths(gw)
    assert CHAT == upstream.last.path
    assert EXPECTED_CHAT == orjson.loads(upstream.last.body)
    assert "authorization" not in upstream.last.headers
    assert "x-goog-api-key" not in upstream.last.headers
    assert "Sunny, 21C." == response.text
    assert types.FinishReason.STOP == response.candidates[0].finish_reason
    usage = response.usage_metadata
    assert (10, 3, 13) == (
        usage.prompt_token_count,
        usage.candidates_token_count,
        usage.total_token_count,
    )


async def test_generate_content_max_tokens(setup) -> None:
    """A chat answer cut by max_tokens is finishReason MAX_TOKENS."""
    gw, upstream = setup
    upstream.script[CHAT] = json_script(200, chat_answer("Sun", "length"))

    def run() -> types.GenerateContentResponse:
        with client(gw.url) as c:
            return c.models.generate_content(model="gem", contents="Weather?")

    response = await asyncio.to_thread(run)
    assert types.FinishReason.MAX_TOKENS == response.candidates[0].finish_reason
    assert [{"role": "user", "content": "Weather?"}] == orjson.loads(upstream.last.body)["messages"]


async def test_function_declarations_and_calls(setup) -> None:
    """Function declarations become chat tools; a backend tool call becomes a functionCall."""
    gw, upstream = setup
    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    upstream.script[CHAT] = json_script(
        200, chat_answer(None, "tool_calls", tool_calls=[tool_call])
    )

    def run() -> types.GenerateContentResponse:
        config = types.GenerateContentConfig(
            tools=[types.Tool(function_declarations=[WEATHER])],
            tool_config=types.ToolConfig(
                function_calling_config=types.FunctionCallingConfig(mode="ANY")
            ),
        )
        with client(gw.url) as c:
            return c.models.generate_content(
                model="gem", contents="Weather in Paris?", config=config
            )

    response = await asyncio.to_thread(run)
    sent = orjson.loads(upstream.last.body)
    assert ([WEATHER_FUNCTION], "required") == (sent["tools"], sent["tool_choice"])
    [function_call] = response.function_calls
    assert ("call_1", "get_weather", {"city": "Paris"}) == (
        function_call.id,
        function_call.name,
        function_call.args,
    )
    assert types.FinishReason.STOP == response.candidates[0].finish_reason


async def test_function_response_round_trip(setup) -> None:
    """A functionCall and its functionResponse become tool_calls and a tool message, one id."""
    gw, upstream = setup
    upstream.script[CHAT] = json_script(200, chat_answer("It is 18C and sunny in Paris."))
    contents = [
        types.Content(role="user", parts=[types.Part(text="Weather in Paris?")]),
        types.Content(
            role="model",
            parts=[types.Part.from_function_call(name="get_weather", args={"city": "Paris"})],
        ),
        types.Content(
            role="user",
            parts=[
                types.Part.from_function_response(
                    name="get_weather", response={"temperature": 18, "sky": "sunny"}
                )
            ],
        ),
    ]

    def run() -> types.GenerateContentResponse:
        config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[WEATHER])])
        with client(gw.url, "v1beta") as c:
            return c.models.generate_content(model="gem", contents=contents, config=config)

    response = await asyncio.to_thread(run)
    messages = orjson.loads(upstream.last.body)["messages"]
    assert [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_1_0",
            "content": '{"temperature":18,"sky":"sunny"}',
        },
    ] == messages
    assert "It is 18C and sunny in Paris." == response.text


@pytest.mark.parametrize("version", [None, "v1beta"])
async def test_generate_content_stream(setup, version) -> None:
    """generate_content_stream: text in pieces, the last chunk with finishReason and usage."""
    gw, upstream = setup
    upstream.script[CHAT] = sse_script(text_stream("Sun", "ny", "."))

    def run() -> list[types.GenerateContentResponse]:
        with client(gw.url, version) as c:
            config = types.GenerateContentConfig(**GENERATION)
            return list(
                c.models.generate_content_stream(model="gem", contents=CONTENTS, config=config)
            )

    chunks = await asyncio.to_thread(run)
    sent = orjson.loads(upstream.last.body)
    assert {**EXPECTED_CHAT, "stream": True, "stream_options": {"include_usage": True}} == sent
    assert ["Sun", "ny", "."] == [c.text for c in chunks if c.text]
    last = chunks[-1]
    assert types.FinishReason.STOP == last.candidates[0].finish_reason
    assert (8, 3, 11) == (
        last.usage_metadata.prompt_token_count,
        last.usage_metadata.candidates_token_count,
        last.usage_metadata.total_token_count,
    )
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    assert f"/gemini/{version or 'v1'}/models/gem:streamGenerateContent" == paths(gw)[-1]


async def test_generate_content_stream_function_call(setup) -> None:
    """A streamed tool call arrives whole as a functionCall in the last chunk."""
    gw, upstream = setup
    start = {"index": 0, "id": "call_7", "type": "function"}
    upstream.script[CHAT] = sse_script(
        [
            delta_event({"tool_calls": [{**start, "function": {"name": "get_weather"}}]}),
            delta_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}),
            delta_event({"tool_calls": [{"index": 0, "function": {"arguments": ':"Oslo"}'}}]}),
            delta_event({}, "tool_calls"),
            usage_event(30, 12),
            b"data: [DONE]\n\n",
        ]
    )

    def run() -> list[types.GenerateContentResponse]:
        config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[WEATHER])])
        with client(gw.url) as c:
            return list(
                c.models.generate_content_stream(
                    model="gem", contents="Weather in Oslo?", config=config
                )
            )

    chunks = await asyncio.to_thread(run)
    [function_call] = chunks[-1].function_calls
    assert ("call_7", "get_weather", {"city": "Oslo"}) == (
        function_call.id,
        function_call.name,
        function_call.args,
    )
    assert 12 == chunks[-1].usage_metadata.candidates_token_count


async def test_against_the_simulated_backend(gateway_factory) -> None:
    """The simulated vLLM: generate_content and its stream parse, MAX_TOKENS and usage included."""
    sim = await start_simbackend(models=("sim-model",))
    try:
        gw = await gateway_factory(
            f"backends:\n  sim: {{url: '{sim.url}', kind: tgi}}\n"
            "models:\n  gem: {targets: [{backend: sim, model: sim-model}]}\n",
            {"API_KEYS": KEY},
        )

        def run() -> tuple[types.GenerateContentResponse, list[types.GenerateContentResponse]]:
            with client(gw.url) as c:
                config = types.GenerateContentConfig(max_output_tokens=4)
                whole = c.models.generate_content(model="gem", contents="Hi", config=config)
                config = types.GenerateContentConfig(max_output_tokens=5)
                stream = c.models.generate_content_stream(model="gem", contents="Hi", config=config)
                return whole, list(stream)

        whole, chunks = await asyncio.to_thread(run)
    finally:
        await sim.close()
    assert types.FinishReason.MAX_TOKENS == whole.candidates[0].finish_reason
    assert 4 == whole.usage_metadata.candidates_token_count
    assert whole.text
    assert 5 == len([c for c in chunks if c.text])
    assert types.FinishReason.MAX_TOKENS == chunks[-1].candidates[0].finish_reason
    assert 5 == chunks[-1].usage_metadata.candidates_token_count


# google-genai's async client subclasses aiohttp's ClientSession, which aiohttp warns about.
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
async def test_async_client(setup) -> None:
    """The async client (client.aio, on aiohttp) generates and streams too."""
    gw, upstream = setup
    upstream.script[CHAT] = json_script(200, chat_answer("async"))
    async with client(gw.url, "v1beta").aio as c:
        response = await c.models.generate_content(model="gem", contents="x")
        upstream.script[CHAT] = sse_script(text_stream("a", "b"))
        stream = await c.models.generate_content_stream(model="gem", contents="x")
        texts = [chunk.text async for chunk in stream if chunk.text]
    assert ("async", ["a", "b"]) == (response.text, texts)


# -- bad input and failures, in Google's shape ---------------------------------------------


def sdk_error(url: str, **call: Any) -> errors.APIError:
    """The APIError the client raises for one generate_content call."""
    try:
        with client(url) as c:
            c.models.generate_content(**call)
    except errors.APIError as exc:
        return exc
    raise AssertionError("the gateway accepted a bad request")


async def google_post(url: str, body: object, **params: str) -> tuple[int, dict]:
    """A raw POST (for bodies the client will not build), keyed by ?key= as some clients do."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(url, json=body, params={"key": KEY, **params}) as response:
            return response.status, await response.json(content_type=None)


async def test_empty_contents_is_googles_400(setup) -> None:
    """Empty contents: ClientError 400 INVALID_ARGUMENT; no backend sees the request."""
    gw, upstream = setup
    # The client refuses contents=[] itself; its extra_body still sends what other clients can.
    config = types.GenerateContentConfig(
        http_options=types.HttpOptions(extra_body={"contents": []})
    )
    exc = await asyncio.to_thread(sdk_error, gw.url, model="gem", contents="x", config=config)
    assert isinstance(exc, errors.ClientError)
    assert (400, "INVALID_ARGUMENT", "contents: at least one content is required") == (
        exc.code,
        exc.status,
        exc.message,
    )
    assert [] == upstream.posts


async def test_raw_bad_shapes_are_googles_400(setup) -> None:
    """No contents, an unknown part, a wrong-typed config value: each a Google 400 naming it."""
    gw, upstream = setup
    url = gw.url + "/gemini/v1beta/models/gem:generateContent"
    cases = [
        ({}, "contents: field required"),
        (
            {"contents": [{"role": "user", "parts": [{"hologram": "x"}]}]},
            "contents[0].parts[0]: unknown part type (keys: hologram)",
        ),
        (
            {
                "contents": [{"parts": [{"text": "x"}]}],
                "generationConfig": {"maxOutputTokens": "many"},
            },
            "generationConfig.maxOutputTokens: expected a number, got string",
        ),
    ]
    for body, message in cases:
        status, answer = await google_post(url, body)
        assert (
            400,
            {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}},
        ) == (
            status,
            answer,
        )
    assert [] == upstream.posts


async def test_unsupported_part_is_a_400(setup) -> None:
    """A fileData part (a known type the gateway cannot serve) is a 400 naming it."""
    gw, _ = setup
    part = types.Part.from_uri(file_uri="gs://bucket/a.pdf", mime_type="application/pdf")
    exc = await asyncio.to_thread(sdk_error, gw.url, model="gem", contents=[part])
    assert (400, "INVALID_ARGUMENT") == (exc.code, exc.status)
    assert "fileData parts are not supported by this gateway" in exc.message


async def test_image_to_a_model_without_vision_is_a_400(setup) -> None:
    """An image is a 400 for a model without vision, and a data: URL part for one with it."""
    gw, upstream = setup
    image = types.Part.from_bytes(data=b"\x89PNG\r\n", mime_type="image/png")
    contents = [types.Content(role="user", parts=[types.Part(text="What is this?"), image])]
    exc = await asyncio.to_thread(sdk_error, gw.url, model="gem", contents=contents)
    assert (400, "INVALID_ARGUMENT") == (exc.code, exc.status)
    assert "image input needs a model with vision" in exc.message
    assert [] == upstream.posts
    upstream.script[CHAT] = json_script(200, chat_answer("A PNG header."))

    def run() -> types.GenerateContentResponse:
        with client(gw.url) as c:
            return c.models.generate_content(model="gem-vision", contents=contents)

    response = await asyncio.to_thread(run)
    assert [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
    ] == orjson.loads(upstream.last.body)["messages"][0]["content"]
    assert "A PNG header." == response.text


async def test_unknown_model_and_bad_key_in_googles_shape(setup) -> None:
    """An unknown model is 404 NOT_FOUND; a wrong key 401 UNAUTHENTICATED."""
    gw, _ = setup
    missing = await asyncio.to_thread(sdk_error, gw.url, model="nope", contents="x")
    assert (404, "NOT_FOUND") == (missing.code, missing.status)

    def denied() -> errors.APIError:
        try:
            with client(gw.url, key="wrong") as c:
                c.models.generate_content(model="gem", contents="x")
        except errors.APIError as exc:
            return exc
        raise AssertionError("a wrong key was accepted")

    exc = await asyncio.to_thread(denied)
    assert isinstance(exc, errors.ClientError)
    assert (401, "UNAUTHENTICATED") == (exc.code, exc.status)


async def test_unserved_method_and_version_are_googles_404(setup) -> None:
    """An unserved method or API version is a 404 in Google's shape."""
    gw, _ = setup
    body = {"contents": [{"parts": [{"text": "x"}]}]}
    for path in ("/gemini/v1/models/gem:countTokens", "/gemini/v2/models/gem:generateContent"):
        status, answer = await google_post(gw.url + path, body)
        assert (404, "NOT_FOUND") == (status, answer["error"]["status"])
        assert 404 == answer["error"]["code"]


async def test_backend_error_in_googles_shape(setup) -> None:
    """A chat backend's 500 becomes ServerError 502 UNAVAILABLE, its message kept."""
    gw, upstream = setup
    upstream.script[CHAT] = json_script(500, {"error": {"message": "CUDA out of memory"}})
    exc = await asyncio.to_thread(sdk_error, gw.url, model="gem", contents="x")
    assert isinstance(exc, errors.ServerError)
    assert (502, "UNAVAILABLE", "backend answered 500: CUDA out of memory") == (
        exc.code,
        exc.status,
        exc.message,
    )


async def test_stream_cut_ends_with_a_google_error(setup) -> None:
    """A stream cut midway ends with a Google error, raised as ServerError after the text."""
    gw, upstream = setup
    upstream.script[CHAT] = sse_script(text_stream("a", "b", "c"), cut_after=3)
    got: list[str] = []

    def run() -> errors.APIError:
        try:
            with client(gw.url) as c:
                for chunk in c.models.generate_content_stream(model="gem", contents="x"):
                    got.append(chunk.text)
        except errors.APIError as exc:
            return exc
        raise AssertionError("the cut stream ended as if complete")

    exc = await asyncio.to_thread(run)
    assert ["a", "b"] == got
    assert isinstance(exc, errors.ServerError)
    assert (502, "UNAVAILABLE") == (exc.code, exc.status)


async def test_stream_deadline_is_a_google_deadline_error(setup) -> None:
    """A stream stalled past OICM-Request-Timeout ends with 504 DEADLINE_EXCEEDED."""
    gw, upstream = setup
    upstream.script[CHAT] = stream_script(tokens=3, gap=5)
    got: list[str] = []

    def run() -> errors.APIError:
        options = {"base_url": gw.url + "/gemini", "headers": {"OICM-Request-Timeout": "0.5"}}
        try:
            with genai.Client(api_key=KEY, http_options=options) as c:
                for chunk in c.models.generate_content_stream(model="gem", contents="x"):
                    got.append(chunk.text)
        except errors.APIError as exc:
            return exc
        raise AssertionError("the stalled stream ended as if complete")

    exc = await asyncio.to_thread(run)
    assert ["t0"] == got
    assert (504, "DEADLINE_EXCEEDED") == (exc.code, exc.status)


async def test_client_leaving_a_stream_cancels_the_backend(setup) -> None:
    """Closing the client's stream after the first chunk closes the backend's stream at once."""
    gw, upstream = setup
    upstream.script[CHAT] = stream_script(tokens=200, gap=0.05)

    def run() -> None:
        with client(gw.url) as c:
            stream = c.models.generate_content_stream(model="gem", contents="x")
            next(iter(stream))
            stream.close()

    await asyncio.to_thread(run)
    await asyncio.wait_for(upstream.aborted.wait(), timeout=5)
    assert upstream.last.aborted_at is not None


def get_weather(city: str) -> dict:
    """Weather for a city.

    Args:
        city: The city's name.
    """
    return {"temperature": 18, "sky": "sunny", "city": city}


async def test_automatic_function_calling(setup) -> None:
    """A Python function tool: the client runs the call and its result reaches the backend."""
    gw, upstream = setup
    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    upstream.script[CHAT] = sequence_script(
        json_script(200, chat_answer(None, "tool_calls", tool_calls=[tool_call])),
        json_script(200, chat_answer("18C and sunny in Paris.")),
    )

    def run() -> types.GenerateContentResponse:
        with client(gw.url) as c:
            config = types.GenerateContentConfig(tools=[get_weather])
            return c.models.generate_content(
                model="gem", contents="Weather in Paris?", config=config
            )

    response = await asyncio.to_thread(run)
    first, second = (orjson.loads(r.body) for r in upstream.posts)
    assert [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city.\n\nArgs:\n    city: The city's name.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ] == first["tools"]
    assert [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": '{"result":{"temperature":18,"sky":"sunny","city":"Paris"}}',
        },
    ] == second["messages"]
    assert "18C and sunny in Paris." == response.text


async def test_json_mode(setup) -> None:
    """responseMimeType application/json with a schema becomes a json_schema response_format."""
    gw, upstream = setup
    upstream.script[CHAT] = json_script(200, chat_answer('{"city": "Paris"}'))

    def run() -> types.GenerateContentResponse:
        with client(gw.url) as c:
            config = types.GenerateContentConfig(
                response_mime_type="application/json",
                response_schema=types.Schema(
                    type=types.Type.OBJECT,
                    properties={"city": types.Schema(type=types.Type.STRING)},
                ),
            )
            return c.models.generate_content(model="gem", contents="A city?", config=config)

    response = await asyncio.to_thread(run)
    assert {
        "type": "json_schema",
        "json_schema": {
            "name": "response",
            "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    } == orjson.loads(upstream.last.body)["response_format"]
    assert {"city": "Paris"} == orjson.loads(response.text)


async def test_model_id_with_a_slash(upstream, gateway_factory) -> None:
    """With no models section, a Hugging Face id like Org/Name is reachable as a Gemini model."""
    gw = await gateway_factory(f"backends:\n  gpu: {{url: '{upstream.url}', kind: vllm}}\n")
    status, body = await google_post(
        gw.url + "/gemini/v1beta/models/Org/Name-7B:generateContent",
        {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]},
    )
    assert 200 == status
    assert "Org/Name-7B" == orjson.loads(upstream.last.body)["model"]
    assert "STOP" == body["candidates"][0]["finishReason"]
