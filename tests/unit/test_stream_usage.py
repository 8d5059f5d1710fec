"""Asking a stream's backend for usage: the body's splice, and the usage-only event taken out of
the answer whatever the reads' boundaries."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import UsageConfig, load_config
from proxy.stream_usage import (
    ASK,
    HOLD_BYTES,
    Edit,
    UsageFilter,
    apply,
    asks_stream_usage,
    is_usage_only,
    options_span,
    request_edit,
    splice,
)
from proxy.usage import Usage, opening_prompt, stream_usage, usage_in
from proxy.view import peek, peek_invocation
from tests.unit.test_properties_json import FAST

# --- the request: a few bytes spliced in -------------------------------------------------


def edited(body: bytes, model: str | None = None) -> bytes | None:
    """The body as the gateway sends it upstream (None: sent as it is)."""
    view = peek(body)
    edit = request_edit(body, view.options_at)
    return None if edit is None else apply(body, edit, model, view.model_at)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"model":"m","stream":true}',
            b'{"stream_options":{"include_usage":true},"model":"m","stream":true}',
        ),
        (
            b' {\n  "model": "m", "stream": true\n}',
            b' {\n  "stream_options":{"include_usage":true},"model": "m", "stream": true\n}',
        ),
        (
            b'{"model":"m","stream":true,"stream_options":null}',
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"model":"m","stream":true,"stream_options":{}}',
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"model":"m","stream":true,"stream_options": { } }',
            b'{"model":"m","stream":true,"stream_options": { "include_usage":true} }',
        ),
        (
            b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}',
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"model":"m","stream":true,"stream_options":{"include_usage" : null, "x": 1}}',
            b'{"model":"m","stream":true,"stream_options":{"include_usage" : true, "x": 1}}',
        ),
        (
            b'{"model":"m","stream":true,"stream_options":{"x":[1,{"include_usage":true}]}}',
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true,"x":[1,'
            b'{"include_usage":true}]}}',
        ),
        (
            b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false}}',
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true,'
            b'"continuous_usage_stats":false}}',
        ),
        (  # the key spelled with an escape is the same key: its value is the one changed
            b'{"model":"m","stream":true,"stream\\u005foptions":{"include_usage":false}}',
            b'{"model":"m","stream":true,"stream\\u005foptions":{"include_usage":true}}',
        ),
        (  # named twice: the backends' JSON readers keep the last, as msgspec does
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true},'
            b'"stream_options":{"include_usage":false}}',
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true},'
            b'"stream_options":{"include_usage":true}}',
        ),
    ],
)
def test_a_body_that_did_not_ask_is_made_to(body: bytes, expected: bytes) -> None:
    """Absent, null, an object without it, false or null: include_usage becomes true, every
    other byte as sent."""
    assert expected == edited(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true,"x":false}}',
        b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true}}',
        b'{"model":"m","stream":true,"stream_options":"yes"}',
        b'{"model":"m","stream":true,"stream_options":[]}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":1}}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":"false"}}',
    ],
)
def test_a_body_that_asked_or_is_wrong_is_left_alone(body: bytes) -> None:
    """A client that asked (or asked for usage in every chunk) keeps its body, and so does one
    whose field has a type the API does not take: the backend's answer says what is wrong."""
    assert edited(body) is None


def test_non_streams_are_not_looked_at() -> None:
    """The view finds `stream_options` only for a stream: a plain request costs nothing more."""
    body = b'{"model":"m","stream":false,"stream_options":{"include_usage":false}}'
    assert peek(body).options_at is None
    assert peek_invocation(b'{"prompt":"x","stream_options":{}}').options_at is None


def test_invocations_find_it_too() -> None:
    """MLflow/OICM bodies (told by their keys) give the same span as a decode of its own."""
    body = b'{"messages":[],"stream":true,"stream_options":{"include_usage":false}}'
    kind = peek_invocation(body)
    assert (options_span(body), True) == (kind.options_at, kind.stream)
    assert options_span(b'{"messages":[]}') is None


def test_model_and_usage_in_one_splice() -> None:
    """The model rewrite and the usage splice are made together, wherever each field is."""
    body = b'{"stream_options":{"include_usage":false},"stream":true,"model":"alias"}'
    expected = b'{"stream_options":{"include_usage":true},"stream":true,"model":"up/1"}'
    assert expected == edited(body, "up/1")
    body = b'{"model":"alias","stream":true}'
    assert b'{"stream_options":{"include_usage":true},"model":"up/1","stream":true}' == edited(
        body, "up/1"
    )


