"""Gemini generateContent <-> chat completions: requests, responses, streams, bad input, SDK."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from google import genai
from google.genai import types as genai_types

from proxy.errors import BackendUnreachable, InvalidRequest
from proxy.translate.gemini import GeminiStream, from_chat_response, to_chat_request

PAYLOADS = Path(__file__).parent / "payloads"


def load(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text())


def events(stream: bytes) -> list[dict[str, Any]]:
    """The GenerateContentResponse objects of a Gemini SSE body (`data: JSON\\r\\n\\r\\n` each)."""
    frames = stream.split(b"\r\n\r\n")
    assert b"" == frames[-1]
    out = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data: ") and b"\n" not in frame
        out.append(json.loads(frame.removeprefix(b"data: ")))
    return out


def run_stream(chunks: list[dict[str, object]]) -> bytes:
    stream = GeminiStream(model="gemini-test")
    return b"".join(stream.feed(chunk) for chunk in chunks) + stream.finish()


def validate(response: dict[str, Any]) -> genai_types.GenerateContentResponse:
    return genai_types.GenerateContentResponse.model_validate(response)


def user(*parts: object, role: str = "user") -> dict[str, object]:
    return {"role": role, "parts": list(parts)}


def body(*contents: object, **fields: object) -> dict[str, object]:
    return {"contents": list(contents) or [user({"text": "Hi"})], **fields}


def chat(body: object, **kwargs: Any) -> dict[str, Any]:
    return to_chat_request(body, upstream_model="up", stream=False, **kwargs)


# -- requests ---------------------------------------------------------------------------------


def test_multi_turn_request_with_function_calls() -> None:
    """Contents, system instruction, generation config and tools map field by field."""
    expected = {
        "model": "up",
        "messages": [
            {"role": "system", "content": "You are a weather assistant."},
            {"role": "user", "content": "What is the weather in Paris?"},
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
            {"role": "tool", "tool_call_id": "call_1_0", "content": '{"output":"18C, light rain"}'},
            {"role": "assistant", "content": "It is 18C with light rain."},
            {"role": "user", "content": "Umbrella?"},
        ],
        "stop": ["END"],
        "max_tokens": 64,
        "temperature": 0.1,
        "top_p": 0.95,
        "top_k": 40,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city.",
                    "parameters": {
                        "properties": {
                            "city": {"type": "string"},
                            "unit": {
                                "enum": ["celsius", "fahrenheit"],
                                "format": "enum",
                                "type": ["string", "null"],
                            },
                        },
                        "required": ["city"],
                        "type": "object",
                    },
                },
            }
        ],
        "tool_choice": "auto",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    actual = to_chat_request(load("gemini_request_tools.json"), upstream_model="up", stream=True)
    assert expected == actual


def test_request_as_google_genai_sends_it() -> None:
    """A body captured from google-genai 3.4 (mixed camel/snake keys, image, ANY mode) maps."""
    expected = {
        "model": "up",
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw=="}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1_0",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1_0", "content": '{"result":2}'},
        ],
        "stop": ["END"],
        "max_tokens": 5,
        "temperature": 0.1,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 3,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "response",
                "schema": {"properties": {"x": {"type": "string"}}, "type": "object"},
            },
        },
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "description": "d",
                    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    assert expected == chat(load("gemini_request_sdk_captured.json"), vision=True)


def test_snake_case_request() -> None:
    """snake_case keys (system_instruction, generation_config, ...) read like camelCase ones."""
    expected = {
        "model": "up",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "List three colours as JSON."},
        ],
        "stop": ["\n\n"],
        "max_tokens": 32,
        "top_p": 0.5,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "response",
                "schema": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            },
        },
    }
    assert expected == chat(load("gemini_request_snake_case.json"))


def test_json_mime_type_without_schema() -> None:
    """responseMimeType application/json alone asks for a json_object response format."""
    config = {"responseMimeType": "application/json"}
    assert {"type": "json_object"} == chat(body(generationConfig=config))["response_format"]


@pytest.mark.parametrize(
    ("calling", "expected"),
    [
        ({"mode": "AUTO"}, "auto"),
        ({"mode": "NONE"}, "none"),
        ({"mode": "ANY"}, "required"),
        ({"mode": "any", "allowedFunctionNames": ["f", "g"]}, "required"),
        (
            {"mode": "ANY", "allowed_function_names": ["g"]},
            {"type": "function", "function": {"name": "g"}},
        ),
        ({}, "auto"),
    ],
)
def test_function_calling_modes(calling: dict[str, object], expected: object) -> None:
    """Each functionCallingConfig mode maps to its chat tool_choice."""
    tools = [{"functionDeclarations": [{"name": "f"}, {"name": "g"}]}]
    request = body(tools=tools, toolConfig={"functionCallingConfig": calling})
    assert expected == chat(request)["tool_choice"]


def test_declaration_without_parameters_and_no_tools_at_all() -> None:
    """A declaration with no parameters gets an empty object schema; no tools, no tool keys."""
    spec = chat(body(tools=[{"functionDeclarations": [{"name": "now"}]}]))["tools"]
    empty = {"type": "object", "properties": {}}
    assert [{"type": "function", "function": {"name": "now", "parameters": empty}}] == spec
    assert {"model", "messages"} == set(chat(body(tools=[{"functionDeclarations": []}])))


def test_schema_conversion() -> None:
    """Gemini schema quirks become JSON Schema: case, nullable, anyOf, snake keys, extra keys."""
    schema = {
        "type": "OBJECT",
        "properties": {
            "any_of_me": {"any_of": [{"type": "INTEGER"}, {"type": "STRING", "nullable": True}]},
            "tags": {"type": "ARRAY", "items": {"type": "TYPE_UNSPECIFIED"}, "min_items": 1},
        },
        "propertyOrdering": ["tags", "any_of_me"],
    }
    expected = {
        "type": "object",
        "properties": {
            "any_of_me": {"anyOf": [{"type": "integer"}, {"type": ["string", "null"]}]},
            "tags": {"type": "array", "items": {}, "minItems": 1},
        },
    }
    tools = [{"functionDeclarations": [{"name": "f", "parameters": schema}]}]
    assert expected == chat(body(tools=tools))["tools"][0]["function"]["parameters"]


def test_function_responses_find_their_calls() -> None:
    """Responses match calls by id when given, else by name; replies come before the user's text."""
    request = body(
        user({"text": "go"}),
        user(
            {"functionCall": {"name": "a", "args": {}}},
            {"functionCall": {"name": "b", "args": {}, "id": "given"}},
            role="model",
        ),
        user(
            {"functionResponse": {"name": "b", "response": {"ok": 1}, "id": "given"}},
            {"text": "and then?"},
            {"functionResponse": {"name": "a", "response": {"ok": 2}}},
            {"functionResponse": {"name": "c", "response": {}}},
        ),
    )
    messages = chat(request)["messages"]
    assert [
        {"role": "tool", "tool_call_id": "given", "content": '{"ok":1}'},
        {"role": "tool", "tool_call_id": "call_1_0", "content": '{"ok":2}'},
        {"role": "tool", "tool_call_id": "call_c", "content": "{}"},
        {"role": "user", "content": "and then?"},
    ] == messages[2:]


