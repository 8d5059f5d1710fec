"""The real anthropic SDK through the gateway: forwarded to backends that serve /v1/messages,
translated to chat completions for those that do not, errors in Anthropic's shape."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from bench.simbackend import start_simbackend
from tests.fakes import (
    chat_answer,
    delta_event,
    json_script,
    sse_event,
    sse_script,
    stream_script,
    text_stream,
    usage_event,
)

KEY = "sk-ant-test"
CONFIG = """
backends:
  native: {{url: '{native}', kind: vllm}}
  plain: {{url: '{plain}', kind: tgi}}
  oai: {{url: '{plain}', kind: openai}}
  oai-native: {{url: '{native}', kind: openai, serves: [messages]}}
models:
  claude-native: {{targets: [{{backend: native, model: up-native}}]}}
  claude-same: {{targets: [{{backend: native}}]}}
  claude: {{targets: [{{backend: plain, model: up-chat}}]}}
  claude-vision: {{targets: [{{backend: plain, model: up-vision}}], vision: true}}
  claude-oai: {{targets: [{{backend: oai, model: up-chat}}]}}
  claude-oai-native: {{targets: [{{backend: oai-native, model: up-native}}]}}
"""
CHAT = "/v1/chat/completions"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
WEATHER_FUNCTION = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": WEATHER_TOOL["input_schema"],
        "description": "Weather for a city",
    },
}
CANONICAL = {
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
}
# A native /v1/messages answer and stream, as vLLM and llama-server send them.
NATIVE_MESSAGE = {
    "id": "msg_native",
    "type": "message",
    "role": "assistant",
    "model": "up-native",
    "content": [{"type": "text", "text": "Hi there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 9, "output_tokens": 3},
}
NATIVE_EVENTS = [
    sse_event(
        {
            "type": "message_start",
            "message": {**NATIVE_MESSAGE, "content": [], "stop_reason": None},
        },
        "message_start",
    ),
    sse_event(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    ),
    sse_event({"type": "ping"}, "ping"),
    sse_event(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        "content_block_delta",
    ),
    sse_event(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": " there"},
        },
        "content_block_delta",
    ),
    sse_event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    sse_event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 3},
        },
        "message_delta",
    ),
    sse_event({"type": "message_stop"}, "message_stop"),
]


@pytest.fixture
async def setup(upstream_factory, gateway_factory):
    """A gateway with a vllm backend (native /v1/messages) and a tgi one (translated)."""
    native, plain = await upstream_factory(), await upstream_factory()
    gw = await gateway_factory(CONFIG.format(native=native.url, plain=plain.url), {"API_KEYS": KEY})
    return gw, native, plain


def client(url: str, sent: list[bytes] | None = None, **options: Any) -> anthropic.Anthropic:
    """The sync SDK at the gateway's Anthropic base URL; `sent` collects the bodies it posts."""
    hooks = {"request": [lambda r: sent.append(r.read())]} if sent is not None else {}
    options.setdefault("api_key", KEY)
    return anthropic.Anthropic(
        base_url=url + "/anthropic",
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(event_hooks=hooks),
        **options,
    )


def call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


async def raw_post(url: str, body: dict) -> tuple[int, bytes]:
    """POST a body the SDK would not send, with the key; the status and every byte back."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, await response.read()


def events_of(raw: bytes) -> list[tuple[str, dict]]:
    """The (event name, data) pairs of an Anthropic SSE body."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


def tokens_logged(gw) -> list[tuple[int, int]]:
    """(prompt, completion) tokens of each logged request: what the token metrics count."""
    lines = [orjson.loads(line) for line in gw.access_lines()]
    return [(line["prompt_tokens"], line["completion_tokens"]) for line in lines]


# -- the native path: backends that serve /v1/messages get the SDK's bytes -----------------


