"""The Responses API translator: requests to chat, chat answers and streams back to Responses."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent, ToolChoiceFunction
from pydantic import TypeAdapter

from proxy.errors import BackendUnreachable, InvalidRequest
from proxy.translate.responses import ResponsesStream, from_chat_response, to_chat_request

PAYLOADS = Path(__file__).parent / "payloads"
# The HTTP library the openai SDK runs on: httpx2 from openai 3 on, httpx before.
httpx: Any = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
EVENT = TypeAdapter(ResponseStreamEvent)
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 9,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def load(name: str) -> Any:
    return orjson.loads((PAYLOADS / name).read_bytes())


def chunks(name: str) -> list[dict[str, Any]]:
    """The decoded chunks of a recorded chat stream, `[DONE]` left out."""
    lines = (PAYLOADS / name).read_text().splitlines()
    return [orjson.loads(line[6:]) for line in lines if line.startswith("data: {")]


def events(raw: bytes) -> list[dict[str, Any]]:
    """Each SSE event as its JSON object, checking `event:` names its `type`."""
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n")
        event = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + event["type"].encode()
        out.append(event)
    return out


def stream(name: str, **kwargs: Any) -> list[dict[str, Any]]:
    translator = ResponsesStream(model="qwen", response_id="resp_abc", created_at=7, **kwargs)
    raw = b"".join(translator.feed(chunk) for chunk in chunks(name)) + translator.finish()
    return events(raw)


def test_string_input_becomes_one_user_message() -> None:
    """A string `input` is one user message, sent to the target's upstream model id."""
    expected = {"model": "up", "messages": [{"role": "user", "content": "Hello"}]}
    assert expected == to_chat_request({"model": "qwen", "input": "Hello"}, upstream_model="up")


def test_agent_request_maps_every_field() -> None:
    """Instructions, tool calls and results, parts, images, tools and formats map to chat."""
    actual = to_chat_request(
        load("responses_request_agent.json"), upstream_model="Qwen/Qwen2.5-7B-Instruct"
    )
    assert load("responses_chat_request_agent.json") == actual


def test_parallel_function_calls_share_one_assistant_message() -> None:
    """Consecutive function_call items become one assistant message with two tool calls."""
    call = {"type": "function_call", "name": "f", "arguments": "{}"}
    body = {"input": [{**call, "call_id": "a"}, {**call, "call_id": "b"}]}
    messages = to_chat_request(body, upstream_model="m")["messages"]
    assert isinstance(messages, list)
    assert [["a", "b"]] == [[c["id"] for c in m["tool_calls"]] for m in messages]


def test_text_formats_and_tool_choice_map_to_chat() -> None:
    """`text.format` json_object and a named function tool_choice map to their chat forms."""
    body = {
        "input": "x",
        "text": {"format": {"type": "json_object"}},
        "tool_choice": {"type": "function", "name": "f"},
    }
    actual = to_chat_request(body, upstream_model="m")
    assert {"type": "json_object"} == actual["response_format"]
    assert {"type": "function", "function": {"name": "f"}} == actual["tool_choice"]


def test_text_format_text_and_reasoning_items_add_nothing() -> None:
    """A plain text format adds no response_format and earlier reasoning items are dropped."""
    body = {
        "input": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "user", "content": "x"},
        ],
        "text": {"format": {"type": "text"}},
    }
    expected = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert expected == to_chat_request(body, upstream_model="m")