def test_thoughts_are_left_out_and_default_role_is_user() -> None:
    """Parts marked thought are dropped; a content without a role is the user's."""
    request = body(
        {"parts": [{"text": "q"}]},
        user(
            {"text": "thinking...", "thought": True, "thoughtSignature": "c2ln"},
            {"text": "a"},
            role="model",
        ),
    )
    expected = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert expected == chat(request)["messages"]


_IMAGE = {"inlineData": {"mimeType": "image/png", "data": "AA=="}}


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ([], "request body: expected an object, got array"),
        ({}, "contents: field required"),
        ({"contents": []}, "contents: at least one content is required"),
        ({"contents": "Hi"}, "contents: expected an array, got string"),
        ({"contents": ["Hi"]}, "contents[0]: expected an object, got string"),
        ({"contents": [{"role": "user"}]}, "contents[0].parts: field required"),
        ({"contents": [user()]}, "contents[0].parts: at least one part is required"),
        (
            body(user({"text": "a"}), user({"foo": 1})),
            "contents[1].parts[0]: unknown part type (keys: foo)",
        ),
        (body(user({})), "contents[0].parts[0]: unknown part type (keys: none)"),
        (body(user({"text": 5})), "contents[0].parts[0].text: expected a string, got number"),
        (
            body(user({"text": "a"}, role="system")),
            "contents[0].role: unknown role 'system'; use user or model",
        ),
        (
            body(user({"text": "look"}, _IMAGE)),
            "contents[0].parts[1].inlineData: image input needs a model with vision; this has none",
        ),
        (
            body(user({"inline_data": {"mime_type": "audio/wav", "data": "AA=="}})),
            "contents[0].parts[0].inline_data.mime_type: 'audio/wav' is not supported; only images",
        ),
        (
            body(user({"fileData": {"fileUri": "gs://b/x.png", "mimeType": "image/png"}})),
            "contents[0].parts[0]: fileData parts are not supported by this gateway",
        ),
        (
            body(user({"functionCall": {"name": "f", "args": {}}})),
            "contents[0].parts[0]: functionCall parts belong in model turns",
        ),
        (
            body(user({"functionResponse": {"name": "f", "response": {}}}, role="model")),
            "contents[0].parts[0]: functionResponse parts belong in user turns",
        ),
        (
            body(user({"functionCall": {"args": {}}}, role="model")),
            "contents[0].parts[0].functionCall.name: field required",
        ),
        (
            body(user({"functionCall": {"name": "f", "args": [1]}}, role="model")),
            "contents[0].parts[0].functionCall.args: expected an object, got array",
        ),
        (
            body(generationConfig={"candidateCount": 2}),
            "generationConfig.candidateCount: only 1 candidate is supported",
        ),
        (
            body(generation_config={"candidate_count": 3}),
            "generation_config.candidate_count: only 1 candidate is supported",
        ),
        (
            body(generationConfig={"maxOutputTokens": "5"}),
            "generationConfig.maxOutputTokens: expected a number, got string",
        ),
        (
            body(generationConfig={"topK": 1.5}),
            "generationConfig.topK: expected a whole number, got 1.5",
        ),
        (
            body(generationConfig={"stopSequences": [1]}),
            "generationConfig.stopSequences[0]: expected a string",
        ),
        (body(generationConfig=[]), "generationConfig: expected an object, got array"),
        (
            body(generationConfig={"responseMimeType": "text/x.enum"}),
            "generationConfig.responseMimeType: "
            "'text/x.enum' is not supported; use application/json",
        ),
        (
            body(tools=[{"googleSearch": {}}]),
            "tools[0].googleSearch: only functionDeclarations are supported",
        ),
        (
            body(tools=[{"functionDeclarations": [{}]}]),
            "tools[0].functionDeclarations[0].name: field required",
        ),
        (
            body(tools=[{"functionDeclarations": [{"name": "f", "parameters": {"type": 7}}]}]),
            "tools[0].functionDeclarations[0].parameters.type: "
            "expected a type name such as 'OBJECT' or 'string'",
        ),
        (
            body(
                tools=[{"functionDeclarations": [{"name": "f"}]}],
                toolConfig={"functionCallingConfig": {"mode": "SOMETIMES"}},
            ),
            "toolConfig.functionCallingConfig.mode: unknown mode 'SOMETIMES'",
        ),
        (
            body(systemInstruction={"parts": [_IMAGE]}),
            "systemInstruction.parts[0]: a system instruction holds text parts only",
        ),
        (
            body(cachedContent="cachedContents/abc"),
            "cachedContent: cached contents are not supported by this gateway",
        ),
    ],
)
def test_bad_input_is_invalid_request_naming_the_path(request_body: object, message: str) -> None:
    """Each malformed request raises InvalidRequest whose message names the bad value's path."""
    with pytest.raises(InvalidRequest) as caught:
        chat(request_body)
    assert message == caught.value.message