async def test_native_create_forwards_the_sdk_body_with_the_model_rewritten(setup) -> None:
    """messages.create reaches a vllm backend as the SDK sent it, but for the upstream model id."""
    gw, native, plain = setup
    native.script["/v1/messages"] = json_script(200, NATIVE_MESSAGE)
    sent: list[bytes] = []

    def run() -> anthropic.types.Message:
        with client(gw.url, sent) as c:
            return c.messages.create(
                model="claude-native",
                max_tokens=32,
                system="be brief",
                messages=[{"role": "user", "content": "Hi"}],
            )

    message = await asyncio.to_thread(run)
    assert 1 == sent[0].count(b'"model":"claude-native"')
    assert sent[0].replace(b'"model":"claude-native"', b'"model":"up-native"') == native.last.body
    assert "/v1/messages" == native.last.path
    assert [] == plain.posts
    assert "Hi there" == message.content[0].text
    assert ("end_turn", 9, 3) == (
        message.stop_reason,
        message.usage.input_tokens,
        message.usage.output_tokens,
    )


async def test_native_create_same_model_is_byte_for_byte(setup) -> None:
    """Without a model rewrite the SDK's bytes reach vllm unchanged, and no gateway key."""
    gw, native, _ = setup
    native.script["/v1/messages"] = json_script(200, NATIVE_MESSAGE)
    sent: list[bytes] = []

    def run() -> anthropic.types.Message:
        with client(gw.url, sent) as c:
            return c.messages.create(
                model="claude-same",
                max_tokens=16,
                messages=[{"role": "user", "content": "Hi"}],
                extra_body={"temperature": 0.0},
            )

    await asyncio.to_thread(run)
    assert sent == [native.last.body]
    assert "anthropic-version" in native.last.headers
    assert "authorization" not in native.last.headers
    assert "x-api-key" not in native.last.headers


async def test_native_stream_relays_the_backend_events(setup) -> None:
    """messages.stream on a vllm backend: the SDK reads the backend's own event sequence."""
    gw, native, _ = setup
    native.script["/v1/messages"] = sse_script(NATIVE_EVENTS)
    sent: list[bytes] = []

    def run() -> tuple[list[str], anthropic.types.Message]:
        with client(gw.url, sent) as c:
            with c.messages.stream(
                model="claude-native",
                max_tokens=32,
                messages=[{"role": "user", "content": "Hi"}],
            ) as stream:
                types = [event.type for event in stream]
                return types, stream.get_final_message()

    types, message = await asyncio.to_thread(run)
    assert sent[0].replace(b'"model":"claude-native"', b'"model":"up-native"') == native.last.body
    assert b'"stream":true' in native.last.body
    assert [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ] == [t for t in types if t in CANONICAL]
    assert "Hi there" == message.content[0].text
    assert ("end_turn", 3) == (message.stop_reason, message.usage.output_tokens)


