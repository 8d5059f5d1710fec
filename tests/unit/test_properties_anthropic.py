"""Properties of the Anthropic request translator: any JSON value `decode_object` can give (64-bit
integers, finite floats) is a chat request the gateway can send, or an `InvalidRequest`."""

from __future__ import annotations

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.translate.anthropic import to_chat_request
from proxy.view import decode_object
from tests.unit.test_properties_json import FAST, JSON, OBJECT, TEXT, mutated, shaped

TEXT_BLOCK = shaped({"type": st.just("text"), "text": TEXT})
SOURCE = shaped(
    {"type": st.sampled_from(["base64", "url", "file", "svg"])},
    media_type=st.just("image/png"),
    data=TEXT,
    url=TEXT,
    file_id=TEXT,
)
IMAGE_BLOCK = shaped({"type": st.just("image"), "source": SOURCE})
TOOL_USE = shaped({"type": st.just("tool_use"), "id": TEXT, "name": TEXT, "input": OBJECT})
TOOL_RESULT = shaped(
    {"type": st.just("tool_result"), "tool_use_id": TEXT},
    content=TEXT | st.lists(TEXT_BLOCK | IMAGE_BLOCK, max_size=2),
    is_error=st.booleans(),
)
THINKING = shaped(
    {"type": st.sampled_from(["thinking", "redacted_thinking", "document"])},
    thinking=TEXT,
    data=TEXT,
)
BLOCK = st.one_of(TEXT_BLOCK, IMAGE_BLOCK, TOOL_USE, TOOL_RESULT, THINKING)
MESSAGE = shaped(
    {
        "role": st.sampled_from(["user", "assistant", "user", "assistant", "system"]),
        "content": TEXT | st.lists(BLOCK, max_size=3),
    }
)
TOOL = shaped(
    {"name": st.sampled_from(["f", "g"])},
    description=TEXT,
    input_schema=OBJECT,
    type=st.sampled_from(["custom", "web_search_20250305"]),
)
TOOL_CHOICE = shaped(
    {"type": st.sampled_from(["auto", "any", "tool", "none", "sometimes"])},
    name=st.sampled_from(["f", "g", "h"]),
    disable_parallel_tool_use=st.booleans(),
)
VALID_REQUEST = shaped(
    {
        "max_tokens": st.integers(1, 10**6) | st.integers(1, 2**64 - 1),
        "model": TEXT,
        "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    },
    system=TEXT | st.lists(TEXT_BLOCK, max_size=2),
    stop_sequences=st.lists(TEXT, max_size=2),
    temperature=st.floats(0, 2),
    top_p=st.floats(0, 1),
    top_k=st.integers(0, 100),
    metadata=shaped({}, user_id=TEXT),
    tools=st.lists(TOOL, max_size=2),
    tool_choice=TOOL_CHOICE,
    output_config=shaped({}, format=shaped({"type": st.just("json_schema"), "schema": OBJECT})),
    stream=st.booleans(),
)
REQUEST = mutated(VALID_REQUEST)


def translate(body: object, vision: bool) -> dict[str, object] | None:
    """The chat request and proof that it encodes as the gateway sends it; None for a 400."""
    try:
        chat = to_chat_request(body, upstream_model="up", vision=vision)
    except InvalidRequest as err:
        assert err.message  # says what is wrong
        return None
    orjson.dumps(chat)  # the translated route sends it with orjson
    return chat


@FAST
@given(JSON, st.booleans())
def test_any_json_value_gives_a_chat_request_or_invalid_request(body: object, vision: bool) -> None:
    """Any JSON value is a chat request or a 400."""
    translate(body, vision)


@FAST
@given(REQUEST, st.booleans())
def test_messages_shaped_bodies_give_a_chat_request_or_invalid_request(
    body: dict[str, object], vision: bool
) -> None:
    """Bodies with the real fields and junk values are a chat request or a 400."""
    chat = translate(body, vision)
    if chat is not None:
        assert "up" == chat["model"]
        assert isinstance(chat["messages"], list)


WIRE_VALUES = st.sampled_from([2**64, -(2**63) - 1, 10**30]) | JSON
WIRE_REQUEST = shaped(
    {"max_tokens": WIRE_VALUES, "model": TEXT, "messages": st.lists(MESSAGE, max_size=2)},
    top_k=WIRE_VALUES,
    tools=st.lists(
        shaped({"name": TEXT}, input_schema=st.dictionaries(TEXT, WIRE_VALUES)), max_size=1
    ),
)


@FAST
@given((REQUEST | WIRE_REQUEST).map(msgspec.json.encode))
def test_a_body_off_the_wire_gives_a_chat_request_or_invalid_request(raw: bytes) -> None:
    """A body as the route decodes it (integers of any size) is a sendable chat request or a 400."""
    try:
        body = decode_object(raw)
    except InvalidRequest:
        return
    translate(body, True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"max_tokens": 18446744073709551616, "messages": []}',
            "max_tokens: integer does not fit in 64 bits",
        ),
        (
            b'{"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", '
            b'"name": "f", "input": {"n": -9223372036854775809}}]}]}',
            "messages[0].content[0].input.n: integer does not fit in 64 bits",
        ),
    ],
)
def test_integers_past_64_bits_are_a_400(body: bytes, message: str) -> None:
    """An integer the chat request cannot carry was a 500 (orjson's TypeError); now a 400 with its path."""
    with pytest.raises(InvalidRequest) as caught:
        decode_object(body)
    assert message == caught.value.message
