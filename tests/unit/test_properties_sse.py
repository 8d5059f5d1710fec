"""Properties of the SSE scanners: counting events and parsing a chat stream give the same answer
for any chunking of the same bytes, and any bytes give an answer or our own error."""

from __future__ import annotations

import asyncio
import itertools

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.translate.chat_stream import ChatStreamParser, Event
from proxy.usage import Usage, carry_tail, count_events, ends_stream, events_after, usage_in
from tests.unit.test_properties_json import FAST

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON = st.recursive(
    SCALARS,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=10,
)
EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])
LINES = (
    st.dictionaries(st.sampled_from(["id", "choices", "usage", "error"]), JSON, max_size=3).map(
        lambda d: b"data: " + orjson.dumps(d)
    )
    | st.just(b"data: [DONE]")
    | JSON.map(lambda v: b"data:" + orjson.dumps(v))
    | st.sampled_from([b": keep-alive", b"event: x", b"id: 7", b"retry: 10", b"data", b"data: "])
    | st.binary(max_size=12)
)
EVENTS = st.lists(st.tuples(LINES, EOL), min_size=1, max_size=4).flatmap(
    lambda lines: EOL.map(lambda end: b"".join(line + eol for line, eol in lines) + end)
)
STREAMS = st.lists(EVENTS, max_size=5).map(b"".join) | st.binary(max_size=64)