def test_a_body_without_model_gets_both_first() -> None:
    """An endpoint-addressed body without `model` gets it added, as set_model adds it."""
    body = b'{"messages":[],"stream":true}'
    edit = request_edit(body, None)
    assert edit is not None
    assert (
        b'{"model":"up","stream_options":{"include_usage":true},"messages":[],"stream":true}'
        == apply(body, edit, "up", None)
    )


def test_splice_keeps_every_other_byte() -> None:
    """Edits in order, each span replaced, the rest copied."""
    assert b"aXcYYe" == splice(b"abcde", [Edit(1, 2, b"X"), Edit(3, 4, b"YY")])
    assert b"abc" == splice(b"abc", [Edit(3, 3, b"")])


OBJECT_KEYS = st.sampled_from(["messages", "max_tokens", "n", "temperature", "x", "tools"])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=8,
)
OPTIONS = st.sampled_from(
    [None, {}, {"include_usage": False}, {"include_usage": None}, {"x": 1, "include_usage": False}]
).map(lambda v: ("stream_options", v))


@FAST
@given(
    st.lists(st.tuples(OBJECT_KEYS, VALUES), max_size=4, unique_by=lambda kv: kv[0]),
    st.none() | OPTIONS,
    st.integers(0, 6),
    st.sampled_from([None, 0, 2]),
    st.none() | st.text(min_size=1, max_size=5),
)
def test_any_body_that_did_not_ask_then_asks(
    members: list[tuple[str, object]],
    options: tuple[str, object] | None,
    place: int,
    indent: int | None,
    model: str | None,
) -> None:
    """Whatever the body holds and however it is spaced, the edited body decodes to the same
    object with include_usage true (and the model set), keys in the same order."""
    items = [("model", "alias"), ("stream", True), *members]
    if options is not None:
        items.insert(min(place, len(items)), options)
    body = json.dumps(dict(items), indent=indent).encode()
    result = edited(body, model)
    assert result is not None
    expected = dict(items)
    if model is not None:
        expected["model"] = model
    options_value = expected.get("stream_options") or {}
    assert isinstance(options_value, dict)
    expected["stream_options"] = {**options_value, "include_usage": True}
    decoded = json.loads(result)
    assert expected == decoded
    assert [k for k in expected if k != "stream_options"] == [
        k for k in decoded if k != "stream_options"
    ]


def test_the_mode_decides_per_config() -> None:
    """auto asks where the counts are needed (a key store, a tpm limit); always and never do
    as they say."""

    def mode(text: str) -> bool:
        return asks_stream_usage(load_config("backends: {b: {url: 'http://127.0.0.1:1'}}\n" + text))

    model = "models: {m: {targets: [{backend: b}], limits: {%s: 5}}}"
    assert [False, True, True, True, False, True, False] == [
        mode(""),
        mode("auth: {store: /tmp/keys.db}"),
        mode("auth: {default_limits: {tpm: 1000}}"),
        mode(model % "tpm"),
        mode(model % "rpm"),  # requests are counted without usage
        mode("usage: {streams: always}"),
        mode("usage: {streams: never}\nauth: {store: /tmp/keys.db}"),
    ]


# --- the answer: the usage-only event taken out ----------------------------------------


def chunk(text: str, finish: str | None = None, **extra: object) -> bytes:
    delta = {"content": text} if text else {}
    payload = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


USAGE_EVENT = (
    b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[],'
    b'"usage":{"prompt_tokens":11,"completion_tokens":4,"total_tokens":15}}\n\n'
)
LLAMA_USAGE_EVENT = (  # llama-server's, as the real one sends it (choices first, timings last)
    b'data: {"choices":[],"created":1,"id":"c","model":"gemma-3-270m","system_fingerprint":'
    b'"b0-unknown","object":"chat.completion.chunk","usage":{"completion_tokens":4,'
    b'"prompt_tokens":11,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":6}},'
    b'"timings":{"cache_n":6,"prompt_n":5,"prompt_ms":49.353}}\n\n'
)
DONE = b"data: [DONE]\n\n"
HEAD = chunk("") + chunk("Hel") + chunk("lo") + chunk("", "stop")


def filtered(chunks: list[bytes]) -> tuple[bytes, bytes]:
    """What the client gets for these reads, and the event taken out."""
    f = UsageFilter()
    out = b"".join(f.feed(c) for c in chunks) + f.end()
    return out, f.usage


