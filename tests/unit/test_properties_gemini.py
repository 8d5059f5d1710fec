"""Properties of the Gemini request translator: any JSON value `decode_object` can give is a chat
request the gateway can send, or an `InvalidRequest`, never another exception."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.translate.gemini import to_chat_request
from proxy.translate.gemini_schema import json_schema
from tests.unit.test_properties_json import FAST, INTEGERS, JSON, OBJECT, TEXT, mutated, shaped

NAME = st.sampled_from(["f", "g"])
TEXT_PART = shaped({"text": TEXT}, thought=st.booleans())
PART = st.one_of(
    TEXT_PART,
    TEXT_PART,
    TEXT_PART,
    shaped(
        {
            "inlineData": shaped(
                {"mimeType": st.sampled_from(["image/png", "text/plain"])}, data=TEXT
            )
        }
    ),
    shaped({"inline_data": shaped({"mime_type": st.just("image/jpeg"), "data": TEXT})}),
    shaped({"functionCall": shaped({"name": NAME}, args=OBJECT, id=TEXT)}),
    shaped({"function_call": shaped({"name": NAME}, args=OBJECT)}),
    shaped({"functionResponse": shaped({"name": NAME}, response=OBJECT, id=TEXT)}),
    shaped({"fileData": OBJECT}) | shaped({"executableCode": OBJECT}),
)
CONTENT = shaped(
    {"parts": st.lists(PART, min_size=1, max_size=3)},
    role=st.sampled_from(["user", "model", "model", "function", "tool", "system"]),
)
TYPES = st.sampled_from(["OBJECT", "string", "ARRAY", "integer", "TYPE_UNSPECIFIED"])
SCHEMA = st.recursive(
    shaped({"type": TYPES}, nullable=st.booleans(), description=TEXT),
    lambda kids: st.one_of(
        shaped(
            {"type": st.just("OBJECT"), "properties": st.dictionaries(TEXT, kids, max_size=2)},
            propertyOrdering=st.lists(TEXT, max_size=2),
            required=st.lists(TEXT, max_size=2),
        ),
        shaped({"type": st.just("ARRAY"), "items": kids}, max_items=st.integers(0, 5)),
        shaped({"any_of": st.lists(kids, max_size=2)}),
        shaped({"anyOf": st.lists(kids, max_size=2)}, type=st.lists(TYPES, max_size=2)),
    ),
    max_leaves=6,
)
GENERATION = shaped(
    {},
    maxOutputTokens=st.integers(1, 4096) | st.floats(0, 1e300),
    max_output_tokens=st.integers(1, 4096),
    temperature=st.floats(0, 2),
    topP=st.floats(0, 1),
    topK=st.integers(1, 100) | INTEGERS,
    candidateCount=st.integers(0, 2),
    stopSequences=st.lists(TEXT, max_size=2),
    presencePenalty=st.floats(-2, 2),
    seed=INTEGERS,
    responseMimeType=st.sampled_from(["application/json", "text/plain", "text/x.enum"]),
    responseSchema=SCHEMA,
    responseJsonSchema=OBJECT,
)
DECLARATION = shaped(
    {"name": NAME}, description=TEXT, parameters=SCHEMA, parametersJsonSchema=OBJECT
)
TOOL = st.one_of(
    shaped({"functionDeclarations": st.lists(DECLARATION, max_size=2)}),
    shaped({"function_declarations": st.lists(DECLARATION, max_size=2)}),
    shaped({"googleSearch": OBJECT}),
)
TOOL_CONFIG = shaped(
    {},
    functionCallingConfig=shaped(
        {},
        mode=st.sampled_from(["AUTO", "ANY", "NONE", "VALIDATED", "any", "sometimes"]),
        allowedFunctionNames=st.lists(NAME, max_size=2),
    ),
)
REQUEST = mutated(
    shaped(
        {"contents": st.lists(CONTENT, min_size=1, max_size=3)},
        systemInstruction=shaped({"parts": st.lists(shaped({"text": TEXT}), max_size=2)}),
        generationConfig=GENERATION,
        generation_config=GENERATION,
        tools=st.lists(TOOL, max_size=2),
        toolConfig=TOOL_CONFIG,
        safetySettings=st.lists(OBJECT, max_size=1),
    )
)


def translate(body: object, stream: bool, vision: bool) -> None:
    """A chat request that encodes as the gateway sends it, or a 400 that says what is wrong."""
    try:
        chat = to_chat_request(body, upstream_model="up", stream=stream, vision=vision)
    except InvalidRequest as err:
        assert err.message
        return
    assert "up" == chat["model"]
    orjson.dumps(chat)


@FAST
@given(JSON, st.booleans(), st.booleans())
def test_any_json_value_gives_a_chat_request_or_invalid_request(
    body: object, stream: bool, vision: bool
) -> None:
    """Any JSON value is a chat request or a 400."""
    translate(body, stream, vision)


@FAST
@given(REQUEST, st.booleans(), st.booleans())
def test_generate_content_shaped_bodies_give_a_chat_request_or_invalid_request(
    body: dict[str, object], stream: bool, vision: bool
) -> None:
    """Bodies with the real camelCase and snake_case fields and junk values: a chat request or a 400."""
    translate(body, stream, vision)


@FAST
@given(mutated(SCHEMA) | JSON)
def test_any_schema_gives_a_json_schema_or_invalid_request(schema: object) -> None:
    """Any Gemini Schema value is a JSON Schema object or a 400 naming the schema's path."""
    try:
        out = json_schema(schema, "s")
    except InvalidRequest as err:
        assert err.message.startswith("s")
        return
    assert isinstance(out, dict)
    orjson.dumps(out)
