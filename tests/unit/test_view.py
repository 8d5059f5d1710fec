"""peek() reads `model` and `stream` only; replace_model() rewrites `model` and no other byte."""

from __future__ import annotations

import json

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.view import (
    RequestView,
    decode_object,
    model_span,
    peek,
    peek_invocation,
    prompt_head,
    prompt_of,
    raw_span,
    replace_model,
)

# --- peek: valid bodies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model": "qwen"}', RequestView(model="qwen", stream=False)),
        (b'{"model": "qwen", "stream": true}', RequestView(model="qwen", stream=True)),
        (b'{"stream": false, "model": "qwen"}', RequestView(model="qwen", stream=False)),
        (
            b'\n  {"model":"Qwen/Qwen2.5-7B-Instruct"}\n',
            RequestView("Qwen/Qwen2.5-7B-Instruct", False),
        ),
        (b'{"model": "caf\\u00e9"}', RequestView(model="caf\u00e9", stream=False)),
        ('{"model": "模型"}'.encode(), RequestView(model="模型", stream=False)),
        (
            b'{"messages": [{"role": "user", "content": "hi", "model": 5}], "model": "m",'
            b' "stream": true, "n": 1.5e3, "x": null, "tools": [[], {}]}',
            RequestView(model="m", stream=True),
        ),
    ],
)
def test_peek_valid_bodies(body: bytes, expected: RequestView) -> None:
    """`model` and `stream` (default false) come out of any valid object, other fields unread;
    `model_at` is where the model value's bytes are."""
    view = peek(body)
    assert expected == msgspec.structs.replace(view, model_at=None)
    assert view.model_at is not None
    start, end = view.model_at
    assert expected.model == msgspec.json.decode(body[start:end])


# --- peek: bad bodies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        (b'{"model": "a",}', "not valid JSON"),
        (b'{"model": "a"', "not valid JSON"),
        (b"{model: a}", "not valid JSON"),
        (b'{"model": "a"} {}', "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'[{"model": "a"}]', "must be a JSON object"),
        (b'"model"', "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"", "request body is empty"),
        (b" \r\n\t ", "request body is empty"),
        (b"{}", "'model' is required"),
        (b'{"messages": [{"model": "a"}]}', "'model' is required"),
        (b'{"model": 7}', "'model' must be a non-empty string"),
        (b'{"model": ""}', "'model' must be a non-empty string"),
        (b'{"model": null}', "'model' must be a non-empty string"),
        (b'{"model": ["a"]}', "'model' must be a non-empty string"),
        (b'{"model": "a", "stream": "true"}', "'stream' must be true or false"),
        (b'{"model": "a", "stream": 1}', "'stream' must be true or false"),
        (b'{"model": "caf\xe9"}', "not valid UTF-8"),
        (b'{"model": "a"}\xff', "not valid UTF-8"),
        (b'\xff\xfe{"model": "a"}', "not valid UTF-8"),
        (b'{"model": "a"}x', "not valid JSON"),
    ],
)
def test_peek_rejects_bad_bodies(body: bytes, message_part: str) -> None:
    """Every body routing cannot use is a 400 invalid_request saying what is wrong."""
    with pytest.raises(InvalidRequest) as caught:
        peek(body)
    assert 400 == caught.value.status
    assert "invalid_request" == caught.value.type
    assert message_part in caught.value.message


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"[1, 2]", "an array"),
        (b' "model"', "a string"),
        (b"42", "a number"),
        (b"-1.5", "a number"),
        (b"true", "a boolean"),
        (b"null", "null"),
    ],
)
def test_peek_message_names_the_json_type(body: bytes, kind: str) -> None:
    """A body that is JSON but not an object says, in our words, what it is."""
    with pytest.raises(InvalidRequest) as caught:
        peek(body)
    assert f"request body must be a JSON object, not {kind}" == caught.value.message


# --- decode_object -----------------------------------------------------------------------


