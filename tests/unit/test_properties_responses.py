"""Properties of the Responses request translator: any JSON value `decode_object` can give is a
chat request the gateway can send, or an `InvalidRequest`, never another exception."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxy.adapters import ResponsesAdapter
from proxy.errors import InvalidRequest
from proxy.translate.responses import to_chat_request
from tests.unit.test_properties_json import FAST, JSON, OBJECT, TEXT, mutated, shaped

PART = st.one_of(
    shaped({"type": st.sampled_from(["input_text", "output_text"]), "text": TEXT}),
    shaped({"type": st.just("refusal"), "refusal": TEXT}),
    shaped(
        {"type": st.just("input_image")}, image_url=TEXT, detail=st.sampled_from(["auto", "low"])
    ),
    shaped({"type": st.sampled_from(["input_file", "input_audio", "video"])}),
)
MESSAGE = shaped(
    {
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]),
        "content": TEXT | st.lists(PART, max_size=3),
    },
    type=st.just("message"),
)
CALL = shaped({"type": st.just("function_call"), "name": TEXT, "arguments": TEXT, "call_id": TEXT})
OUTPUT = shaped(
    {
        "type": st.just("function_call_output"),
        "call_id": TEXT,
        "output": TEXT
        | st.lists(shaped({"type": st.just("input_text"), "text": TEXT}), max_size=2),
    }
)
OTHER_ITEM = shaped({"type": st.sampled_from(["reasoning", "item_reference", "web_search_call"])})
ITEM = st.one_of(MESSAGE, MESSAGE, CALL, OUTPUT, OTHER_ITEM)
TOOL = shaped(
    {"type": st.sampled_from(["function", "function", "web_search"]), "name": TEXT},
    description=TEXT,
    parameters=OBJECT,
    strict=st.booleans(),
)
FORMAT = shaped(
    {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
    name=TEXT,
    schema=OBJECT,
    description=TEXT,
    strict=st.booleans(),
)
REQUEST = mutated(
    shaped(
        {"model": TEXT, "input": TEXT | st.lists(ITEM, min_size=1, max_size=4)},
        instructions=TEXT,
        max_output_tokens=st.integers(-1, 10**6),
        temperature=st.floats(0, 2),
        top_p=st.floats(0, 1),
        tools=st.lists(TOOL, max_size=2),
        tool_choice=st.sampled_from(["none", "auto", "required", "sometimes"])
        | shaped({"type": st.just("function"), "name": TEXT}),
        parallel_tool_calls=st.booleans(),
        text=shaped({}, format=FORMAT),
        user=TEXT,
        stream=st.booleans(),
        store=st.booleans(),
        previous_response_id=st.none() | TEXT,
        background=st.booleans(),
    )
)


def translate(body: object) -> None:
    """A chat request that encodes as the gateway sends it, or a 400 that says what is wrong."""
    try:
        chat = to_chat_request(body, upstream_model="up")
    except InvalidRequest as err:
        assert err.message
        return
    assert "up" == chat["model"]
    orjson.dumps(chat)


@FAST
@given(JSON)
def test_any_json_value_gives_a_chat_request_or_invalid_request(body: object) -> None:
    """Any JSON value is a chat request or a 400."""
    translate(body)


@FAST
@given(REQUEST)
def test_responses_shaped_bodies_give_a_chat_request_or_invalid_request(
    body: dict[str, object],
) -> None:
    """Bodies with the real fields (input items, parts, tools, formats) and junk values: a chat
    request or a 400."""
    translate(body)


@FAST
@given(REQUEST, st.booleans())
def test_the_adapter_gives_a_chat_request_or_invalid_request(
    body: dict[str, object], vision: bool
) -> None:
    """The adapter's own image check in front of the translator raises nothing but a 400."""
    try:
        orjson.dumps(ResponsesAdapter(body, "m", vision).chat_request("up"))
    except InvalidRequest as err:
        assert err.message
