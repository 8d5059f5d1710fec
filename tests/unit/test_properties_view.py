"""Properties of the request view: any body gives a view or an `InvalidRequest`, and the model
rewrites change the `model` value and nothing else."""

from __future__ import annotations

import json
from collections.abc import Callable

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.view import (
    Invocation,
    RequestView,
    decode_object,
    model_span,
    peek,
    peek_invocation,
    replace_model,
    set_model,
)
from tests.unit.test_properties_json import FAST

# Strings that stress the byte scanner: quotes, backslashes, braces, the word itself.
TRICKY = st.text(alphabet=st.sampled_from('model"\\{}[]:, \n\u00e9\u6a21\U0001f600'), max_size=12)
TEXT = st.text(max_size=12) | TRICKY
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
KEYS = st.sampled_from(["model", "stream", "chat_template", "messages", "prompt", "input"]) | TEXT
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=4),
    max_leaves=20,
)
OBJECTS = st.dictionaries(KEYS, JSON, max_size=6)


def encodings(value: object) -> st.SearchStrategy[bytes]:
    """The same JSON value as different clients write it: compact, spaced, indented, escaped."""
    return st.sampled_from(
        [
            msgspec.json.encode(value),
            json.dumps(value, indent=2).encode(),
            json.dumps(value).encode(),
            json.dumps(value, ensure_ascii=False, indent="\t").encode(),
            b"\r\n " + json.dumps(value, separators=(" ,", " : ")).encode() + b"\n",
        ]
    )


def bodies() -> st.SearchStrategy[bytes]:
    """Bytes of every kind: random, JSON of any value, objects with the real keys, and cut-offs."""
    encoded = JSON.flatmap(encodings) | OBJECTS.flatmap(encodings)
    cut = encoded.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))
    return st.binary(max_size=64) | encoded | cut | DEEP


# Nesting near each limit: orjson's 254 levels, and msgspec's own of about a thousand.
DEEP = st.tuples(
    st.sampled_from([b'{"model": "m", "x": ', b'{"model": "m", "stream": ', b'{"messages": ', b""]),
    st.sampled_from([230, 239, 240, 241, 254, 255, 1000, 5000]),
    st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]),
).map(lambda t: t[0] + t[2][0] * t[1] + b"1" + t[2][1] * t[1] + (b"}" if t[0] else b""))


@FAST
@given(bodies())
def test_peek_gives_a_view_or_invalid_request(body: bytes) -> None:
    """Any bytes give a RequestView with a non-empty string model, or InvalidRequest."""
    try:
        view = peek(body)
    except InvalidRequest:
        return
    assert RequestView is type(view)
    assert isinstance(view.model, str) and view.model


@FAST
@given(bodies())
def test_peek_invocation_gives_a_kind_or_invalid_request(body: bytes) -> None:
    """Any bytes give an Invocation of a known kind, or InvalidRequest."""
    try:
        kind = peek_invocation(body)
    except InvalidRequest:
        return
    assert Invocation is type(kind)
    assert kind.kind in ("chat", "completions", "embeddings", "tgi")


@FAST
@given(bodies())
def test_decode_object_gives_a_dict_or_invalid_request(body: bytes) -> None:
    """Any bytes give the decoded object, or InvalidRequest."""
    try:
        value = decode_object(body)
    except InvalidRequest:
        return
    assert isinstance(value, dict)


@FAST
@given(bodies() | OBJECTS.map(lambda d: {**d, "n": 2**64}).flatmap(encodings))
def test_decode_object_gives_what_orjson_can_send_on(body: bytes) -> None:
    """A decoded object encodes with orjson even nested 14 levels deeper, as translators nest it."""
    try:
        value: object = decode_object(body)
    except InvalidRequest:
        return
    for _ in range(14):
        value = [value]
    orjson.dumps(value)


