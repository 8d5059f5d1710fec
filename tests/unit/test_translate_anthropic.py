"""Anthropic Messages <-> chat completions: requests, responses, streams, bad input, real SDK."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent, TextBlock, ToolUseBlock

from proxy.errors import BackendUnreachable, InvalidRequest
from proxy.translate.anthropic import (
    AnthropicStream,
    from_chat_response,
    make_message_id,
    to_chat_request,
)

PAYLOADS = Path(__file__).parent / "payloads"
EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)


def load(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text())


def events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of an Anthropic SSE body; each frame is exactly two lines."""
    out = []
    for frame in stream.split(b"\n\n")[:-1]:
        name, data = frame.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        out.append(
            (name.removeprefix(b"event: ").decode(), json.loads(data.removeprefix(b"data: ")))
        )
    assert stream.endswith(b"\n\n") or stream == b""
    return out


def run_stream(chunks: list[dict[str, object]], **kwargs: Any) -> bytes:
    stream = AnthropicStream(model="claude-test", message_id="msg_1", **kwargs)
    return b"".join(stream.feed(chunk) for chunk in chunks) + stream.finish()


def chunk(
    delta: dict[str, object], finish: str | None = None, **extra: object
) -> dict[str, object]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}


def usage_chunk(prompt: int, completion: int) -> dict[str, object]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}


def completion(
    message: dict[str, object], finish: str | None, **extra: object
) -> dict[str, object]:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
    usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    return {"id": "chatcmpl-x", "choices": [{**choice, **extra}], "usage": usage}


def minimal(**fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "claude-test",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    body.update(fields)
    return body


# -- requests ---------------------------------------------------------------------------------


def test_full_request_with_system_tools_and_tool_results() -> None:
    """A multi-turn request with system, tools, a tool call and its result maps field by field."""
    expected = {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "messages": [
            {"role": "system", "content": "You are a weather assistant.\nAnswer in one sentence."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": "Let me look that up.",
                "tool_calls": [
                    {
                        "id": "toolu_01A",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city":"Paris","unit":"celsius"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C, light rain"},
            {"role": "user", "content": "And should I take an umbrella?"},
        ],
        "max_tokens": 256,
        "stop": ["\n\nHuman:"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "user": "user-42",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string"},
                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                        },
                        "required": ["city"],
                    },
                    "description": "Current weather for a city.",
                },
            }
        ],
        "tool_choice": "auto",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body = load("anthropic_request_tools.json")
    assert expected == to_chat_request(body, upstream_model="Qwen/Qwen2.5-7B-Instruct")


def test_minimal_request_as_the_sdk_sends_it() -> None:
    """The anthropic SDK's plain body (string system, no stream) becomes a plain chat request."""
    body = minimal(system="be brief")
    expected = {
        "model": "up",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"}],
        "max_tokens": 16,
    }
    assert expected == to_chat_request(body, upstream_model="up")


def test_multi_turn_text_blocks_and_thinking() -> None:
    """Text blocks join with newlines; an assistant's thinking blocks are left out."""
    body = minimal(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "c"},
                ],
            },
            {"role": "user", "content": "d"},
        ]
    )
    expected = [
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert expected == to_chat_request(body, upstream_model="up")["messages"]


def test_tool_result_error_string_and_empty_content() -> None:
    """is_error marks the tool message's text; string and missing result content both work."""
    body = minimal(
        messages=[
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                    {"type": "tool_use", "id": "t2", "name": "g", "input": {"x": [1]}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": "boom",
                        "is_error": True,
                    },
                    {"type": "tool_result", "tool_use_id": "t2"},
                ],
            },
        ]
    )
    expected = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {
                    "id": "t2",
                    "type": "function",
                    "function": {"name": "g", "arguments": '{"x":[1]}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "Error: boom"},
        {"role": "tool", "tool_call_id": "t2", "content": ""},
    ]
    assert expected == to_chat_request(body, upstream_model="up")["messages"]


def test_images_with_vision() -> None:
    """With vision, base64 and url images become image_url parts; a tool result's image follows."""
    png = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    body = minimal(
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [
                            {"type": "text", "text": "chart:"},
                            {"type": "image", "source": png},
                        ],
                    },
                    {"type": "text", "text": "Compare with"},
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.jpg"},
                    },
                ],
            }
        ]
    )
    expected = [
        {"role": "tool", "tool_call_id": "t1", "content": "chart:"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "text", "text": "Compare with"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
            ],
        },
    ]
    assert expected == to_chat_request(body, upstream_model="up", vision=True)["messages"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "f"},
            {"tool_choice": {"type": "function", "function": {"name": "f"}}},
        ),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
    ],
)
def test_tool_choice(choice: dict[str, object], expected: dict[str, object]) -> None:
    """Each Anthropic tool_choice type maps to its chat tool_choice."""
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    chat = to_chat_request(minimal(tools=tools, tool_choice=choice), upstream_model="up")
    assert expected == {k: chat[k] for k in ("tool_choice", "parallel_tool_calls") if k in chat}