async def test_native_stream_bytes_are_relayed_unchanged(setup) -> None:
    """The native stream reaches the client byte for byte (ping included)."""
    gw, native, _ = setup
    native.script["/v1/messages"] = sse_script(NATIVE_EVENTS)
    body = {
        "model": "claude-native",
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    status, raw = await raw_post(gw.url + "/anthropic/v1/messages", body)
    assert (200, b"".join(NATIVE_EVENTS)) == (status, raw)


async def test_native_backend_error_passes_through(setup) -> None:
    """A native backend's own Anthropic-shaped 400 reaches the SDK unchanged."""
    gw, native, _ = setup
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "too long"}}
    native.script["/v1/messages"] = json_script(400, error)

    def run() -> anthropic.BadRequestError:
        with client(gw.url) as c, pytest.raises(anthropic.BadRequestError) as info:
            c.messages.create(
                model="claude-native", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        return info.value

    exc = await asyncio.to_thread(run)
    assert error == exc.body


async def test_gateway_prefix_and_x_api_key(setup, monkeypatch) -> None:
    """/gateway/anthropic works too, and an old SDK's X-Api-Key header is a valid key."""
    gw, native, _ = setup
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    native.script["/v1/messages"] = json_script(200, NATIVE_MESSAGE)

    def run() -> anthropic.types.Message:
        with anthropic.Anthropic(
            base_url=gw.url + "/gateway/anthropic",
            api_key=None,
            default_headers={"X-Api-Key": KEY},
            max_retries=0,
        ) as c:
            return c.messages.create(
                model="claude-native", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )

    message = await asyncio.to_thread(run)
    assert "Hi there" == message.content[0].text
    assert "x-api-key" not in native.last.headers


async def test_native_stream_cut_ends_with_an_error_event(setup) -> None:
    """A native stream cut midway ends with Anthropic's `event: error`, which the SDK raises."""
    gw, native, _ = setup
    native.script["/v1/messages"] = sse_script(NATIVE_EVENTS, cut_after=4)

    def run() -> anthropic.APIStatusError:
        with client(gw.url) as c, pytest.raises(anthropic.APIStatusError) as info:
            with c.messages.stream(
                model="claude-native", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                stream.get_final_message()
        return info.value

    exc = await asyncio.to_thread(run)
    assert ("error", "api_error") == (exc.body["type"], exc.body["error"]["type"])


@pytest.mark.parametrize(
    ("model", "native_paths", "plain_paths"),
    [("claude-oai-native", ["/v1/messages"], []), ("claude-oai", [], [CHAT])],
    ids=["openai-with-serves", "openai-without"],
)
async def test_openai_kind_serves_messages_only_when_configured(
    setup, model, native_paths, plain_paths
) -> None:
    """An `openai` backend gets /v1/messages only when its `serves` lists it; else chat."""
    gw, native, plain = setup
    native.script["/v1/messages"] = json_script(200, NATIVE_MESSAGE)
    plain.script[CHAT] = json_script(200, chat_answer("Hi there"))

    def run() -> anthropic.types.Message:
        with client(gw.url) as c:
            return c.messages.create(
                model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
            )

    message = await asyncio.to_thread(run)
    assert "Hi there" == message.content[0].text
    assert (native_paths, plain_paths) == (
        [r.path for r in native.posts],
        [r.path for r in plain.posts],
    )


# -- the translated path: a tgi backend gets a chat request --------------------------------


async def test_translated_create_system_multi_turn_and_sampling(setup) -> None:
    """System, turns and sampling become the chat request; the Message has end_turn and usage."""
    gw, native, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("Fine, thanks."))

    def run() -> anthropic.types.Message:
        with client(gw.url) as c:
            return c.messages.create(
                model="claude",
                max_tokens=64,
                system="Be brief.",
                stop_sequences=["END"],
                # anthropic 2.x dropped these keywords from create(); users send them so:
                extra_body={"temperature": 0.2, "top_p": 0.9},
                messages=[
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
                ],
            )

    message = await asyncio.to_thread(run)
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
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
    } == orjson.loads(plain.last.body)
    assert "authorization" not in plain.last.headers
    assert [] == native.posts
    assert message.id.startswith("msg_")
    assert ("message", "assistant", "claude") == (message.type, message.role, message.model)
    assert [("text", "Fine, thanks.")] == [(b.type, b.text) for b in message.content]
    assert ("end_turn", None) == (message.stop_reason, message.stop_sequence)
    assert (11, 4) == (message.usage.input_tokens, message.usage.output_tokens)
    assert [(11, 4)] == tokens_logged(gw)


async def test_translated_tools_and_tool_results(setup) -> None:
    """Tools, tool_use and tool_result map to chat tools, tool_calls and tool messages."""
    gw, _, plain = setup
    answer = chat_answer(
        None, "tool_calls", tool_calls=[call("call_9", "get_weather", '{"city":"Lyon"}')]
    )
    plain.script[CHAT] = json_script(200, answer)

    def run() -> anthropic.types.Message:
        with client(gw.url) as c:
            return c.messages.create(
                model="claude",
                max_tokens=64,
                tools=[WEATHER_TOOL],
                tool_choice={"type": "auto"},
                messages=[
                    {"role": "user", "content": "Weather in Paris, then Lyon?"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "text", "text": "Let me check."},
                            {
                                "type": "tool_use",
                                "id": "toolu_1",
                                "name": "get_weather",
                                "input": {"city": "Paris"},
                            },
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_1",
                                "content": "18C sunny",
                            }
                        ],
                    },
                ],
            )

    message = await asyncio.to_thread(run)
    sent = orjson.loads(plain.last.body)
    assert [
        {"role": "user", "content": "Weather in Paris, then Lyon?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [call("toolu_1", "get_weather", '{"city":"Paris"}')],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C sunny"},
    ] == sent["messages"]
    assert ([WEATHER_FUNCTION], "auto") == (sent["tools"], sent["tool_choice"])
    assert "tool_use" == message.stop_reason
    assert [("tool_use", "call_9", "get_weather", {"city": "Lyon"})] == [
        (b.type, b.id, b.name, b.input) for b in message.content
    ]