def test_decode_object_returns_the_whole_object() -> None:
    """The translating routes get every field of the body."""
    assert {"model": "a", "messages": [{"role": "user"}]} == decode_object(
        b'{"model": "a", "messages": [{"role": "user"}]}'
    )


@pytest.mark.parametrize("body", [b"[1]", b'"x"', b"{", b"\xff"])
def test_decode_object_rejects_non_objects(body: bytes) -> None:
    """A non-object, malformed or non-UTF-8 body is a 400 for the translating routes too."""
    with pytest.raises(InvalidRequest):
        decode_object(body)


# --- replace_model -----------------------------------------------------------------------

MARK = b"@MODEL@"
TEMPLATES = {
    "compact": b'{"model":@MODEL@,"stream":true}',
    "odd spacing": b'{ "messages" :[ {"role":"user" , "content":"hi"} ] ,\n\t"model"\n :\t @MODEL@ ,'
    b'"stream" :  true }\n',
    "escaped quotes": b'{"messages":[{"role":"user","content":"say \\"model\\": \\"x\\", ok"}],'
    b'"model":@MODEL@}',
    "escaped backslash before quote": b'{"a":"\\\\","model":@MODEL@,"b":"\\\\\\"model\\""}',
    "nested model keys": b'{"tools":[{"model":"inner"}],"meta":{"model":{"model":"deep"}},'
    b'"model":@MODEL@,"extra":{"model":"after"}}',
    "arrays and brackets in strings": b'{"stop":["model","}","]","{"],"model":@MODEL@,'
    b'"n":[1,[2,[3,{"model":"x"}]]]}',
    "unicode": '{"content":"héllo 世界 🚀 \\u00e9\\ud83d\\ude80","model":@MODEL@,"名":"值"}'.encode(),
    "numbers": b'{"temperature":0.7,"max_tokens":1e3,"seed":-12,"model":@MODEL@,"top_p":1.0,'
    b'"logit_bias":{"50256":-100}}',
    "model value is the word model": b'{"name":"model","model":@MODEL@,"kind":"model"}',
    "model first": b'{"model":@MODEL@,"messages":[]}',
}


@pytest.mark.parametrize("template", TEMPLATES.values(), ids=TEMPLATES.keys())
@pytest.mark.parametrize("new", ["Qwen/Qwen2.5-7B-Instruct", "a", 'quote"and\\slash', "模型"])
def test_replace_model_keeps_every_other_byte(template: bytes, new: str) -> None:
    """Only the top-level model value changes; every byte before and after it is as sent."""
    body = template.replace(MARK, b'"sent-name"')
    expected = template.replace(MARK, json.dumps(new, ensure_ascii=False).encode())
    actual = replace_model(body, new)
    assert expected == actual
    assert new == peek(actual).model


def test_replace_model_of_an_escaped_value() -> None:
    """A sent model with escapes in it is replaced whole."""
    assert b'{"model":"b","x":1}' == replace_model(b'{"model":"a\\"q\\u0041","x":1}', "b")


def test_replace_model_rejects_model_twice() -> None:
    """A body with two top-level "model" keys is refused: which one a backend reads is unknown."""
    with pytest.raises(InvalidRequest) as caught:
        replace_model(b'{"model": "a", "messages": [], "model": "b"}', "x")
    assert "'model' appears more than once in the body" == caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "mod\\u0065l": "b"}',  # the second spelt with a JSON escape
        b'{"\\u006dodel": "a", "x": {"model": "n"}, "model": "b"}',  # the first escaped
        b'{"model": "a", "messages": [{"model": "n"}], "model": "a"}',  # the same value twice
    ],
)
def test_model_twice_is_refused_by_peek_and_replace(body: bytes) -> None:
    """One rule for routing and rewriting: a top-level "model" named twice is a 400 whether
    or not a rewrite follows (the gateway would route by one, a backend may read the other)."""
    for call in (lambda: peek(body), lambda: replace_model(body, "B-upstream")):
        with pytest.raises(InvalidRequest) as caught:
            call()
        assert "'model' appears more than once in the body" == caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "messages": [{"role": "user", "content": "model model"}]}',
        b'{"model": "a", "x": {"model": "b"}, "y": "\\u00e9"}',
        b'{"name": "model", "model": "a", "tag": "mod\\u0065l"}',
    ],
)
def test_model_once_at_the_top_level_is_not_a_duplicate(body: bytes) -> None:
    """The word "model" in values, nested objects and escaped strings is no second model."""
    assert "a" == peek(body).model
    assert "b2" == peek(replace_model(body, "b2")).model