def test_structured_output_format() -> None:
    """output_config.format's schema becomes a json_schema response_format; effort is dropped."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    body = minimal(
        output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}}
    )
    expected = {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    assert expected == to_chat_request(body, upstream_model="up")["response_format"]


def _with_messages(*messages: object) -> dict[str, object]:
    return minimal(messages=list(messages))


_PNG = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
            "max_tokens: field required",
        ),
        (minimal(max_tokens="16"), "max_tokens: "),
        (minimal(max_tokens=0), "max_tokens: "),
        ([], "request body: "),
        (minimal(messages=[]), "messages: at least one message is required"),
        ({"model": "m", "max_tokens": 5}, "messages: field required"),
        (minimal(messages="Hi"), "messages: "),
        (
            _with_messages(
                {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "foo"}]}
            ),
            "messages[1].content[0].type: unknown content block type 'foo'",
        ),
        (
            _with_messages({"role": "system", "content": "a"}),
            "messages[0].role: ",
        ),
        (
            _with_messages({"role": "user", "content": 5}),
            "messages[0].content: ",
        ),
        (
            _with_messages({"role": "user", "content": []}),
            "messages[0].content: at least one content block is required",
        ),
        (
            _with_messages({"role": "user", "content": [{"type": "text"}]}),
            "messages[0].content[0].text: field required",
        ),
        (
            _with_messages({"role": "user", "content": [{"type": "text", "text": 1}]}),
            "messages[0].content[0].text: ",
        ),
        (
            _with_messages({"role": "user", "content": [{"type": "text", "text": "x"}, _PNG]}),
            "messages[0].content[1]: image input needs a model with vision, and this one has none",
        ),
        (
            _with_messages(
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}
                    ],
                }
            ),
            "messages[0].content[0]: image input needs a model with vision, and this one has none",
        ),
        (
            _with_messages(
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t", "content": [_PNG]}],
                }
            ),
            "messages[0].content[0].content[0]: "
            "image input needs a model with vision, and this one has none",
        ),
        (
            _with_messages(
                {"role": "user", "content": [{"type": "image", "source": {"type": "svg"}}]}
            ),
            "messages[0].content[0].source.type: unknown image source type 'svg'",
        ),
        (
            _with_messages(
                {
                    "role": "user",
                    "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                }
            ),
            "messages[0].content[0].type: tool_use blocks belong in assistant messages",
        ),
        (
            _with_messages(
                {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}
            ),
            "messages[0].content[0].type: tool_result blocks belong in user messages",
        ),
        (
            _with_messages(
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}],
                }
            ),
            "messages[0].content[0].input: ",
        ),
        (minimal(system=[{"type": "image"}]), "system[0].type: unknown content block type 'image'"),
        (minimal(temperature="hot"), "temperature: "),
        (minimal(stop_sequences="END"), "stop_sequences: "),
        (
            minimal(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            "tools[0].type: server tool 'web_search_20250305' is not supported",
        ),
        (minimal(tools=[{"name": "f"}]), "tools[0].input_schema: field required"),
        (
            minimal(output_config={"format": {"type": "xml"}}),
            "output_config.format.type: unknown output_config type 'xml'",
        ),
        (
            minimal(tool_choice={"type": "sometimes"}),
            "tool_choice.type: unknown tool_choice type 'sometimes'",
        ),
        (
            minimal(tool_choice={"type": "any"}),
            "tool_choice: forcing a tool call needs a non-empty tools list",
        ),
        (
            minimal(
                tools=[{"name": "f", "input_schema": {}}], tool_choice={"type": "tool", "name": "g"}
            ),
            "tool_choice.name: no tool named 'g' in tools",
        ),
    ],
)
def test_bad_input_is_invalid_request_naming_the_path(body: object, message: str) -> None:
    """Each malformed request raises InvalidRequest whose message names the bad value's path.

    A message ending in ": " is a type or range error: the path is ours, the words after it are
    msgspec's, so only the path is checked; every other message is ours and checked whole.
    """
    with pytest.raises(InvalidRequest) as caught:
        to_chat_request(body, upstream_model="up")
    assert 400 == caught.value.status
    if message.endswith(": "):
        assert message == caught.value.message[: len(message)]
        assert caught.value.message[len(message) :].strip()  # something follows the path
    else:
        assert message == caught.value.message


def test_file_image_source_is_refused_even_with_vision() -> None:
    """A Files-API image cannot be fetched by the backend: InvalidRequest names its source."""
    image = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
    with pytest.raises(InvalidRequest) as caught:
        to_chat_request(
            _with_messages({"role": "user", "content": [image]}), upstream_model="up", vision=True
        )
    assert (
        "messages[0].content[0].source.type: 'file' sources are not supported; use base64 or url"
        == (caught.value.message)
    )


# -- responses --------------------------------------------------------------------------------


def test_text_response() -> None:
    """A recorded vLLM chat.completion becomes a Message the SDK's model validates."""
    expected = {
        "id": "msg_chatcmpl-7f3a9c",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": "Yes, take an umbrella."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 57, "output_tokens": 7},
    }
    actual = from_chat_response(load("chat_completion_text.json"), model="claude-test")
    assert expected == actual
    assert expected == Message.model_validate(actual).model_dump(exclude_unset=True)


