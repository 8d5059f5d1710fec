"""OICM payloads: TGI-style `inputs` to chat, and `chat_template` requests to completions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from proxy.errors import BackendUnreachable, InvalidRequest
from proxy.translate.oicm import (
    chat_template_to_completion_request,
    completion_chunk_to_chat_chunk,
    completion_to_chat,
    tgi_to_chat_request,
)

PAYLOADS = Path(__file__).parent / "payloads"


def load(name: str) -> Any:
    return orjson.loads((PAYLOADS / name).read_bytes())


def test_tgi_payload_becomes_a_chat_request() -> None:
    """A recorded OICM/TGI payload becomes one user message with the chat parameters.

    `do_sample: false` is greedy decoding: temperature 0, and top_p is dropped; TGI-only
    parameters (top_k, details, return_full_text) have no chat equivalent and are left out.
    """
    model = "Qwen/Qwen2.5-7B-Instruct"
    expected = {
        "model": model,
        "messages": [{"role": "user", "content": "What is Deep Learning?"}],
        "max_tokens": 64,
        "temperature": 0,
        "seed": 42,
        "stop": ["\n\n"],
        "stream": True,
    }
    actual = tgi_to_chat_request(load("oicm_tgi_request.json"), upstream_model=model)
    assert expected == actual


def test_tgi_parameters_may_sit_at_the_top_level() -> None:
    """OICM's flat form (`max_new_tokens`, `do_sample` beside `inputs`) is read as TGI's nested."""
    body = {
        "inputs": "Hi",
        "max_new_tokens": 8,
        "do_sample": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": "###",
        "stream": False,
    }
    expected = {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["###"],
        "stream": False,
    }
    assert expected == tgi_to_chat_request(body, upstream_model="m")


def test_same_value_in_both_places_is_fine() -> None:
    """A parameter given at the top level and under `parameters` with one value is accepted."""
    body = {"inputs": "Hi", "max_new_tokens": 8, "parameters": {"max_new_tokens": 8}}
    assert 8 == tgi_to_chat_request(body, upstream_model="m")["max_tokens"]


BAD_TGI = [
    ([], "body: expected an object"),
    ({"inputs": ["a", "b"]}, "inputs: expected a string"),
    ({"inputs": "x", "parameters": [1]}, "parameters: expected an object"),
    (
        {"inputs": "x", "parameters": {"max_new_tokens": 0}},
        "parameters.max_new_tokens: expected a positive integer",
    ),
    ({"inputs": "x", "max_new_tokens": "64"}, "max_new_tokens: expected a positive integer"),
    (
        {"inputs": "x", "parameters": {"do_sample": "no"}},
        "parameters.do_sample: expected true or false",
    ),
    ({"inputs": "x", "temperature": True}, "temperature: expected a number"),
    (
        {"inputs": "x", "parameters": {"stop": [1]}},
        "parameters.stop: expected a string or a list of strings",
    ),
    ({"inputs": "x", "parameters": {"seed": 1.5}}, "parameters.seed: expected an integer"),
    ({"inputs": "x", "stream": "true"}, "stream: expected true or false"),
    (
        {"inputs": "x", "max_new_tokens": 5, "parameters": {"max_new_tokens": 6}},
        "parameters.max_new_tokens: differs from the top-level max_new_tokens",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_TGI)
def test_bad_tgi_payloads_name_the_problem(body: object, message: str) -> None:
    """Each wrong shape is a 400 whose message names the path of the problem."""
    with pytest.raises(InvalidRequest) as caught:
        tgi_to_chat_request(body, upstream_model="m")
    assert message == caught.value.message


def test_chat_template_request_becomes_a_completions_request() -> None:
    """The rendered template is the prompt; sampling and streaming fields carry over."""
    body = load("oicm_chat_template_request.json")
    actual = chat_template_to_completion_request(body, upstream_model="Qwen/Qwen2.5-7B")
    prompt = actual.pop("prompt")
    expected = {
        "model": "Qwen/Qwen2.5-7B",
        "max_tokens": 32,
        "temperature": 0.3,
        "stop": ["<|im_end|>"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert expected == actual
    assert isinstance(prompt, str)
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    assert prompt.endswith(
        "<|im_start|>user\nJust the city, please.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_refusal_is_a_400() -> None:
    """A template's own `raise_exception` reaches the client as a 400 with its message."""
    body = load("oicm_chat_template_request.json")
    body["messages"].append({"role": "system", "content": "late"})
    with pytest.raises(InvalidRequest) as caught:
        chat_template_to_completion_request(body, upstream_model="m")
    expected = "chat_template: only the first message may be a system message (line 9)"
    assert expected == caught.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": []}, "chat_template: expected a string"),
        ({"chat_template": "{{ messages }}"}, "messages: expected a list"),
        (
            {"chat_template": "{{ messages.__class__ }}", "messages": []},
            "chat_template: access to attribute '__class__' of 'list' object is unsafe. (line 1)",
        ),
        (
            {"chat_template": "x", "messages": [], "tools": [{"type": "function"}]},
            "tools: not supported together with chat_template on this backend: the gateway "
            "renders the template with `messages` only",
        ),
    ],
)
def test_bad_chat_template_requests_name_the_problem(body: dict[str, object], message: str) -> None:
    """A missing or hostile template, missing messages, or tools are 400s naming the problem."""
    with pytest.raises(InvalidRequest) as caught:
        chat_template_to_completion_request(body, upstream_model="m")
    assert message == caught.value.message


def test_completion_answer_becomes_a_chat_completion() -> None:
    """A backend's text_completion becomes a chat.completion the openai SDK accepts."""
    chat = ChatCompletion.model_validate(completion_to_chat(load("oicm_completion_response.json")))
    assert ("Paris.", "stop") == (chat.choices[0].message.content, chat.choices[0].finish_reason)
    assert chat.usage is not None and 63 == chat.usage.total_tokens


def test_completion_stream_becomes_chat_chunks() -> None:
    """Each streamed text_completion chunk becomes a chat.completion.chunk the SDK accepts."""
    lines = (PAYLOADS / "oicm_completion_stream.sse").read_text().splitlines()
    chunks = [orjson.loads(line[6:]) for line in lines if line.startswith("data: {")]
    converted = [
        ChatCompletionChunk.model_validate(completion_chunk_to_chat_chunk(c)) for c in chunks
    ]
    assert "Paris." == "".join(c.choices[0].delta.content or "" for c in converted if c.choices)
    assert ["stop"] == [
        c.choices[0].finish_reason for c in converted if c.choices and c.choices[0].finish_reason
    ]
    assert converted[-1].usage is not None and 2 == converted[-1].usage.completion_tokens


def test_error_chunk_passes_through() -> None:
    """An error event in a completions stream passes to the client as it came."""
    error = {"error": {"message": "boom", "type": "BadRequestError", "code": 400}}
    assert error == completion_chunk_to_chat_chunk(error)


@pytest.mark.parametrize("answer", [{}, {"choices": "x"}, {"choices": [1]}, [], None])
def test_malformed_completion_answers_are_backend_errors(answer: object) -> None:
    """A completions answer without a list of choices is a 502, never a KeyError."""
    with pytest.raises(BackendUnreachable):
        completion_to_chat(answer)
    with pytest.raises(BackendUnreachable):
        completion_chunk_to_chat_chunk(answer)