# -- responses --------------------------------------------------------------------------------


def test_text_response() -> None:
    """A recorded vLLM chat.completion becomes a GenerateContentResponse the SDK validates."""
    expected = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "Yes, take an umbrella."}]},
                "index": 0,
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {"promptTokenCount": 57, "candidatesTokenCount": 7, "totalTokenCount": 64},
        "modelVersion": "gemini-test",
        "responseId": "chatcmpl-7f3a9c",
    }
    actual = from_chat_response(load("chat_completion_text.json"), model="gemini-test")
    assert expected == actual
    response = validate(actual)
    assert ("Yes, take an umbrella.", genai_types.FinishReason.STOP, 64) == (
        response.text,
        response.candidates[0].finish_reason if response.candidates else None,
        response.usage_metadata.total_token_count if response.usage_metadata else None,
    )


def test_tool_call_response() -> None:
    """Tool calls become functionCall parts with args parsed; the SDK lists them."""
    actual: dict[str, Any] = from_chat_response(
        load("chat_completion_tool_calls.json"), model="gemini-test"
    )
    expected_parts = [
        {
            "functionCall": {
                "name": "get_weather",
                "args": {"city": "Paris"},
                "id": "chatcmpl-tool-1a",
            }
        },
        {
            "functionCall": {
                "name": "get_weather",
                "args": {"city": "Lyon", "unit": "celsius"},
                "id": "chatcmpl-tool-2b",
            }
        },
    ]
    assert expected_parts == actual["candidates"][0]["content"]["parts"]
    calls = validate(actual).function_calls or []
    assert [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Lyon", "unit": "celsius"}),
    ] == [(c.name, c.args) for c in calls]