def test_tool_call_response() -> None:
    """Tool calls become tool_use blocks with their arguments parsed, and stop_reason tool_use."""
    actual = from_chat_response(
        load("chat_completion_tool_calls.json"), model="claude-test", message_id="msg_given"
    )
    expected_content = [
        {
            "type": "tool_use",
            "id": "chatcmpl-tool-1a",
            "name": "get_weather",
            "input": {"city": "Paris"},
        },
        {
            "type": "tool_use",
            "id": "chatcmpl-tool-2b",
            "name": "get_weather",
            "input": {"city": "Lyon", "unit": "celsius"},
        },
    ]
    assert ("msg_given", expected_content, "tool_use") == (
        actual["id"],
        actual["content"],
        actual["stop_reason"],
    )
    Message.model_validate(actual)


def test_invalid_tool_arguments_become_empty_input() -> None:
    """Arguments that are not a JSON object give input {} and the rest of the answer survives."""
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "[1]"}},
    ]
    actual = from_chat_response(
        completion({"content": "hi", "tool_calls": calls}, "tool_calls"), model="m"
    )
    expected = [
        {"type": "text", "text": "hi"},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {}},
        {"type": "tool_use", "id": "c2", "name": "g", "input": {}},
    ]
    assert expected == actual["content"]


@pytest.mark.parametrize(
    ("finish", "extra", "stop_sequences", "expected"),
    [
        ("stop", {}, None, ("end_turn", None)),
        ("length", {}, None, ("max_tokens", None)),
        ("tool_calls", {}, None, ("end_turn", None)),  # no calls came with it
        ("content_filter", {}, None, ("refusal", None)),
        (None, {}, None, ("end_turn", None)),
        ("stop", {"stop_reason": "END"}, ["END"], ("stop_sequence", "END")),
        ("stop", {"stop_reason": "END"}, None, ("stop_sequence", "END")),
        ("stop", {"stop": "END"}, ["END"], ("stop_sequence", "END")),
        ("stop", {"stop_reason": "<|im_end|>"}, ["END"], ("end_turn", None)),
        ("stop", {"stop_reason": 151645}, ["END"], ("end_turn", None)),
    ],
)
def test_stop_reasons(
    finish: str | None,
    extra: dict[str, object],
    stop_sequences: list[str] | None,
    expected: tuple[str, str | None],
) -> None:
    """Each chat finish_reason (and a reported stop string) maps to Anthropic's stop_reason."""
    chat = completion({"content": "x"}, finish, **extra)
    actual = from_chat_response(chat, model="m", stop_sequences=stop_sequences)
    assert expected == (actual["stop_reason"], actual["stop_sequence"])
    Message.model_validate(actual)