BAD_REQUESTS = [
    ([], "body: expected an object"),
    (
        {"input": "x", "previous_response_id": "resp_1"},
        "previous_response_id: not supported: "
        "this gateway stores no responses, conversations or prompts; send the whole input instead",
    ),
    (
        {"input": "x", "background": True},
        "background: not supported: this gateway answers in the foreground",
    ),
    ({}, "input: required: a string or a list of input items"),
    ({"input": 5}, "input: expected a list"),
    ({"input": []}, "input: must hold at least one message"),
    ({"input": ["hi"]}, "input[0]: expected an object"),
    ({"input": [{"content": "x"}]}, "input[0].type: unsupported input item type None"),
    (
        {"input": [{"type": "web_search_call", "id": "ws"}]},
        "input[0].type: unsupported input item type 'web_search_call'",
    ),
    (
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        "input[0].type: 'item_reference' "
        "needs stored items; this gateway stores none, so send the item itself",
    ),
    (
        {"input": [{"role": "tool", "content": "x"}]},
        "input[0].role: expected user, assistant, system or developer, got 'tool'",
    ),
    ({"input": [{"role": "user", "content": None}]}, "input[0].content: expected a list"),
    (
        {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "foo"}]}
            ]
        },
        "input[0].content[1].type: unknown content type 'foo'",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        "input[0].content[0].text: expected a string",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        "input[0].content[0].type: 'input_file' is not supported on this backend",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
        "input[0].content[0].image_url: required: this gateway stores no files, so send the image "
        "as a URL or a data: URL, not a file_id",
    ),
    (
        {"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]},
        "input[0].content[0].type: images are only allowed in user messages",
    ),
    (
        {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
        "input[0].call_id: expected a string",
    ),
    (
        {
            "input": [
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [{"type": "input_image"}],
                }
            ]
        },
        "input[0].output[0].type: a function_call_output takes input_text parts only, "
        "got 'input_image'",
    ),
    (
        {"input": "x", "tools": [{"type": "web_search"}]},
        "tools[0].type: built-in tool "
        "'web_search' is not supported on this backend; only function tools are",
    ),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name: expected a string"),
    ({"input": "x", "tools": {}}, "tools: expected a list"),
    (
        {"input": "x", "tool_choice": "any"},
        "tool_choice: expected none, auto, required or "
        '{"type": "function", "name": ...}, got \'any\'',
    ),
    (
        {"input": "x", "text": {"format": {"type": "yaml"}}},
        "text.format.type: expected one of text, json_object, json_schema, got 'yaml'",
    ),
    (
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
        "text.format.schema: expected an object",
    ),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens: expected a positive integer"),
    ({"input": "x", "max_output_tokens": True}, "max_output_tokens: expected a positive integer"),
    ({"input": "x", "temperature": "hot"}, "temperature: expected a number"),
    ({"input": "x", "stream": "yes"}, "stream: expected true or false"),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS)
def test_bad_requests_name_the_problem(body: object, message: str) -> None:
    """Each wrong shape is a 400 whose message names the path of the problem."""
    with pytest.raises(InvalidRequest) as caught:
        to_chat_request(body, upstream_model="m")
    assert message == caught.value.message


def test_text_completion_becomes_a_valid_response() -> None:
    """A text answer becomes a completed Response the openai SDK accepts, with its usage."""
    actual = from_chat_response(
        load("responses_chat_completion_text.json"),
        model="qwen",
        response_id="resp_abc",
        created_at=7,
    )
    response = Response.model_validate(actual)
    assert "It is 18 C and cloudy in Paris." == response.output_text
    assert ("completed", None) == (response.status, response.incomplete_details)
    assert {"input_tokens": 41, "output_tokens": 11, "total_tokens": 52} == {
        k: getattr(response.usage, k) for k in ("input_tokens", "output_tokens", "total_tokens")
    }
    assert ["msg_abc_0"] == [item.id for item in response.output]


def test_tool_calls_become_function_call_items() -> None:
    """Each chat tool call becomes a function_call item keeping the backend's call id."""
    actual = from_chat_response(
        load("responses_chat_completion_tool.json"),
        model="qwen",
        response_id="resp_abc",
        created_at=7,
    )
    response = Response.model_validate(actual)
    expected = [
        ("fc_abc_0", "chatcmpl-tool-7c1e2f3a4b5c6d7e", "get_weather", '{"city": "Paris"}'),
        ("fc_abc_1", "chatcmpl-tool-8d2f3a4b5c6d7e8f", "get_weather", '{"city": "Lyon"}'),
    ]
    assert expected == [
        (i.id, i.call_id, i.name, i.arguments) for i in response.output if i.type == "function_call"
    ]


def test_length_finish_is_incomplete() -> None:
    """finish_reason length is status incomplete with reason max_output_tokens."""
    chat = load("responses_chat_completion_text.json")
    chat["choices"][0]["finish_reason"] = "length"
    response = Response.model_validate(
        from_chat_response(chat, model="q", response_id="r", created_at=1)
    )
    assert response.incomplete_details is not None
    assert ("incomplete", "max_output_tokens") == (
        response.status,
        response.incomplete_details.reason,
    )
    assert ["incomplete"] == [getattr(item, "status", None) for item in response.output]


def test_response_repeats_the_request_settings() -> None:
    """The Response repeats the request's instructions, tools, tool_choice, text and sampling."""
    request = load("responses_request_agent.json")
    actual = from_chat_response(
        load("responses_chat_completion_text.json"),
        model="qwen",
        response_id="resp_abc",
        created_at=7,
        request=request,
    )
    response = Response.model_validate(actual)
    assert request["instructions"] == response.instructions
    assert (256, 0.2, 0.9, False) == (
        response.max_output_tokens,
        response.temperature,
        response.top_p,
        response.parallel_tool_calls,
    )
    assert ["get_weather"] == [tool.name for tool in response.tools if tool.type == "function"]
    assert response.text is not None and response.text.format is not None
    assert "json_schema" == response.text.format.type


