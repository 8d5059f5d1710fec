"""Properties of the answer translators: any chat completion, or any run of stream chunks, the
backend sends (as orjson decodes it) gives the client protocol's answer, or our own error."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import BackendUnreachable, ProxyError
from proxy.translate import anthropic, gemini, oicm, responses
from proxy.translate.chat_stream import ChatStreamParser
from tests.unit.test_properties_json import FAST, INTEGERS, JSON, OBJECT, TEXT, mutated, shaped

ARGUMENTS = TEXT | OBJECT.map(lambda o: orjson.dumps(o).decode())
FUNCTION = shaped({}, name=st.sampled_from(["f", "g"]), arguments=ARGUMENTS)
TOOL_CALL = shaped(
    {}, index=st.integers(-1, 2), id=TEXT, type=st.just("function"), function=FUNCTION
)
MESSAGE = shaped(
    {},
    role=st.just("assistant"),
    content=st.none() | TEXT,
    tool_calls=st.lists(TOOL_CALL, max_size=3),
    reasoning_content=TEXT,
)
FINISH = st.sampled_from(["stop", "length", "tool_calls", "function_call", "content_filter", "x"])
CHOICE = shaped(
    {"index": st.sampled_from([0, 0, 0, 1])},
    message=MESSAGE,
    delta=MESSAGE,
    finish_reason=st.none() | FINISH,
    stop_reason=st.none() | TEXT | INTEGERS,
    stop=TEXT,
)
COUNTS = st.sampled_from([0, 7, -1, 2**62, 2**63 - 1, 2**64 - 1, -(2**63)]) | INTEGERS
USAGE = shaped({}, prompt_tokens=COUNTS, completion_tokens=COUNTS)
COMPLETION = mutated(
    shaped(
        {"choices": st.lists(CHOICE, max_size=2)},
        id=TEXT,
        object=st.just("chat.completion"),
        usage=st.none() | USAGE,
    )
)
ANSWERS = COMPLETION | shaped({"error": JSON}) | JSON
CHUNKS = st.lists(COMPLETION | shaped({"error": JSON}) | OBJECT, max_size=6)
REQUEST = shaped({}, instructions=TEXT, tools=st.lists(OBJECT, max_size=1), tool_choice=JSON)


def sse_events(data: bytes) -> list[object]:
    """The events of SSE bytes; the test fails if they are not well-formed JSON-object events."""
    parser = ChatStreamParser()
    return parser.feed(data) + parser.flush()


@FAST
@given(ANSWERS, st.none() | st.lists(TEXT, max_size=2))
def test_anthropic_answers(chat: object, stop_sequences: list[str] | None) -> None:
    """Any backend answer is a Messages response that orjson writes, or a ProxyError."""
    try:
        answer = anthropic.from_chat_response(chat, model="m", stop_sequences=stop_sequences)
    except ProxyError:
        return
    orjson.dumps(answer)


@FAST
@given(ANSWERS)
def test_gemini_answers(chat: object) -> None:
    """Any backend answer is a GenerateContentResponse that orjson writes, or a ProxyError."""
    try:
        answer = gemini.from_chat_response(chat, model="m")
    except ProxyError:
        return
    orjson.dumps(answer)


@FAST
@given(ANSWERS, REQUEST | JSON)
def test_responses_answers(chat: object, request: object) -> None:
    """Any backend answer is a Response object that orjson writes, or a ProxyError."""
    try:
        answer = responses.from_chat_response(
            chat, model="m", response_id="resp_1", created_at=1, request=request
        )
    except ProxyError:
        return
    orjson.dumps(answer)


@FAST
@given(ANSWERS)
def test_completion_answers(completion: object) -> None:
    """Any completions answer is a chat completion that orjson writes, or a ProxyError."""
    try:
        answer = oicm.completion_to_chat(completion)
    except ProxyError:
        return
    orjson.dumps(answer)


Stream = Callable[[], anthropic.AnthropicStream | gemini.GeminiStream | responses.ResponsesStream]
STREAMS: dict[str, Stream] = {
    "anthropic": lambda: anthropic.AnthropicStream(model="m", message_id="msg_1"),
    "gemini": lambda: gemini.GeminiStream(model="m"),
    "responses": lambda: responses.ResponsesStream(
        model="m", response_id="resp_1", created_at=1, request={"instructions": "x"}
    ),
}


@FAST
@given(st.sampled_from(sorted(STREAMS)), CHUNKS)
def test_stream_translators(protocol: str, chunks: list[dict[str, object]]) -> None:
    """Any run of chunks gives well-formed SSE JSON events until the end or a ProxyError."""
    stream = STREAMS[protocol]()
    out = b""
    try:
        for chunk in chunks:
            out += stream.feed(chunk)
        out += stream.finish()
    except ProxyError as err:
        if isinstance(stream, responses.ResponsesStream):
            out += stream.failed(err.message)
    assert all(isinstance(event, dict) for event in sse_events(out))


@FAST
@given(CHUNKS)
def test_completion_chunks(chunks: list[dict[str, object]]) -> None:
    """Any completions chunk is a chat chunk that orjson writes, or a ProxyError."""
    for chunk in chunks:
        try:
            orjson.dumps(oicm.completion_chunk_to_chat_chunk(chunk))
        except ProxyError:
            continue


def test_token_counts_past_64_bits_in_total_are_a_backend_error() -> None:
    """Two counts whose total passes 64 bits were a 500 (orjson's TypeError); now a 502."""
    chat = {
        "choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2**64 - 1, "completion_tokens": 2**64 - 1},
    }
    for translate in (
        lambda: gemini.from_chat_response(chat, model="m"),
        lambda: responses.from_chat_response(chat, model="m", response_id="r", created_at=1),
        lambda: gemini.GeminiStream(model="m").feed(chat),
    ):
        with pytest.raises(BackendUnreachable) as caught:
            translate()
        assert caught.value.message.startswith("backend sent a malformed chat completion")
        assert "usage.prompt_tokens" in caught.value.message


def test_a_negative_token_count_is_a_backend_error() -> None:
    """A negative count is a malformed answer, not a usage to report."""
    chat = {"choices": [{"index": 0, "message": {"content": "x"}}], "usage": {"prompt_tokens": -5}}
    with pytest.raises(BackendUnreachable) as caught:
        anthropic.from_chat_response(chat, model="m")
    assert "usage.prompt_tokens" in caught.value.message
