"""Reading relayed bytes: SSE events completed per chunk, and the backend's last `usage`."""

from __future__ import annotations

import pytest

from proxy.usage import Usage, count_events, ends_event, ends_stream, usage_in

LF_STREAM = (
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n'
    b"data: [DONE]\n\n"
)
CRLF_STREAM = LF_STREAM.replace(b"\n", b"\r\n")


def count_in_chunks(chunks: list[bytes]) -> int:
    """Events over a chunked body, fed the way the relay feeds them."""
    total, tail = 0, b""
    for chunk in chunks:
        total += count_events(chunk, tail)
        tail = chunk[-2:]
    return total


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (b"", 0),
        (b"data: a", 0),
        (b"data: a\n", 0),
        (b"data: a\n\n", 1),
        (b"data: a\r\n\r\n", 1),
        (b"event: message\ndata: a\n\n", 1),
        (b"data: a\n\ndata: b\n\n", 2),
        (b"data: a\r\n\r\ndata: b\r\n\r\n", 2),
        (b"data: a\n\ndata: b\r\n\r\ndata: c\n", 2),
        (LF_STREAM, 3),
        (CRLF_STREAM, 3),
    ],
)
def test_count_events_in_one_chunk(chunk: bytes, expected: int) -> None:
    """Each blank line (LF or CRLF framing) ends one event."""
    assert expected == count_events(chunk)


def test_event_split_at_the_blank_line_lf() -> None:
    """An event whose blank line starts the next chunk is counted once, in that chunk."""
    assert [0, 2] == [count_events(b"data: a\n"), count_events(b"\ndata: b\n\n", b"a\n")]


def test_event_split_at_the_blank_line_crlf() -> None:
    """A CRLF event whose blank line starts the next chunk is counted once, in that chunk."""
    assert [0, 2] == [
        count_events(b"data: a\r\n"),
        count_events(b"\r\ndata: b\r\n\r\n", b"\r\n"),
    ]


def test_newline_at_a_chunk_start_is_not_an_event_on_its_own() -> None:
    """A chunk starting with a newline ends no event when the previous one did not end a line."""
    assert 0 == count_events(b"\ndata: b", b"a")


def test_lf_stream_split_anywhere() -> None:
    """An LF-framed stream cut in two at any byte still counts three events."""
    splits = range(1, len(LF_STREAM))
    assert {s: 3 for s in splits} == {
        s: count_in_chunks([LF_STREAM[:s], LF_STREAM[s:]]) for s in splits
    }


def test_lf_stream_byte_by_byte() -> None:
    """An LF-framed stream relayed one byte at a time still counts three events."""
    assert 3 == count_in_chunks([LF_STREAM[i : i + 1] for i in range(len(LF_STREAM))])


def crlf_splits(*, inside_blank_line: bool) -> list[int]:
    """Cut points of CRLF_STREAM, those between a blank line's CR and LF or all the others."""
    return [
        i
        for i in range(1, len(CRLF_STREAM))
        if CRLF_STREAM[:i].endswith(b"\r\n\r") == inside_blank_line
    ]


def test_crlf_stream_split_anywhere_else() -> None:
    """A CRLF-framed stream cut anywhere but inside a blank line's CRLF counts three events."""
    splits = crlf_splits(inside_blank_line=False)
    assert {s: 3 for s in splits} == {
        s: count_in_chunks([CRLF_STREAM[:s], CRLF_STREAM[s:]]) for s in splits
    }


def test_crlf_stream_split_inside_the_blank_line() -> None:
    """A CRLF-framed stream cut between the CR and LF of a blank line still counts three events."""
    splits = crlf_splits(inside_blank_line=True)
    assert 3 == len(splits)
    assert {s: 3 for s in splits} == {
        s: count_in_chunks([CRLF_STREAM[:s], CRLF_STREAM[s:]]) for s in splits
    }


# --- usage -------------------------------------------------------------------------------


def test_usage_of_a_json_response() -> None:
    """A chat completion's usage gives prompt and completion tokens."""
    body = (
        b'{"id":"c1","choices":[{"message":{"content":"hi"}}],'
        b'"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}'
    )
    assert Usage(prompt=12, completion=34) == usage_in(body)