def test_empty_answer_bad_arguments_and_no_usage() -> None:
    """No text gives one empty text part; bad arguments give args {}; no usage, no usageMetadata."""
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]
    empty = {"choices": [{"index": 0, "message": {"content": ""}, "finish_reason": "stop"}]}
    tool = {
        "choices": [{"index": 0, "message": {"tool_calls": calls}, "finish_reason": "tool_calls"}]
    }
    empty_answer: dict[str, Any] = from_chat_response(empty, model="m")
    tool_answer: dict[str, Any] = from_chat_response(tool, model="m")
    assert [{"text": ""}] == empty_answer["candidates"][0]["content"]["parts"]
    expected_parts = [{"functionCall": {"name": "f", "args": {}, "id": "c"}}]
    assert expected_parts == tool_answer["candidates"][0]["content"]["parts"]
    assert "usageMetadata" not in empty_answer


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("stop", "STOP"),
        ("length", "MAX_TOKENS"),
        ("content_filter", "SAFETY"),
        ("tool_calls", "STOP"),
        (None, "STOP"),
        ("abort", "OTHER"),
    ],
)
def test_finish_reasons(finish: str | None, expected: str) -> None:
    """Each chat finish_reason maps to a Gemini finishReason the SDK knows."""
    answer = {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": finish}]}
    actual: dict[str, Any] = from_chat_response(answer, model="m")
    assert expected == actual["candidates"][0]["finishReason"]
    validate(actual)


def test_malformed_backend_answer_is_backend_unreachable() -> None:
    """A chat answer with no choices or an error body is a 502, never a KeyError."""
    answers: list[object] = [
        {"choices": []},
        {"error": {"message": "boom"}},
        {"choices": [{"message": 3}]},
    ]
    for answer in answers:
        with pytest.raises(BackendUnreachable):
            from_chat_response(answer, model="m")


# -- streams ----------------------------------------------------------------------------------


def test_text_stream_events() -> None:
    """A recorded text stream gives one event per text delta, the last with finish and usage."""

    def text(value: str) -> dict[str, object]:
        return {
            "candidates": [{"content": {"role": "model", "parts": [{"text": value}]}, "index": 0}],
            "modelVersion": "gemini-test",
            "responseId": "chatcmpl-5d1",
        }

    last = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": ""}]},
                "index": 0,
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {"promptTokenCount": 57, "candidatesTokenCount": 4, "totalTokenCount": 61},
        "modelVersion": "gemini-test",
        "responseId": "chatcmpl-5d1",
    }
    expected = [text("Yes,"), text(" take an"), text(" umbrella."), last]
    actual = events(run_stream(load("chat_stream_text.json")))
    assert expected == actual
    for event in actual:
        validate(event)