@pytest.mark.parametrize(
    ("choice", "stop_sequences", "expected"),
    [
        ({"finish": "stop"}, None, ("end_turn", None)),
        ({"finish": "length"}, None, ("max_tokens", None)),
        ({"finish": "stop", "stop_reason": "END"}, ["END"], ("stop_sequence", "END")),
        (
            {"finish": "tool_calls", "tool_calls": [call("c1", "get_weather", "{}")]},
            None,
            ("tool_use", None),
        ),
    ],
    ids=["end_turn", "max_tokens", "stop_sequence", "tool_use"],
)
async def test_translated_stop_reasons(setup, choice, stop_sequences, expected) -> None:
    """The chat finish_reason (and vLLM's matched stop string) maps to Anthropic's stop_reason."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("ok", **choice))
    extra = {"stop_sequences": stop_sequences} if stop_sequences else {}

    def run() -> anthropic.types.Message:
        with client(gw.url) as c:
            return c.messages.create(
                model="claude",
                max_tokens=8,
                tools=[WEATHER_TOOL],
                messages=[{"role": "user", "content": "x"}],
                **extra,
            )

    message = await asyncio.to_thread(run)
    assert expected == (message.stop_reason, message.stop_sequence)


async def test_translated_stream_event_sequence(setup) -> None:
    """messages.stream over a chat stream: the full event sequence, text, stop reason and usage."""
    gw, _, plain = setup
    plain.script[CHAT] = sse_script(text_stream("Hel", "lo", "!"))

    def run() -> tuple[list[str], anthropic.types.Message, str]:
        with client(gw.url) as c:
            with c.messages.stream(
                model="claude",
                max_tokens=32,
                system="be brief",
                messages=[{"role": "user", "content": "Hi"}],
            ) as stream:
                types = [event.type for event in stream]
                return types, stream.get_final_message(), stream.get_final_text()

    types, message, text = await asyncio.to_thread(run)
    sent = orjson.loads(plain.last.body)
    assert (True, {"include_usage": True}) == (sent["stream"], sent["stream_options"])
    assert [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ] == [t for t in types if t in CANONICAL]
    assert "Hello!" == text
    assert ("end_turn", "claude") == (message.stop_reason, message.model)
    assert (12, 3) == (message.usage.input_tokens, message.usage.output_tokens)
    assert [(12, 3)] == tokens_logged(gw)


async def test_translated_stream_raw_events(setup) -> None:
    """The translated stream's bytes are Anthropic's: named events, indexes, the closing delta."""
    gw, _, plain = setup
    plain.script[CHAT] = sse_script(text_stream("a", "b", finish="length"))
    body = {
        "model": "claude",
        "max_tokens": 2,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    status, raw = await raw_post(gw.url + "/anthropic/v1/messages", body)
    events = events_of(raw)
    assert 200 == status
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    assert [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
    ] == [(name, data["index"]) for name, data in events[1:-2]]
    assert {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 2, "input_tokens": 12},
    } == events[-2][1]
    assert ("message_stop", {"type": "message_stop"}) == events[-1]


async def test_translated_stream_text_then_tool_call(setup) -> None:
    """A streamed tool call becomes a tool_use block after the text block, input assembled."""
    gw, _, plain = setup
    first = {"index": 0, "id": "call_1", "type": "function"}
    plain.script[CHAT] = sse_script(
        [
            delta_event({"role": "assistant", "content": "Checking."}),
            delta_event(
                {"tool_calls": [{**first, "function": {"name": "get_weather", "arguments": ""}}]}
            ),
            delta_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
            delta_event({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            delta_event({}, "tool_calls"),
            usage_event(20, 9),
            b"data: [DONE]\n\n",
        ]
    )

    def run() -> tuple[list[str], anthropic.types.Message]:
        with client(gw.url) as c:
            with c.messages.stream(
                model="claude",
                max_tokens=32,
                tools=[WEATHER_TOOL],
                messages=[{"role": "user", "content": "Weather in Paris?"}],
            ) as stream:
                return [e.type for e in stream], stream.get_final_message()

    types, message = await asyncio.to_thread(run)
    assert [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ] == [t for t in types if t in CANONICAL]
    assert ("text", "Checking.") == (message.content[0].type, message.content[0].text)
    tool = message.content[1]
    assert ("tool_use", "call_1", "get_weather", {"city": "Paris"}) == (
        tool.type,
        tool.id,
        tool.name,
        tool.input,
    )
    assert ("tool_use", 9) == (message.stop_reason, message.usage.output_tokens)


async def test_translated_stream_stop_sequence(setup) -> None:
    """A streamed stop on a requested stop string ends with stop_reason stop_sequence."""
    gw, _, plain = setup
    plain.script[CHAT] = sse_script(text_stream("one", stop_reason="###"))

    def run() -> anthropic.types.Message:
        with client(gw.url) as c:
            with c.messages.stream(
                model="claude",
                max_tokens=32,
                stop_sequences=["###"],
                messages=[{"role": "user", "content": "count"}],
            ) as stream:
                return stream.get_final_message()

    message = await asyncio.to_thread(run)
    assert ("stop_sequence", "###") == (message.stop_reason, message.stop_sequence)


async def test_translated_against_the_simulated_backend(gateway_factory) -> None:
    """On the simulated vLLM (tgi kind), create and stream parse with usage and max_tokens."""
    sim = await start_simbackend(models=("sim-model",))
    try:
        gw = await gateway_factory(
            f"backends:\n  sim: {{url: '{sim.url}', kind: tgi}}\n"
            "models:\n  claude: {targets: [{backend: sim, model: sim-model}]}\n",
            {"API_KEYS": KEY},
        )

        def run() -> tuple[anthropic.types.Message, anthropic.types.Message]:
            with client(gw.url) as c:
                plain = c.messages.create(
                    model="claude", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
                )
                with c.messages.stream(
                    model="claude", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
                ) as stream:
                    return plain, stream.get_final_message()

        plain, streamed = await asyncio.to_thread(run)
    finally:
        await sim.close()
    assert ("max_tokens", 4) == (plain.stop_reason, plain.usage.output_tokens)
    assert plain.content[0].text
    assert ("max_tokens", 5) == (streamed.stop_reason, streamed.usage.output_tokens)
    assert streamed.usage.input_tokens > 0
    assert streamed.content[0].text


async def test_async_client_translated(setup) -> None:
    """The async SDK creates and streams over the translated path too."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("async ok"))
    async with anthropic.AsyncAnthropic(
        base_url=gw.url + "/anthropic", api_key=KEY, max_retries=0
    ) as c:
        message = await c.messages.create(
            model="claude", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
        plain.script[CHAT] = sse_script(text_stream("as", "ync"))
        async with c.messages.stream(
            model="claude", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            streamed = await stream.get_final_text()
    assert ("async ok", "async") == (message.content[0].text, streamed)


# -- bad input and failures, in Anthropic's shape ------------------------------------------


def sdk_post_error(url: str, body: dict) -> anthropic.APIStatusError:
    """POST `body` with the SDK's low-level `post` (for shapes `messages.create` will not build)."""
    with client(url) as c:
        try:
            c.post("/v1/messages", body=body, cast_to=anthropic.types.Message)
        except anthropic.APIStatusError as exc:
            return exc
    raise AssertionError("the gateway accepted a bad request")


def error_body(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


async def test_missing_max_tokens_is_anthropics_400(setup) -> None:
    """A body without max_tokens: BadRequestError, invalid_request_error, nothing sent upstream."""
    gw, native, plain = setup
    body = {"model": "claude", "messages": [{"role": "user", "content": "x"}]}
    exc = await asyncio.to_thread(sdk_post_error, gw.url, body)
    assert isinstance(exc, anthropic.BadRequestError)
    assert error_body("invalid_request_error", "max_tokens: field required") == exc.body
    assert ([], []) == (native.posts, plain.posts)


async def test_unknown_content_block_type_is_a_400(setup) -> None:
    """An unknown content block type is a 400 naming its path."""
    gw, _, plain = setup
    body = {
        "model": "claude",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": [{"type": "hologram", "data": "x"}]}],
    }
    exc = await asyncio.to_thread(sdk_post_error, gw.url, body)
    assert isinstance(exc, anthropic.BadRequestError)
    assert "invalid_request_error" == exc.body["error"]["type"]
    assert exc.body["error"]["message"].startswith(
        "messages[0].content[0].type: unknown content block type"
    )
    assert "hologram" in exc.body["error"]["message"]
    assert [] == plain.posts


IMAGE = {
    "type": "image",
    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
}


async def test_image_to_a_model_without_vision_is_a_400(setup) -> None:
    """An image for a model not marked `vision: true` is refused before any backend sees it."""
    gw, _, plain = setup

    def run() -> anthropic.BadRequestError:
        with client(gw.url) as c, pytest.raises(anthropic.BadRequestError) as info:
            c.messages.create(
                model="claude",
                max_tokens=8,
                messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE]}],
            )
        return info.value

    exc = await asyncio.to_thread(run)
    assert (
        error_body(
            "invalid_request_error",
            "messages[0].content[1]: image input needs a model with vision, and this one has none",
        )
        == exc.body
    )
    assert [] == plain.posts