@pytest.mark.parametrize("decode", [peek, peek_invocation, decode_object])
@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"model": "m", "stream": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_a_body_nested_past_msgspecs_limit_is_a_400(
    decode: Callable[[bytes], object], body: bytes
) -> None:
    """Five thousand levels of nesting are a 400 saying so (msgspec's RecursionError was a 500)."""
    with pytest.raises(InvalidRequest) as caught:
        decode(body)
    assert "request body nests too deeply" == caught.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": [1, {"b": 18446744073709551616}]}', "a[1].b: integer does not fit in 64 bits"),
        (b'{"n": -9223372036854775809}', "n: integer does not fit in 64 bits"),
        (b'{"a": ' + b"[" * 240 + b"]" * 240 + b"}", "request body nests deeper than 240 levels"),
    ],
)
def test_decode_object_refuses_what_orjson_cannot_send_on(body: bytes, message: str) -> None:
    """A big integer or deep nesting in a translated body is a 400 (orjson's TypeError was a 500)."""
    with pytest.raises(InvalidRequest) as caught:
        decode_object(body)
    assert message == caught.value.message


def test_decode_object_takes_the_64_bit_extremes() -> None:
    """The smallest signed and largest unsigned 64-bit integers are carried as sent."""
    body = b'{"a": -9223372036854775808, "b": 18446744073709551615}'
    assert {"a": -(2**63), "b": 2**64 - 1} == decode_object(body)


@FAST
@given(bodies())
def test_model_span_gives_a_span_none_or_invalid_request(body: bytes) -> None:
    """Any bytes give a span inside the body, None, or InvalidRequest."""
    try:
        span = model_span(body)
    except InvalidRequest:
        return
    if span is not None:
        start, end = span
        assert 0 <= start < end <= len(body)
        assert b'"' == body[start : start + 1] == body[end - 1 : end]


@FAST
@given(OBJECTS.flatmap(encodings), st.booleans())
def test_model_span_finds_exactly_the_top_level_string_model(body: bytes, escape: bool) -> None:
    """The span exists exactly when the top-level `model` is a string, and holds that string."""
    if escape:  # a client may escape any character of the key: "mod\u0065l"
        escaped = body.replace(b'"model"', b'"mod\\u0065l"')
        if msgspec.json.decode(escaped) == msgspec.json.decode(body):
            body = escaped
    original = msgspec.json.decode(body)
    span = model_span(body)
    if isinstance(original.get("model"), str):
        assert span is not None
        assert original["model"] == msgspec.json.decode(body[span[0] : span[1]])
    else:
        assert span is None


@FAST
@given(OBJECTS, TEXT | st.text(), st.data())
def test_replace_model_changes_only_the_model_value(
    fields: dict[str, object], model: str, data: st.DataObject
) -> None:
    """replace_model rewrites the top-level model value; every other key and byte is as sent."""
    original = {**fields, "model": data.draw(TEXT.filter(bool))}
    body = data.draw(encodings(original))
    start, end = model_span(body) or (0, 0)
    result = replace_model(body, model)
    assert {**original, "model": model} == msgspec.json.decode(result)
    assert body[:start] == result[:start]
    assert body[end:] == result[len(result) - (len(body) - end) :]
    try:
        peek(body)
    except InvalidRequest:  # a body peek refuses (a bad `stream`) is refused after it too
        return
    if model:
        assert model == peek(result).model


@FAST
@given(OBJECTS.map(lambda d: {k: v for k, v in d.items() if k != "model"}), TEXT, st.data())
def test_set_model_adds_model_and_nothing_else(
    fields: dict[str, object], model: str, data: st.DataObject
) -> None:
    """set_model on an object without a model adds it; every other key keeps its value."""
    body = data.draw(encodings(fields))
    result = set_model(body, model)
    decoded = msgspec.json.decode(result)
    assert model == decoded.pop("model")
    assert fields == decoded
    inserted = b'"model":' + msgspec.json.encode(model) + (b"," if fields else b"")
    assert body == result.replace(inserted, b"", 1)  # the original bytes, none moved


@FAST
@given(JSON.filter(lambda v: not isinstance(v, dict)).flatmap(encodings), TEXT)
def test_set_model_refuses_a_body_that_is_not_an_object(body: bytes, model: str) -> None:
    """set_model on a JSON value that is not an object raises InvalidRequest."""
    try:
        set_model(body, model)
    except InvalidRequest:
        return
    raise AssertionError(f"set_model accepted {body!r}")