@st.composite
def splits(draw: st.DrawFn, streams: st.SearchStrategy[bytes] = STREAMS) -> list[bytes]:
    """A stream cut into chunks at any points (empty chunks and one-byte chunks included)."""
    stream = draw(streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


# --- count_events ------------------------------------------------------------------------


@FAST
@given(splits())
def test_counting_events_chunk_by_chunk_equals_counting_the_whole(chunks: list[bytes]) -> None:
    """Counting each chunk with the last two bytes before it equals counting the whole stream."""
    counted, seen = 0, b""
    for chunk in chunks:
        counted += count_events(chunk, seen[-2:])
        seen += chunk
    assert count_events(seen) == counted


@FAST
@given(splits())
def test_counting_with_the_relays_tail_equals_counting_the_whole(chunks: list[bytes]) -> None:
    """The relay's tail (`carry_tail`, as `_Sink.account` keeps it) counts right however the
    body is split, one-byte pieces included."""
    counted, tail = 0, b""
    for chunk in chunks:
        counted += count_events(chunk, tail)
        tail = carry_tail(tail, chunk)
    assert count_events(b"".join(chunks)) == counted


@FAST
@given(splits())
def test_the_relays_one_call_counts_as_the_two(chunks: list[bytes]) -> None:
    """`events_after`, which `_Sink.account` calls, gives what `count_events` and
    `carry_tail` give, chunk by chunk, however the body is split."""
    tail = b""
    for chunk in chunks:
        assert events_after(tail, chunk) == (count_events(chunk, tail), carry_tail(tail, chunk))
        tail = carry_tail(tail, chunk)


_FRAMING = st.lists(
    st.sampled_from([b"data: x", b"data: [DONE]", b"event: message_stop", b"\n", b"\r\n", b"\r"]),
    max_size=12,
).map(b"".join)


@FAST
@given(_FRAMING)
def test_ends_stream_finds_the_last_event_as_both_searches_would(tail: bytes) -> None:
    """The last event starts after the later of the last LF and CRLF boundaries, however the
    framings mix (the CRLF one is searched only after the LF one)."""
    body = tail.rstrip(b"\r\n")
    start = max(body.rfind(b"\n\n"), body.rfind(b"\r\n\r\n"))
    last = body[start + 1 :]
    ends = tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
    expected = ends and b"data:" in last and (b"[DONE]" in last or b"message_stop" in last)
    assert ends_stream(tail) == expected


def test_one_byte_pieces_are_counted() -> None:
    """A terminator split into one-byte pieces is one event (it counted none with the tail
    taken from the last piece alone)."""
    counted, tail = 0, b""
    for chunk in [b"data: x\r", b"\n", b"\r", b"\n"]:
        counted += count_events(chunk, tail)
        tail = carry_tail(tail, chunk)
    assert 1 == counted


@FAST
@given(STREAMS | st.binary(max_size=64))
def test_usage_in_never_raises(tail: bytes) -> None:
    """Any tail gives Usage with non-negative counts, or None."""
    usage = usage_in(tail)
    assert usage is None or (Usage is type(usage) and usage.prompt >= 0 <= usage.completion)


USAGE_TAILS = st.tuples(
    st.sampled_from([b"", b'data: {"usage": ', b'{"usage"']),
    st.sampled_from([b"", b"{", b'"prompt_tokens": ', b'"input_tokens":', b'"output_tokens" : ']),
    st.integers(0, 2**64).map(lambda n: str(n).encode())
    | st.integers(1, 6000).map(lambda n: b"9" * n)
    | st.binary(max_size=8),
    st.sampled_from([b"", b"}", b', "completion_tokens": 3}']),
).map(b"".join)


@FAST
@given(USAGE_TAILS)
def test_usage_in_reads_any_usage_shaped_tail(tail: bytes) -> None:
    """Usage-shaped tails with numbers of any length give Usage or None, never an exception."""
    usage = usage_in(tail)
    assert usage is None or (usage.prompt >= 0 and usage.completion >= 0)


def test_usage_with_a_number_too_long_for_int_is_no_usage() -> None:
    """A count of 5000 digits (past Python's int() limit) is not a count; it raised ValueError."""
    assert None is usage_in(b'{"usage": {"prompt_tokens": ' + b"1" * 5000 + b"}}")


# --- ChatStreamParser --------------------------------------------------------------------


def parse(chunks: list[bytes], max_event_bytes: int = 8 * 1024 * 1024) -> list[Event] | str:
    """Every event of the chunks and the flush, or the ProxyError's type if one is raised."""
    parser = ChatStreamParser(max_event_bytes=max_event_bytes)
    events: list[Event] = []
    try:
        for chunk in chunks:
            events += parser.feed(chunk)
        events += parser.flush()
    except ProxyError as err:
        return err.type
    return events


@FAST
@given(splits())
def test_any_split_of_a_stream_gives_the_events_of_the_whole(chunks: list[bytes]) -> None:
    """Feeding a stream in any chunks gives the same events (or the same error) as feeding it whole."""
    assert parse([b"".join(chunks)]) == parse(chunks)


@FAST
@given(splits(), st.integers(1, 64))
def test_the_parser_raises_nothing_but_proxy_errors(chunks: list[bytes], limit: int) -> None:
    """Any bytes, any chunking and a small event limit give events or a ProxyError."""
    result = parse(chunks, max_event_bytes=limit)
    assert isinstance(result, str) or all(e is None or isinstance(e, dict) for e in result)


@pytest.mark.parametrize("stream", [b"data: 1\n\n", b"data: [1]\r\n\r\n", b'data: "x"\r\r'])
def test_events_that_are_not_objects_are_backend_errors(stream: bytes) -> None:
    """An event whose data is JSON but not an object is the backend's error (502)."""
    assert "backend_unreachable" == parse([stream])


class _Wire:
    """Where the relay's sink writes: a transport that takes everything at once."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def get_write_buffer_size(self) -> int:
        return 0


def _relayed(chunks: list[bytes]) -> tuple[int, bytes]:
    """The events the relay's sink counts and the bytes it writes, fed `chunks` as the
    upstream protocol hands them over (no empty piece)."""
    from proxy.relay import _Sink

    async def relay() -> tuple[int, bytes]:
        wire = _Wire()
        sink = _Sink(None, wire, False, True)  # type: ignore[arg-type]  # never paused here
        for chunk in chunks:
            if chunk:
                sink(chunk)
        return sink.events, b"".join(wire.sent)

    return asyncio.run(relay())


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\n\n"],  # the usual read: one event of one line
        [b"data: a\nd", b"ata: b\n\n"],  # one LF, second to last, no event yet
        [b"data: a\n", b"\n"],  # the blank line cut
        [b"data: a\n", b"\ndata: b\n\n"],  # cut, and the next event in the same read
        [b"data: a\n\ndata: b\n", b"\n", b"x"],
        [b"event: e\ndata: y\n\n", b"data: z\n\n"],  # two lines an event
        [b"data: a\r\n", b"\r\n", b"data: b\r", b"\n\r\n"],
        [b"\n", b"\n", b"\n\n"],
    ],
)
def test_the_relays_sink_counts_these_splits(chunks: list[bytes]) -> None:
    assert (count_events(b"".join(chunks)), b"".join(chunks)) == _relayed(chunks)


@FAST
@given(splits())
def test_the_relays_sink_counts_the_events_of_any_split(chunks: list[bytes]) -> None:
    """The sink in the upstream protocol's callback (its one-event-per-read shortcut and the
    straddling cases) counts what counting the whole body counts, and writes every byte."""
    assert (count_events(b"".join(chunks)), b"".join(chunks)) == _relayed(chunks)