async def test_image_to_a_vision_model_becomes_an_image_url_part(setup) -> None:
    """For a `vision: true` model a base64 image becomes a data: URL image part."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("a dot"))

    def run() -> anthropic.types.Message:
        with client(gw.url) as c:
            return c.messages.create(
                model="claude-vision",
                max_tokens=8,
                messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE]}],
            )

    message = await asyncio.to_thread(run)
    assert [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ] == orjson.loads(plain.last.body)["messages"]
    assert "a dot" == message.content[0].text


async def test_unknown_model_and_bad_key_in_anthropics_shape(setup) -> None:
    """An unknown model is NotFoundError (not_found_error); a wrong key AuthenticationError."""
    gw, _, _ = setup

    def run() -> list[anthropic.APIStatusError]:
        out = []
        for model, key in (("nope", KEY), ("claude", "wrong")):
            with client(gw.url, api_key=key) as c:
                try:
                    c.messages.create(
                        model=model, max_tokens=8, messages=[{"role": "user", "content": "x"}]
                    )
                except anthropic.APIStatusError as exc:
                    out.append(exc)
        return out

    missing, denied = await asyncio.to_thread(run)
    assert isinstance(missing, anthropic.NotFoundError)
    assert "not_found_error" == missing.body["error"]["type"]
    assert isinstance(denied, anthropic.AuthenticationError)
    assert "authentication_error" == denied.body["error"]["type"]
    assert {"type", "error"} == set(denied.body)


@pytest.mark.parametrize(
    ("status", "sdk_error", "kind"),
    [
        (500, anthropic.InternalServerError, "api_error"),
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
    ],
)
async def test_translated_backend_error_in_anthropics_shape(setup, status, sdk_error, kind) -> None:
    """A chat backend's error reaches the SDK in Anthropic's shape, its message kept."""
    gw, _, plain = setup
    backend_error = {"error": {"message": "CUDA out of memory", "type": "BadRequestError"}}
    plain.script[CHAT] = json_script(status, backend_error)

    def run() -> anthropic.APIStatusError:
        with client(gw.url) as c, pytest.raises(sdk_error) as info:
            c.messages.create(
                model="claude", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        return info.value

    exc = await asyncio.to_thread(run)
    assert error_body(kind, f"backend answered {status}: CUDA out of memory") == exc.body


async def test_translated_stream_cut_ends_with_an_error_event(setup) -> None:
    """A translated stream cut midway ends with `event: error`, no message_stop; the SDK raises."""
    gw, _, plain = setup
    plain.script[CHAT] = sse_script(text_stream("a", "b", "c"), cut_after=2)
    body = {
        "model": "claude",
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    status, raw = await raw_post(gw.url + "/anthropic/v1/messages", body)
    events = events_of(raw)
    assert 200 == status
    assert ["message_start", "content_block_start", "content_block_delta", "error"] == [
        name for name, _ in events
    ]
    assert "api_error" == events[-1][1]["error"]["type"]
    assert {"type", "error"} == set(events[-1][1])

    def run() -> anthropic.APIStatusError:
        with client(gw.url) as c, pytest.raises(anthropic.APIStatusError) as info:
            with c.messages.stream(
                model="claude", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                stream.get_final_message()
        return info.value

    exc = await asyncio.to_thread(run)
    assert "api_error" == exc.body["error"]["type"]


async def test_translated_stream_deadline_ends_with_a_timeout_error(setup) -> None:
    """A stream stalled past OICM-Request-Timeout ends with a `timeout_error` event."""
    gw, _, plain = setup
    plain.script[CHAT] = stream_script(tokens=3, gap=5)
    body = {
        "model": "claude",
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    headers = {"Authorization": f"Bearer {KEY}", "OICM-Request-Timeout": "0.5"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            gw.url + "/anthropic/v1/messages", json=body, headers=headers
        ) as response:
            events = events_of(await response.read())
    assert ["message_start", "content_block_start", "content_block_delta", "error"] == [
        name for name, _ in events
    ]
    assert "timeout_error" == events[-1][1]["error"]["type"]


async def test_client_leaving_a_translated_stream_cancels_the_backend(setup) -> None:
    """Closing the SDK's stream after the first delta closes the backend's stream at once."""
    gw, _, plain = setup
    plain.script[CHAT] = stream_script(tokens=200, gap=0.05)

    def run() -> None:
        with client(gw.url) as c:
            with c.messages.stream(
                model="claude", max_tokens=200, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                for event in stream:
                    if event.type == "content_block_delta":
                        break

    await asyncio.to_thread(run)
    await asyncio.wait_for(plain.aborted.wait(), timeout=5)
    assert plain.last.aborted_at is not None


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            {
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": False,
            },
        ),
    ],
    ids=["auto", "any", "none", "tool"],
)
async def test_translated_tool_choice(setup, choice, expected) -> None:
    """Each Anthropic tool_choice becomes its chat counterpart."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("ok"))

    def run() -> None:
        with client(gw.url) as c:
            c.messages.create(
                model="claude",
                max_tokens=8,
                tools=[WEATHER_TOOL],
                tool_choice=choice,
                messages=[{"role": "user", "content": "x"}],
            )

    await asyncio.to_thread(run)
    sent = orjson.loads(plain.last.body)
    assert expected == {k: sent[k] for k in ("tool_choice", "parallel_tool_calls") if k in sent}