def test_last_event_goes_out_with_the_usage_chunk() -> None:
    """With finish reason and usage both in, the last event is sent; finish() owes nothing."""
    stream = GeminiStream(model="m")
    chunks = load("chat_stream_text.json")
    for c in chunks[:-1]:
        assert all("finishReason" not in e["candidates"][0] for e in events(stream.feed(c)))
    assert "STOP" == events(stream.feed(chunks[-1]))[0]["candidates"][0]["finishReason"]
    assert b"" == stream.finish()


def test_tool_calls_are_sent_whole_on_the_last_event() -> None:
    """Arguments split over chunks are joined; each call goes out whole with the finish reason."""
    actual = events(run_stream(load("chat_stream_tool_call.json")))
    assert 2 == len(actual)
    assert [{"text": "Checking."}] == actual[0]["candidates"][0]["content"]["parts"]
    expected_last = {
        "content": {
            "role": "model",
            "parts": [
                {
                    "functionCall": {
                        "name": "get_weather",
                        "args": {"city": "Paris"},
                        "id": "chatcmpl-tool-77",
                    }
                },
                {
                    "functionCall": {
                        "name": "get_time",
                        "args": {"tz": "Europe/Paris"},
                        "id": "chatcmpl-tool-78",
                    }
                },
            ],
        },
        "index": 0,
        "finishReason": "STOP",
    }
    assert expected_last == actual[1]["candidates"][0]
    assert {"promptTokenCount": 140, "candidatesTokenCount": 31, "totalTokenCount": 171} == actual[
        1
    ]["usageMetadata"]


def test_stream_without_usage_chunk_ends_at_finish() -> None:
    """With no usage chunk, finish() sends the last event with an estimated candidate count."""
    stream = GeminiStream(model="m", response_id="r1")
    for c in load("chat_stream_text.json")[:-1]:
        stream.feed(c)
    (last,) = events(stream.finish())
    assert ("STOP", {"candidatesTokenCount": 3, "totalTokenCount": 3}, "r1") == (
        last["candidates"][0]["finishReason"],
        last["usageMetadata"],
        last["responseId"],
    )


def test_finish_without_any_chunk() -> None:
    """A stream that ended before any chunk still gives one well-formed last event."""
    (last,) = events(GeminiStream(model="m").finish())
    assert [genai_types.FinishReason.STOP] == [
        c.finish_reason for c in validate(last).candidates or []
    ]


def test_length_finish_in_stream() -> None:
    """A stream cut by max tokens ends with MAX_TOKENS."""
    chunks: list[dict[str, object]] = [
        {"choices": [{"index": 0, "delta": {"content": "a"}}]},
        {
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        },
    ]
    assert "MAX_TOKENS" == events(run_stream(chunks))[-1]["candidates"][0]["finishReason"]


# -- the real google-genai SDK against the translation, through an in-memory transport --------

Handler = Callable[[httpx2.Request], httpx2.Response]