LONG = b'[{"role": "user", "content": "' + b"x " * 4000 + b'"}]'  # past peek's search
LONG_WITH_MODEL = b'[{"role": "user", "model": "n", "content": "' + b"x " * 4000 + b'mod\\u0065l"}]'


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "messages": ' + LONG + b', "model": "b"}',
        b'{"model": "a", "messages": ' + LONG + b', "mod\\u0065l": "b"}',
        b'{"mod\\u0065l": "a", "messages": ' + LONG + b', "model": "b"}',
        b'{"model": "a", "messages": ' + LONG_WITH_MODEL + b', "model": "b"}',
        b'{"messages": ' + LONG + b', "model": "a", "model": "b"}',
        b'{"messages": ' + LONG_WITH_MODEL + b', "model": "a", "mod\\u0065l": "b"}',
        b'{"mod\\u0065l": "b", "messages": ' + LONG_WITH_MODEL + b', "model": "a"}',
    ],
)
def test_model_twice_around_a_long_prompt_is_refused(body: bytes) -> None:
    """The long prompt `peek` does not search hides no second top-level "model" before or
    after it."""
    with pytest.raises(InvalidRequest) as caught:
        peek(body, ("messages",))
    assert "'model' appears more than once in the body" == caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "messages": ' + LONG_WITH_MODEL + b"}",
        b'{"messages": ' + LONG + b', "model": "a"}',
        b'{"messages": ' + LONG_WITH_MODEL + b', "model": "a", "max_tokens": 1}',
    ],
)
def test_model_once_beside_a_long_prompt(body: bytes) -> None:
    """A "model" key or an escaped spelling inside the long prompt is no second model, and
    the model's span is found wherever it is."""
    view = peek(body, ("messages",))
    assert "a" == view.model
    assert view.model_at is not None
    assert b'"a"' == body[view.model_at[0] : view.model_at[1]]


_KEYS = st.sampled_from(["model", "mod\\u0065l", "\\u006dodel", "x"])


@given(
    before=st.lists(_KEYS, max_size=2),
    after=st.lists(_KEYS, max_size=2),
    prompt=st.sampled_from([LONG, LONG_WITH_MODEL]),
)
def test_a_long_prompt_changes_no_verdict_on_model(
    before: list[str], after: list[str], prompt: bytes
) -> None:
    """Against Python's own parse of the top level: a body with a long prompt (which `peek`
    leaves out of its searches) has its one `model` found, or is refused for none or two."""
    members = [f'"{k}": "b{i}"'.encode() for i, k in enumerate(before)]
    members += [b'"messages": ' + prompt]
    members += [f'"{k}": "a{i}"'.encode() for i, k in enumerate(after)]
    body = b"{" + b", ".join(members) + b"}"
    top = json.loads(body, object_pairs_hook=lambda pairs: pairs)
    models = [value for key, value in top if key == "model"]
    if len(models) != 1:
        with pytest.raises(InvalidRequest):
            peek(body, ("messages",))
        return
    view = peek(body, ("messages",))
    assert models[0] == view.model
    assert view.model_at is not None
    assert json.dumps(models[0]).encode() == body[view.model_at[0] : view.model_at[1]]