def test_malformed_backend_answers_are_backend_unreachable() -> None:
    """A chat answer with no choices, wrong types or an error body is a 502, not a 400 or 500.

    For wrong types only our prefix is checked; the words after it are msgspec's.
    """
    for chat, message in [
        ({"choices": []}, "backend sent a chat completion with no choices"),
        ({"choices": "x"}, "backend sent a malformed chat completion: "),
        ({"error": {"message": "model not loaded"}}, "backend reported an error: model not loaded"),
        ([], "backend sent a malformed chat completion: "),
    ]:
        with pytest.raises(BackendUnreachable) as caught:
            from_chat_response(chat, model="m")
        assert 502 == caught.value.status
        if message.endswith(": "):
            assert message == caught.value.message[: len(message)]
        else:
            assert message == caught.value.message
    assert "msg_gateway" == make_message_id(None)


# -- streams ----------------------------------------------------------------------------------


def test_text_stream_event_sequence() -> None:
    """A recorded text stream with a usage chunk gives Anthropic's full event sequence."""
    start: dict[str, object] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    expected = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        *[
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            )
            for text in ("Yes,", " take an", " umbrella.")
        ],
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 4, "input_tokens": 57},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    actual = events(run_stream(load("chat_stream_text.json")))
    assert expected == actual
    for name, data in actual:
        assert name == EVENTS.validate_python(data).type


def test_message_delta_goes_out_with_the_usage_chunk() -> None:
    """The closing events are sent when the usage chunk arrives, so finish() owes nothing."""
    stream = AnthropicStream(model="m", message_id="msg_1")
    chunks = load("chat_stream_text.json")
    for c in chunks[:-1]:
        assert "message_stop" not in [name for name, _ in events(stream.feed(c))]
    assert ["message_delta", "message_stop"] == [
        name for name, _ in events(stream.feed(chunks[-1]))
    ]
    assert b"" == stream.finish()
    assert b"" == stream.feed(chunks[-1])


def test_tool_call_stream_split_over_chunks() -> None:
    """Tool calls become tool_use blocks whose input_json_delta pieces join to the arguments."""
    actual = events(run_stream(load("chat_stream_tool_call.json")))
    expected_names = [
        *["message_start", "content_block_start", "content_block_delta", "content_block_stop"],
        *["content_block_start", *["content_block_delta"] * 3, "content_block_stop"],
        *["content_block_start", "content_block_delta", "content_block_stop"],
        *["message_delta", "message_stop"],
    ]
    assert expected_names == [name for name, _ in actual]
    starts = [data["content_block"] for name, data in actual if name == "content_block_start"]
    assert [
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "chatcmpl-tool-77", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "chatcmpl-tool-78", "name": "get_time", "input": {}},
    ] == starts
    pieces = [
        data["delta"]["partial_json"]
        for name, data in actual
        if name == "content_block_delta" and data["index"] == 1
    ]
    assert ['{"city": ', '"Par', 'is"}'] == pieces
    delta = actual[-2][1]
    assert {"stop_reason": "tool_use", "stop_sequence": None} == delta["delta"]
    assert {"output_tokens": 31, "input_tokens": 140} == delta["usage"]
    for name, data in actual:
        assert name == EVENTS.validate_python(data).type