@pytest.mark.parametrize(
    "chat", [{}, {"choices": []}, {"choices": "x"}, [], {"error": {"message": "boom"}}]
)
def test_malformed_backend_answers_are_backend_errors(chat: object) -> None:
    """A chat answer that cannot be translated is the backend's fault: 502, never a KeyError."""
    with pytest.raises(BackendUnreachable):
        from_chat_response(chat, model="q", response_id="r", created_at=1)


def test_text_stream_event_sequence() -> None:
    """A text stream yields the Responses events in order, each valid for the openai SDK."""
    out = stream("responses_stream_text.sse")
    assert TEXT_EVENTS == [e["type"] for e in out]
    assert list(range(len(out))) == [e["sequence_number"] for e in out]
    for event in out:
        EVENT.validate_python(event)
    final = Response.model_validate(out[-1]["response"])
    assert "It is 18 C and cloudy in Paris." == final.output_text
    assert "It is 18 C and cloudy in Paris." == out[-4]["text"]
    assert final.usage is not None and (41, 10) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )


def test_tool_stream_event_sequence() -> None:
    """Streamed tool calls become function_call items, each closed before the next opens."""
    out = stream("responses_stream_tool.sse")
    call = [
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    expected = ["response.created", "response.in_progress", *call, *call, "response.completed"]
    assert expected == [e["type"] for e in out]
    for event in out:
        EVENT.validate_python(event)
    final = Response.model_validate(out[-1]["response"])
    assert [
        ("chatcmpl-tool-7c1e2f3a4b5c6d7e", '{"city": "Paris"}'),
        ("chatcmpl-tool-8d2f3a4b5c6d7e8f", '{"city": "Lyon"}'),
    ] == [(i.call_id, i.arguments) for i in final.output if i.type == "function_call"]


def test_length_stream_ends_incomplete() -> None:
    """A stream cut by the token limit ends with response.incomplete, its item incomplete."""
    out = stream("responses_stream_length.sse")
    assert "response.incomplete" == out[-1]["type"]
    EVENT.validate_python(out[-1])
    assert {"reason": "max_output_tokens"} == out[-1]["response"]["incomplete_details"]
    assert "incomplete" == out[-2]["item"]["status"]


def test_text_then_tool_call_closes_the_message_first() -> None:
    """A tool call after text closes the message item before the function_call item opens."""
    translator = ResponsesStream(model="q", response_id="resp_1", created_at=1)
    raw = translator.feed({"choices": [{"index": 0, "delta": {"content": "Let me check."}}]})
    raw += translator.feed(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}
                        ]
                    },
                }
            ]
        }
    )
    raw += translator.finish()
    out = events(raw)
    types = [e["type"] for e in out]
    assert types.index("response.output_item.done") < types.index(
        "response.function_call_arguments.delta"
    )
    final = Response.model_validate(out[-1]["response"])
    assert ["message", "function_call"] == [item.type for item in final.output]


def test_failed_ends_the_stream_with_response_failed() -> None:
    """`failed` ends a broken stream with a valid response.failed carrying the message."""
    translator = ResponsesStream(model="q", response_id="resp_1", created_at=1)
    translator.feed({"choices": [{"index": 0, "delta": {"content": "Par"}}]})
    out = events(translator.failed("backend closed the stream"))
    assert ["response.failed"] == [e["type"] for e in out]
    failed = EVENT.validate_python(out[0])
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert ("failed", "backend closed the stream") == (
        failed.response.status,
        failed.response.error.message,
    )
    assert ["incomplete"] == [getattr(item, "status", None) for item in failed.response.output]
    assert b"" == translator.finish() + translator.feed({"choices": []})


def test_failed_before_any_chunk_still_opens_the_response() -> None:
    """A stream that fails before its first chunk still says created and in_progress first."""
    translator = ResponsesStream(model="q", response_id="resp_1", created_at=1)
    out = events(translator.failed("backend unreachable"))
    assert ["response.created", "response.in_progress", "response.failed"] == [
        e["type"] for e in out
    ]


def test_empty_stream_completes_with_no_output() -> None:
    """`finish` with no chunks still gives a valid, completed, empty response."""
    out = events(ResponsesStream(model="q", response_id="r", created_at=1).finish())
    assert ["response.created", "response.in_progress", "response.completed"] == [
        e["type"] for e in out
    ]
    assert [] == Response.model_validate(out[-1]["response"]).output