def test_invalid_utf8_in_a_skipped_value_is_refused() -> None:
    """Bytes that are not UTF-8 are a 400 even inside a value routing does not read."""
    with pytest.raises(InvalidRequest) as caught:
        peek(b'{"model": "a", "messages": [{"content": "caf\xe9"}]}')
    assert "request body is not valid UTF-8" == caught.value.message


def test_replace_model_without_a_top_level_model() -> None:
    """A body whose only "model" keys are nested has nothing to replace: 400."""
    with pytest.raises(InvalidRequest):
        replace_model(b'{"meta": {"model": "a"}}', "x")


# --- model_span --------------------------------------------------------------------------


def test_model_span_is_the_value_with_its_quotes() -> None:
    """The span covers the value string, quotes included."""
    body = b'{"stream": true, "model" : "qwen"}'
    start, end = model_span(body) or (0, 0)
    assert b'"qwen"' == body[start:end]


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "model"}',
        b'{"a": ["model"], "b": "model"}',
        b'{"meta": {"model": "x"}}',
        b'{"model": 5}',
        b"{}",
    ],
)
def test_model_span_none_when_no_top_level_model_key(body: bytes) -> None:
    """A "model" that is a value, nested, or not a string gives no span."""
    assert model_span(body) is None


def test_model_span_skips_model_as_a_top_level_value() -> None:
    """The string "model" used as a value before the key is not mistaken for the key."""
    body = b'{"name": "model", "model": "m", "tag": "model"}'
    start, end = model_span(body) or (0, 0)
    assert (body.index(b'"m"'), body.index(b'"m"') + 3) == (start, end)


# --- the prompt that keys `affinity`: prompt_of, and peek's own ------------------------

CHAT_FIELDS = ("messages",)
ALL_FIELDS = ("system", "messages", "prompt", "input")  # peek's (Gemini's `contents` is not)


def _bytes(prompt: tuple[msgspec.Raw, ...]) -> bytes | None:
    return b"".join(bytes(raw) for raw in prompt) if prompt else None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model": "m", "messages": [{"role": "user"}], "n": 1}', b'[{"role": "user"}]'),
        (b'{"messages"  :\n [1, 2], "model": "m"}', b"[1, 2]"),
        (b'{"name": "messages", "messages": [3]}', b"[3]"),  # the word as a value first
        (b'{"tools": [{"messages": {}}], "messages": [4]}', b"[4]"),  # a nested key first
        (b'{"a": "x\\"messages\\": [0]", "messages": [5]}', b"[5]"),  # quoted text first
        (b'{"m\\u0065ssages": [6]}', b"[6]"),  # the name spelled with an escape
        (b'{"model": "m"}', None),
        (b'["messages", 1]', None),  # not an object
        (b'not json "messages": [1]', None),
    ],
)
def test_prompt_of_is_the_top_level_value(body: bytes, expected: bytes | None) -> None:
    """The prompt is the value of the top-level key, whatever looks like it before, and
    only that value: the fields after it do not change a request's key."""
    assert expected == _bytes(prompt_of(body, CHAT_FIELDS))


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [{"role": "system", "content": "' + b"s" * 3000 + b'"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "model": "m"}',
        b'{"system": "be brief", "messages": [], "model": "m"}',
        b'{"max_tokens": 5, "messages": [1], "system": [{"type": "text"}], "model": "m"}',
        b'{"model": "m", "prompt": "once upon a time"}',
        b'{"input": ["a", "b"], "model": "m"}',
        b'{"tools": [' + b'{"messages": 1}, ' * 20 + b'{}], "messages": [2], "model": "m"}',
        b'{"pad": "' + b"p" * 70_000 + b'", "messages": [3], "model": "m"}',
        b'{"model": "m"}',
    ],
)
def test_peek_finds_the_prompt_prompt_of_finds(body: bytes) -> None:
    """The handler's own pass (`peek`) and the fallback's decode key a request alike."""
    assert _bytes(prompt_of(body, ALL_FIELDS)) == _bytes(peek(body, ALL_FIELDS).prompt)
    assert _bytes(prompt_of(body)) == _bytes(peek(body, ALL_FIELDS).prompt)