def test_stream_without_usage_chunk_ends_at_finish() -> None:
    """With no usage chunk (llama_cpp.server), finish() closes the message with an estimate."""
    chunks = load("chat_stream_text.json")[:-1]
    stream = AnthropicStream(model="m", message_id="msg_1")
    body = b"".join(stream.feed(c) for c in chunks)
    assert "message_delta" not in [name for name, _ in events(body)]
    closing = events(stream.finish())
    assert [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 3},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ] == closing


def test_usage_on_every_chunk_sets_message_start_input_tokens() -> None:
    """When the first chunk carries usage, message_start reports its prompt tokens."""
    first = chunk({"role": "assistant", "content": "Hi"}) | {
        "usage": {"prompt_tokens": 9, "completion_tokens": 1}
    }
    last = chunk({}, "length") | {"usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    actual = events(run_stream([first, last]))
    assert 9 == actual[0][1]["message"]["usage"]["input_tokens"]
    assert {"output_tokens": 2, "input_tokens": 9} == actual[-2][1]["usage"]
    assert "max_tokens" == actual[-2][1]["delta"]["stop_reason"]


def test_stream_stop_sequence() -> None:
    """A stop string the backend reports on the finish chunk becomes stop_sequence."""
    chunks = [chunk({"content": "a"}), chunk({}, "stop", stop_reason="END"), usage_chunk(3, 1)]
    actual = events(run_stream(chunks, stop_sequences=["END"]))
    assert {"stop_reason": "stop_sequence", "stop_sequence": "END"} == actual[-2][1]["delta"]


def test_finish_without_any_chunk() -> None:
    """A stream that ended before any chunk still gives a well-formed message."""
    assert ["message_start", "message_delta", "message_stop"] == [
        name for name, _ in events(run_stream([]))
    ]


def test_interleaved_tool_call_deltas_are_refused() -> None:
    """Arguments for a tool block already closed cannot be sent: BackendUnreachable."""
    call = {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{"}}
    other = {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}
    late = {"index": 0, "function": {"arguments": "}"}}
    stream = AnthropicStream(model="m", message_id="msg_1")
    stream.feed(chunk({"tool_calls": [call]}))
    stream.feed(chunk({"tool_calls": [other]}))
    with pytest.raises(BackendUnreachable):
        stream.feed(chunk({"tool_calls": [late]}))


def test_stream_error_chunk_is_backend_unreachable() -> None:
    """An error object fed as a chunk raises BackendUnreachable carrying the backend's message."""
    with pytest.raises(BackendUnreachable) as caught:
        AnthropicStream(model="m", message_id="msg_1").feed({"error": {"message": "OOM"}})
    assert "backend reported an error: OOM" == caught.value.message


# -- the real anthropic SDK against the translation, through an in-memory transport -----------


Handler = Callable[[httpx2.Request], httpx2.Response]


def gateway(
    chat_answer: dict[str, object] | None,
    chunks: list[dict[str, object]],
    seen: list[dict[str, Any]],
) -> Handler:
    """What the gateway's translated route does, with a canned backend answer."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        assert "/anthropic/v1/messages" == request.url.path
        body = json.loads(request.content)
        chat = to_chat_request(body, upstream_model="up")
        seen.append(chat)
        if chat.get("stream"):
            stream = AnthropicStream(
                model=body["model"], message_id="msg_s", stop_sequences=body.get("stop_sequences")
            )
            out = b"".join(stream.feed(c) for c in chunks) + stream.finish()
            return httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"})
        answer = from_chat_response(
            chat_answer, model=body["model"], stop_sequences=body.get("stop_sequences")
        )
        return httpx2.Response(200, json=answer)

    return handle


def describe(block: object) -> tuple[str, object]:
    if isinstance(block, TextBlock):
        return ("text", block.text)
    assert isinstance(block, ToolUseBlock)
    return ("tool_use", (block.id, block.name, block.input))


def client(handler: Handler) -> anthropic.Anthropic:
    transport = httpx2.MockTransport(handler)
    return anthropic.Anthropic(
        api_key="sk-test",
        base_url="http://gw/anthropic",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def test_sdk_messages_create() -> None:
    """anthropic.messages.create reads the translated answer: text, stop reason, usage."""
    seen: list[dict[str, Any]] = []
    with client(gateway(load("chat_completion_text.json"), [], seen)) as sdk:
        message = sdk.messages.create(
            model="claude-test",
            max_tokens=32,
            system="be brief",
            messages=[{"role": "user", "content": "Umbrella?"}],
            stop_sequences=["END"],
            extra_body={"temperature": 0.5},  # SDK 2.x dropped the argument; older ones send it
        )
    assert ("Yes, take an umbrella.", "end_turn", 57, 7) == (
        message.content[0].text if message.content[0].type == "text" else None,
        message.stop_reason,
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    expected_chat = {
        "model": "up",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Umbrella?"},
        ],
        "max_tokens": 32,
        "stop": ["END"],
        "temperature": 0.5,
    }
    assert [expected_chat] == seen


def test_sdk_messages_create_with_tools() -> None:
    """The SDK gets tool_use blocks with parsed input from a tool-calling answer."""
    with client(gateway(load("chat_completion_tool_calls.json"), [], [])) as sdk:
        message = sdk.messages.create(
            model="claude-test",
            max_tokens=32,
            messages=[{"role": "user", "content": "Weather in Paris and Lyon?"}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
            tool_choice={"type": "any"},
        )
    calls = [(b.name, b.input) for b in message.content if b.type == "tool_use"]
    assert [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Lyon", "unit": "celsius"}),
    ] == calls
    assert "tool_use" == message.stop_reason


def test_sdk_messages_stream_text() -> None:
    """messages.stream over the translated stream yields the text and a complete final message."""
    seen: list[dict[str, Any]] = []
    with (
        client(gateway(None, load("chat_stream_text.json"), seen)) as sdk,
        sdk.messages.stream(
            model="claude-test", max_tokens=32, messages=[{"role": "user", "content": "Umbrella?"}]
        ) as stream,
    ):
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert ["Yes,", " take an", " umbrella."] == texts
    assert ("msg_s", "Yes, take an umbrella.", "end_turn", 57, 4) == (
        final.id,
        final.content[0].text if final.content[0].type == "text" else None,
        final.stop_reason,
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    expected_stream = {"stream": True, "stream_options": {"include_usage": True}}
    assert expected_stream == {k: seen[0][k] for k in ("stream", "stream_options")}


def test_sdk_messages_stream_tool_calls() -> None:
    """The SDK's stream accumulator rebuilds each tool call's input from the partial JSON."""
    with (
        client(gateway(None, load("chat_stream_tool_call.json"), [])) as sdk,
        sdk.messages.stream(
            model="claude-test", max_tokens=32, messages=[{"role": "user", "content": "Paris?"}]
        ) as stream,
    ):
        final = stream.get_final_message()
    blocks = [describe(block) for block in final.content]
    assert [
        ("text", "Checking."),
        ("tool_use", ("chatcmpl-tool-77", "get_weather", {"city": "Paris"})),
        ("tool_use", ("chatcmpl-tool-78", "get_time", {"tz": "Europe/Paris"})),
    ] == blocks
    assert ("tool_use", 140, 31) == (
        final.stop_reason,
        final.usage.input_tokens,
        final.usage.output_tokens,
    )


def test_sdk_raw_stream_without_usage_chunk() -> None:
    """The SDK's raw event iterator accepts a stream whose usage is only estimated."""
    chunks = load("chat_stream_text.json")[:-1]
    with client(gateway(None, copy.deepcopy(chunks), [])) as sdk:
        raw = sdk.messages.create(
            model="claude-test",
            max_tokens=32,
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
        )
        types = [event.type for event in raw]
    assert [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ] == types