def gateway(
    answer: dict[str, object] | None, chunks: list[dict[str, object]], seen: list[dict[str, Any]]
) -> Handler:
    """What the gateway's translated Gemini routes do, with a canned backend answer."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        stream = path.endswith(":streamGenerateContent")
        assert path in (
            "/gemini/v1/models/gemini-test:generateContent",
            "/gemini/v1/models/gemini-test:streamGenerateContent",
        )
        chat_request = to_chat_request(
            json.loads(request.content), upstream_model="up", stream=stream
        )
        seen.append(chat_request)
        if stream:
            assert "sse" == request.url.params.get("alt")
            translator = GeminiStream(model="gemini-test")
            out = b"".join(translator.feed(c) for c in chunks) + translator.finish()
            return httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=from_chat_response(answer, model="gemini-test"))

    return handle


def client(handler: Handler) -> genai.Client:
    options = genai_types.HttpOptions(
        base_url="http://gw/gemini",
        httpx_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    return genai.Client(api_key="AIza-test", http_options=options)


def test_sdk_generate_content() -> None:
    """generate_content reads the translated answer: text, finish reason, usage."""
    seen: list[dict[str, Any]] = []
    with client(gateway(load("chat_completion_text.json"), [], seen)) as sdk:
        response = sdk.models.generate_content(
            model="gemini-test",
            contents="Umbrella?",
            config=genai_types.GenerateContentConfig(
                system_instruction="be brief",
                max_output_tokens=16,
                temperature=0.1,
                stop_sequences=["END"],
            ),
        )
    assert ("Yes, take an umbrella.", genai_types.FinishReason.STOP, 57, 7) == (
        response.text,
        response.candidates[0].finish_reason if response.candidates else None,
        response.usage_metadata.prompt_token_count if response.usage_metadata else None,
        response.usage_metadata.candidates_token_count if response.usage_metadata else None,
    )
    expected_chat = {
        "model": "up",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Umbrella?"},
        ],
        "stop": ["END"],
        "max_tokens": 16,
        "temperature": 0.1,
    }
    assert [expected_chat] == seen


def test_sdk_generate_content_with_function_calls() -> None:
    """The SDK lists the translated function calls with their args."""

    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return "sunny"

    seen: list[dict[str, Any]] = []
    config = genai_types.GenerateContentConfig(
        tools=[get_weather],
        automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True),
    )
    with client(gateway(load("chat_completion_tool_calls.json"), [], seen)) as sdk:
        response = sdk.models.generate_content(
            model="gemini-test", contents="Paris and Lyon?", config=config
        )
    calls = [(c.name, c.args, c.id) for c in response.function_calls or []]
    assert [
        ("get_weather", {"city": "Paris"}, "chatcmpl-tool-1a"),
        ("get_weather", {"city": "Lyon", "unit": "celsius"}, "chatcmpl-tool-2b"),
    ] == calls
    expected_tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    assert [expected_tool] == seen[0]["tools"]


def test_sdk_generate_content_stream() -> None:
    """generate_content_stream yields the text deltas; the last has finish reason and usage."""
    seen: list[dict[str, Any]] = []
    with client(gateway(None, load("chat_stream_text.json"), seen)) as sdk:
        chunks = list(sdk.models.generate_content_stream(model="gemini-test", contents="Umbrella?"))
    assert ["Yes,", " take an", " umbrella.", ""] == [c.text for c in chunks]
    last = chunks[-1]
    assert (genai_types.FinishReason.STOP, 61) == (
        last.candidates[0].finish_reason if last.candidates else None,
        last.usage_metadata.total_token_count if last.usage_metadata else None,
    )
    assert {"stream": True, "stream_options": {"include_usage": True}} == {
        k: seen[0][k] for k in ("stream", "stream_options")
    }


def test_sdk_generate_content_stream_with_function_calls() -> None:
    """A streamed tool-calling answer reaches the SDK as complete function calls."""
    with client(gateway(None, load("chat_stream_tool_call.json"), [])) as sdk:
        chunks = list(sdk.models.generate_content_stream(model="gemini-test", contents="Paris?"))
    assert "Checking." == chunks[0].text
    calls = [(c.name, c.args) for c in chunks[-1].function_calls or []]
    assert [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})] == calls