def every_split(stream: bytes) -> list[list[bytes]]:
    """The stream whole, cut once at every point, and cut into single bytes."""
    cuts = [[stream[:i], stream[i:]] for i in range(len(stream) + 1)]
    return [[stream], *cuts, [stream[i : i + 1] for i in range(len(stream))]]


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (HEAD + USAGE_EVENT + DONE, HEAD + DONE),
        (HEAD + USAGE_EVENT, HEAD),  # a backend that sends no [DONE]
        (HEAD + LLAMA_USAGE_EVENT + DONE, HEAD + DONE),
        (
            (HEAD + USAGE_EVENT + DONE).replace(b"\n", b"\r\n"),
            (HEAD + DONE).replace(b"\n", b"\r\n"),
        ),
        (HEAD + b"\n" + USAGE_EVENT + b"\n" + DONE, HEAD + b"\n" + b"\n" + DONE),
        (HEAD + b": keep-alive\n\n" + USAGE_EVENT + DONE, HEAD + b": keep-alive\n\n" + DONE),
        (HEAD + USAGE_EVENT[:-2], HEAD),  # the body ends inside it: a client would drop it too
    ],
)
def test_the_usage_event_is_taken_out_at_every_split(stream: bytes, expected: bytes) -> None:
    """At every cut point, and byte by byte, the client gets the stream without that event."""
    results = {filtered(chunks) for chunks in every_split(stream)}
    assert {expected} == {out for out, _ in results}
    assert 1 == len({usage for _, usage in results})
    assert Usage(prompt=11, completion=4) == usage_in(results.pop()[1])


@pytest.mark.parametrize(
    "stream",
    [
        HEAD + DONE,  # no usage at all
        HEAD[: -len(chunk("", "stop"))]  # usage in the last content chunk (llama.cpp completions)
        + chunk("", "stop", usage={"prompt_tokens": 2, "completion_tokens": 3})
        + DONE,
        HEAD + chunk("", usage={"prompt_tokens": 1}) + DONE,  # continuous usage stats
        HEAD + b'data: {"choices":[],"prompt_filter_results":[]}\n\n' + DONE,  # Azure's first
        HEAD + b'data: {"choices":[],"usage":null}\n\n' + DONE,  # no usage object
        HEAD + b'data: {"error":{"message":"x","usage":{}}}\n\n',  # an error, not usage
        HEAD + b'data: {"choices":[{"delta":{"content":"\\"choices\\":[],\\"usage\\":{"}}]}\n\n',
        b"data: x\r\rdata: y\r\r",  # lone-CR framing: passed on untouched
    ],
)
def test_other_events_pass_untouched_at_every_split(stream: bytes) -> None:
    """A stream with no usage-only event reaches the client byte for byte, however it is cut;
    usage inside a content chunk stays where the backend put it."""
    assert {(stream, b"")} == {filtered(chunks) for chunks in every_split(stream)}


def test_whole_events_without_usage_come_back_as_the_same_object() -> None:
    """The common read (whole events, no usage) costs no copy."""
    data = chunk("hi")
    assert UsageFilter().feed(data) is data


def test_a_long_unfinished_event_is_not_held() -> None:
    """An event longer than HOLD_BYTES goes out as it comes, and is not taken out."""
    long_event = b'data: {"choices":[],"usage":{"prompt_tokens":1},"pad":"' + b"x" * HOLD_BYTES
    f = UsageFilter()
    assert [long_event, b'"}\n\n', DONE] == [f.feed(long_event), f.feed(b'"}\n\n'), f.feed(DONE)]
    assert b"" == f.usage


def test_a_content_chunk_is_not_held_once_its_choices_show() -> None:
    """The start of an event whose choices are not empty goes out at once."""
    f = UsageFilter()
    part = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a'
    assert part == f.feed(part)
    assert b'"}}]}\n\n' + DONE == f.feed(b'"}}]}\n\n' + DONE)


def test_a_possible_usage_event_is_held_until_it_ends() -> None:
    """The start of what may be the usage event waits for its end (a client could not read
    it before), then goes out or not."""
    f = UsageFilter()
    assert b"" == f.feed(b'data: {"id":"c","choices":[')
    assert b"" == f.feed(b'],"usage":{"prompt_tokens":3}}\n')
    assert DONE == f.feed(b"\n" + DONE)
    f = UsageFilter()
    assert b"" == f.feed(b'data: {"id":"c","choices":[')
    assert b'data: {"id":"c","choices":[{"index":0' == f.feed(b'{"index":0')


def test_is_usage_only() -> None:
    """Empty choices and a usage object, spaced any way JSON allows."""
    assert is_usage_only(b'data: {"choices" : [ ] , "usage" : {"prompt_tokens":1}}\n\n')
    assert not is_usage_only(b'data: {"choices":[],"usage":null}\n\n')
    assert not is_usage_only(b'data: {"choices":[{}],"usage":{}}\n\n')