_TRICKY = st.sampled_from(["messages", "system", "{", "[", '"', "\\", ",", "m", ':"messages":'])
_VALUES = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.lists(_TRICKY, max_size=4).map("".join),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_TRICKY, kids, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(_TRICKY, _VALUES, max_size=5), _VALUES)
def test_peek_and_prompt_of_agree_on_any_body(obj: dict[str, object], prompt: object) -> None:
    """Field names, braces, brackets, quotes and escapes in keys and in strings: the prompt
    `peek` finds is the one a decode finds, and it is the value the client sent."""
    body = orjson.dumps({**obj, "model": "m", "messages": prompt})
    found = peek(body, CHAT_FIELDS).prompt
    assert _bytes(found) == _bytes(prompt_of(body, CHAT_FIELDS)) == orjson.dumps(prompt)


def test_the_prompt_of_an_invocation_is_its_kind_s() -> None:
    """MLflow's and OICM's bodies: the kind's own field (`prompt_of` finds the same)."""
    chat = b'{"messages": [{"role": "user", "content": "q"}], "input": "x"}'
    assert b'[{"role": "user", "content": "q"}]' == _bytes(peek_invocation(chat).prompt)
    assert b'"once"' == _bytes(peek_invocation(b'{"prompt": "once", "n": 2}').prompt)
    assert b'["a"]' == _bytes(peek_invocation(b'{"input": ["a"]}').prompt)
    assert () == peek_invocation(b'{"inputs": "tgi"}').prompt


def test_a_system_prompt_of_its_own_comes_first_then_the_messages() -> None:
    """Anthropic's `system` and then its `messages`, wherever each is in the body: the order
    a chat template renders them, so a short system prompt does not key every conversation
    alike."""
    body = (
        b'{"messages": [{"role": "user", "content": "q1"}], "system": "You are X.", "model": "m"}'
    )
    both = b'"You are X."[{"role": "user", "content": "q1"}]'
    assert both == _bytes(prompt_of(body, ("system", "messages")))
    assert both == _bytes(prompt_of(body))
    assert both == _bytes(peek(body, ("system", "messages")).prompt)
    assert b'"You are X."[{"role"' == prompt_head(peek(body, ("system", "messages")).prompt, 20)


def test_prompt_head_slices_each_value_to_the_size() -> None:
    body = b'{"system": "' + b"s" * 5000 + b'", "messages": [1], "model": "m"}'
    prompt = peek(body, ("system", "messages")).prompt
    assert b'"' + b"s" * 99 == prompt_head(prompt, 100)
    assert b"[1]" == prompt_head(peek(b'{"messages": [1], "model": "m"}', CHAT_FIELDS).prompt, 100)
    assert b"" == prompt_head((), 100)


def test_gemini_contents_are_found_by_the_decode() -> None:
    body = b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    assert b'[{"parts": [{"text": "hi"}]}]' == _bytes(prompt_of(body))


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m"}',
        b'{ "model" :\t\r\n "m" , "stream": true}',
        b'{"messages": [{"content": "hi"}], "model": "m"}',
        b'{"model": "model-7b"}',  # the word twice: the value's address is read instead
        b'{"messages": [{"content": "the model"}], "model": "m"}',
        b'{"x": "\\u0041", "model": "m"}',  # an escape: the value's address is read instead
        '{"content": "模型", "model": "模型"}'.encode(),
    ],
)
def test_model_at_is_where_msgspec_found_the_value(body: bytes) -> None:
    """Found by search where the word is in the body once, else by the value's address:
    the same span either way."""
    found = msgspec.json.decode(body, type=_ModelOnly).model
    view = peek(body)
    assert view.model_at == raw_span(body, found)


class _ModelOnly(msgspec.Struct):
    model: msgspec.Raw