async def test_translated_keeps_what_chat_can_carry(setup) -> None:
    """cache_control, thinking, error tool results, metadata: chat gets what it can carry."""
    gw, _, plain = setup
    plain.script[CHAT] = json_script(200, chat_answer("ok"))

    def run() -> None:
        with client(gw.url) as c:
            c.messages.create(
                model="claude",
                max_tokens=8,
                system=[
                    {"type": "text", "text": "Rule one.", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "Rule two."},
                ],
                metadata={"user_id": "u-42"},
                tools=[WEATHER_TOOL],
                messages=[
                    {"role": "user", "content": "Weather?"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "call it", "signature": "sig"},
                            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}},
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t1",
                                "is_error": True,
                                "content": [
                                    {"type": "text", "text": "city"},
                                    {"type": "text", "text": " missing"},
                                ],
                            },
                            {
                                "type": "text",
                                "text": "Paris.",
                                "cache_control": {"type": "ephemeral"},
                            },
                        ],
                    },
                ],
            )

    await asyncio.to_thread(run)
    sent = orjson.loads(plain.last.body)
    assert [
        {"role": "system", "content": "Rule one.\nRule two."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call("t1", "get_weather", "{}")]},
        {"role": "tool", "tool_call_id": "t1", "content": "Error: city\n missing"},
        {"role": "user", "content": "Paris."},
    ] == sent["messages"]
    assert "u-42" == sent["user"]