EVENT_PARTS = st.sampled_from(
    [
        chunk("a"),
        chunk("\n\n"),  # newlines inside a string are escaped: not a blank line
        chunk("", "stop"),
        chunk("", usage={"prompt_tokens": 1, "completion_tokens": 0}),
        b": keep-alive\n\n",
        b"event: x\ndata: {}\n\n",
        b"\n",
        b'data: {"choices":[],"prompt_filter_results":[]}\n\n',
        DONE,
    ]
)


@st.composite
def streams_with_usage(draw: st.DrawFn) -> tuple[list[bytes], bytes, bytes]:
    """(the reads, the stream as the client should get it, the usage event), in LF or CRLF."""
    before = draw(st.lists(EVENT_PARTS, max_size=5))
    after = draw(st.lists(st.just(DONE) | st.just(b"\n"), max_size=2))
    usage = draw(st.sampled_from([USAGE_EVENT, LLAMA_USAGE_EVENT]))
    crlf = draw(st.booleans())

    def framed(data: bytes) -> bytes:
        return data.replace(b"\n", b"\r\n") if crlf else data

    stream = framed(b"".join([*before, usage, *after]))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    edges = [0, *cuts, len(stream)]
    return (
        [stream[a:b] for a, b in itertools.pairwise(edges)],
        framed(b"".join([*before, *after])),
        framed(usage),
    )


@FAST
@given(streams_with_usage())
def test_any_chunking_gives_the_stream_without_the_usage_event(
    case: tuple[list[bytes], bytes, bytes],
) -> None:
    """However the backend's bytes are cut into reads, the client gets the stream with the
    usage event removed, and the filter holds that event."""
    reads, expected, usage = case
    assert (expected, usage) == filtered(reads)


@FAST
@given(st.binary(max_size=80), st.lists(st.integers(0, 80), max_size=8))
def test_any_bytes_in_any_chunking_give_one_answer(stream: bytes, cuts: list[int]) -> None:
    """Whatever the bytes, the output does not depend on where the reads were cut."""
    edges = [0, *sorted(min(c, len(stream)) for c in cuts), len(stream)]
    reads = [stream[a:b] for a, b in itertools.pairwise(edges)]
    assert filtered([stream]) == filtered(reads)


def test_a_read_of_many_events_of_both_framings_is_scanned_in_one_pass() -> None:
    """A read of thousands of events, LF and CRLF mixed, with `"usage"` in every one (as
    OpenAI-style servers send once usage is asked for), gives what the same bytes fed one at
    a time give: the stream without the usage event."""
    lf = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
    crlf = lf.replace(b"\n", b"\r\n")
    events = [lf if i % 3 else crlf for i in range(3000)]
    stream = b"".join([*events, USAGE_EVENT, DONE])
    expected = (b"".join([*events, DONE]), USAGE_EVENT)
    assert expected == filtered([stream])
    assert expected == filtered([stream[i : i + 1] for i in range(len(stream))])


# --- the counts of a stream ----------------------------------------------------------------


def test_anthropic_prompt_count_comes_from_message_start() -> None:
    """A stream whose last usage has no prompt count (Anthropic's message_delta) takes it
    from its first event (message_start)."""
    head = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"cache_read_input_tokens":5,"input_tokens":9,"output_tokens":0}}}\n\n'
    )
    tail = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":3}}\n\n'
    assert 9 == opening_prompt(head)
    assert Usage(prompt=9, completion=3) == stream_usage(opening_prompt(head), tail)
    assert Usage(prompt=9, completion=0) == stream_usage(9, b"")
    assert Usage(prompt=11, completion=4) == stream_usage(9, USAGE_EVENT)
    assert None is opening_prompt(chunk("a"))
    assert stream_usage(opening_prompt(chunk("a")), DONE) is None


def test_ask_is_what_the_docs_say() -> None:
    """The field added to a body that has none (README, docs/protocols.md)."""
    assert {"stream_options": {"include_usage": True}} == orjson.loads(b"{" + ASK[:-1] + b"}")


def test_conf_proxy_yaml_shows_the_usage_defaults() -> None:
    """conf/proxy.yaml's usage section is the defaults, and its backend asks for usage."""
    config = load_config((Path(__file__).parents[2] / "conf" / "proxy.yaml").read_bytes())
    assert UsageConfig() == config.usage
    assert all(b.stream_usage for b in config.backends.values())