def test_usage_with_spaces_and_details() -> None:
    """Whitespace and nested token details do not confuse the scan."""
    body = (
        b'{"usage": {\n  "prompt_tokens" : 7,\n  "prompt_tokens_details": {"cached_tokens": 3},'
        b'\n  "completion_tokens":\t9\n}}'
    )
    assert Usage(prompt=7, completion=9) == usage_in(body)


def test_usage_null_then_real_usage() -> None:
    """In a stream, chunks with "usage": null come before the final usage chunk; that one counts."""
    tail = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        b'data: {"choices":[{"delta":{}}],"usage": null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert Usage(prompt=5, completion=2) == usage_in(tail)


def test_last_usage_wins() -> None:
    """When the tail holds several usage objects, the last one is the count."""
    tail = (
        b'data: {"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
        b'data: {"usage":{"prompt_tokens":5,"completion_tokens":9}}\n\n'
    )
    assert Usage(prompt=5, completion=9) == usage_in(tail)


def test_missing_completion_tokens_counts_zero() -> None:
    """An embeddings usage has prompt tokens only: completion is 0."""
    body = b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}'
    assert Usage(prompt=8, completion=0) == usage_in(body)


@pytest.mark.parametrize(
    "tail",
    [
        b"",
        b'{"choices":[{"message":{"content":"no usage here"}}]}',
        b'data: {"choices":[],"usage":null}\n\ndata: [DONE]\n\n',
        b'{"choices":[{"message":{"content":"\\"prompt_tokens\\": 99"}}],"usage":null}',
    ],
)
def test_no_usage(tail: bytes) -> None:
    """No usage object (or a null one) gives None."""
    assert usage_in(tail) is None


def test_usage_key_inside_content_is_escaped() -> None:
    """Token names inside a string value are escaped in JSON, so they are not read as counts."""
    tail = (
        b'{"choices":[{"message":{"content":"\\"usage\\": {\\"prompt_tokens\\": 99}"}}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":6}}'
    )
    assert Usage(prompt=4, completion=6) == usage_in(tail)


def test_usage_in_reads_anthropic_and_responses_names() -> None:
    """input_tokens/output_tokens (Anthropic Messages, Responses API) count as prompt/completion."""
    responses = (
        b'"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":5}'
    )
    assert Usage(prompt=11, completion=5) == usage_in(responses)
    delta = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":3}}\n\n'
    assert Usage(prompt=0, completion=3) == usage_in(delta)


def test_usage_with_only_completion_tokens() -> None:
    """A usage object with only completion tokens counts them, prompt as 0."""
    assert Usage(prompt=0, completion=4) == usage_in(b'{"usage":{"completion_tokens":4}}')


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (LF_STREAM, True),
        (CRLF_STREAM, True),
        (b"data: [DONE]\n\n", True),
        (b"data:[DONE]\n\n", True),
        (b"data: [DONE]", False),  # not terminated: the client cannot have read it as an event
        (b"data: [DONE]\n", False),
        (LF_STREAM[: -len(b"data: [DONE]\n\n")], False),  # the last token, no end marker
        (b'event: message_stop\ndata: {"type":"message_stop"}\n\n', True),
        (b'event: response.completed\ndata: {"type":"response.completed"}\n\n', True),
        (b'data: {"error": {"type": "backend_timeout"}}\n\n', False),
        (b'data: {"content": "[DONE]"}\n\ndata: {"x": 1}\n\n', False),  # the marker is not last
        (b"", False),
    ],
)
def test_ends_stream(tail: bytes, expected: bool) -> None:
    """A stream is complete when its tail ends with the protocol's last event, terminated."""
    assert expected == ends_stream(tail)


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b"data: x\n\n", True),
        (b"data: x\r\n\r\n", True),
        (b"data: x\r\r", True),
        (b"data: x\n", False),
        (b'data: {"choices":[{"index', False),
    ],
)
def test_ends_event(tail: bytes, expected: bool) -> None:
    """A tail ends at an event boundary only after a blank line, in any SSE line ending."""
    assert expected == ends_event(tail)