@pytest.mark.parametrize("chunk", [{"error": {"message": "oom"}}, {"choices": [{"delta": 3}]}])
def test_error_or_malformed_chunk_is_a_backend_error(chunk: dict[str, object]) -> None:
    """An error event or a malformed chunk raises BackendUnreachable for the caller's `failed`."""
    with pytest.raises(BackendUnreachable):
        ResponsesStream(model="q", response_id="r", created_at=1).feed(chunk)


def test_going_back_to_an_ended_tool_call_is_a_backend_error() -> None:
    """Arguments for a tool call already closed cannot be carried, so they are a 502."""
    translator = ResponsesStream(model="q", response_id="r", created_at=1)
    for index in (0, 1):
        translator.feed(
            {"choices": [{"delta": {"tool_calls": [{"index": index, "function": {"name": "f"}}]}}]}
        )
    with pytest.raises(BackendUnreachable):
        translator.feed(
            {
                "choices": [
                    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}
                ]
            }
        )


def sdk_client(chat_body: bytes, content_type: str) -> openai.OpenAI:
    """An openai SDK client whose transport answers every request with the translated bytes."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chat_body, headers={"content-type": content_type})

    transport = httpx.MockTransport(answer)
    return openai.OpenAI(
        api_key="k", base_url="http://gw/v1", http_client=httpx.Client(transport=transport)
    )


def test_openai_sdk_reads_the_translated_response() -> None:
    """The real SDK's `responses.create` parses the translated body and finds its text."""
    body = orjson.dumps(
        from_chat_response(
            load("responses_chat_completion_text.json"),
            model="qwen",
            response_id="resp_abc",
            created_at=7,
        )
    )
    with sdk_client(body, "application/json") as client:
        response = client.responses.create(model="qwen", input="weather?")
    assert "It is 18 C and cloudy in Paris." == response.output_text


def test_openai_sdk_stream_helper_assembles_the_translated_stream() -> None:
    """The real SDK's `responses.stream` helper accumulates the events into the final Response."""
    translator = ResponsesStream(model="qwen", response_id="resp_abc", created_at=7)
    raw = (
        b"".join(translator.feed(c) for c in chunks("responses_stream_tool.sse"))
        + translator.finish()
    )
    with (
        sdk_client(raw, "text/event-stream") as client,
        client.responses.stream(model="qwen", input="x") as events_,
    ):
        names = [event.type for event in events_]
        final = events_.get_final_response()
    assert "response.completed" == names[-1]
    assert ['{"city": "Paris"}', '{"city": "Lyon"}'] == [
        i.arguments for i in final.output if i.type == "function_call"
    ]


def test_replayed_output_items_are_valid_input() -> None:
    """An agent loop that sends a translated Response's output back as input gets chat turns."""
    response = from_chat_response(
        load("responses_chat_completion_tool.json"),
        model="qwen",
        response_id="resp_abc",
        created_at=7,
    )
    output = response["output"]
    assert isinstance(output, list)
    results = [
        {"type": "function_call_output", "call_id": item["call_id"], "output": "18 C"}
        for item in output
    ]
    body = {"input": [{"role": "user", "content": "Weather in Paris and Lyon?"}, *output, *results]}
    messages = to_chat_request(body, upstream_model="m")["messages"]
    expected = [
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "chatcmpl-tool-7c1e2f3a4b5c6d7e",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "chatcmpl-tool-8d2f3a4b5c6d7e8f",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "chatcmpl-tool-7c1e2f3a4b5c6d7e", "content": "18 C"},
        {"role": "tool", "tool_call_id": "chatcmpl-tool-8d2f3a4b5c6d7e8f", "content": "18 C"},
    ]
    assert expected == messages


def test_finish_reason_in_a_chunk_without_delta_counts() -> None:
    """A last chunk that carries only `finish_reason: length` still makes the stream incomplete."""
    translator = ResponsesStream(model="q", response_id="r", created_at=1)
    translator.feed({"choices": [{"index": 0, "delta": {"content": "It is"}}]})
    translator.feed({"choices": [{"index": 0, "finish_reason": "length"}]})
    out = events(translator.finish())
    assert ["incomplete", "max_output_tokens"] == [
        out[-1]["response"]["status"],
        out[-1]["response"]["incomplete_details"]["reason"],
    ]


def test_named_tool_choice_is_repeated_in_the_sdk_shape() -> None:
    """A function tool_choice is repeated as the Responses API writes it, which the SDK accepts."""
    request = {"input": "x", "tool_choice": {"type": "function", "name": "get_weather"}}
    actual = from_chat_response(
        load("responses_chat_completion_text.json"),
        model="q",
        response_id="r",
        created_at=1,
        request=request,
    )
    response = Response.model_validate(actual)
    assert isinstance(response.tool_choice, ToolChoiceFunction)
    assert "get_weather" == response.tool_choice.name
