"""ChatStreamParser: raw OpenAI-style SSE bytes in any chunking -> decoded events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.errors import BackendUnreachable
from proxy.translate.chat_stream import MAX_EVENT_BYTES, ChatStreamParser

PAYLOADS = Path(__file__).parent / "payloads"


def load(name: str) -> list[dict[str, object]]:
    chunks: list[dict[str, object]] = json.loads((PAYLOADS / name).read_text())
    return chunks


def sse(chunks: list[dict[str, object]], separator: bytes = b"\n\n") -> bytes:
    body = b"".join(b"data: " + json.dumps(c).encode() + separator for c in chunks)
    return body + b"data: [DONE]" + separator


def feed_all(parser: ChatStreamParser, pieces: list[bytes]) -> list[dict[str, object] | None]:
    return [event for piece in pieces for event in parser.feed(piece)]


def test_whole_body_in_one_chunk() -> None:
    """A recorded vLLM stream fed at once gives every chunk in order, then None for [DONE]."""
    chunks = load("chat_stream_text.json")
    assert [*chunks, None] == ChatStreamParser().feed(sse(chunks))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_any_chunking_gives_the_same_events(size: int) -> None:
    """Events split across chunks of any size, CRLF pairs included, decode the same."""
    chunks = load("chat_stream_tool_call.json")
    for separator in (b"\n\n", b"\r\n\r\n"):
        body = sse(chunks, separator)
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        assert [*chunks, None] == feed_all(ChatStreamParser(), pieces)


def test_events_complete_only_at_the_blank_line() -> None:
    """A data line without its blank line is held back until the blank line comes."""
    parser = ChatStreamParser()
    assert [] == parser.feed(b'data: {"a": 1}\n')
    assert [{"a": 1}] == parser.feed(b"\n")


def test_comments_and_other_fields_are_ignored() -> None:
    """Comment lines (': ping'), event:, id: and retry: fields add nothing to the data."""
    body = b': ping\n\nevent: message\nid: 7\nretry: 10\ndata: {"a": 1}\n\n:keep-alive\n\n'
    assert [{"a": 1}] == ChatStreamParser().feed(body)


def test_event_with_empty_data_is_skipped() -> None:
    """A keep-alive 'data:' with nothing after it is no event, as the SSE spec says."""
    assert [{"a": 1}] == ChatStreamParser().feed(b'data:\n\ndata: \n\ndata: {"a": 1}\n\n')


def test_multiline_data_is_joined_with_newlines() -> None:
    """Several data: lines of one event are one JSON text joined with '\\n'."""
    body = b'data: {"a":\ndata: [1,\ndata: 2]}\n\n'
    assert [{"a": [1, 2]}] == ChatStreamParser().feed(body)


def test_data_without_space_and_bare_cr_line_ends() -> None:
    """'data:' with no space and lines ended by a lone CR (per the SSE spec) both decode."""
    parser = ChatStreamParser()
    events = parser.feed(b'data:{"a": 1}\r\rdata:[DONE]\r\r')
    assert [{"a": 1}, None] == events + parser.flush()  # the last CR might start a CRLF


def test_cr_at_chunk_end_waits_for_the_next_byte() -> None:
    """A CR at the end of a chunk is not taken for a line end before the LF after it arrives."""
    parser = ChatStreamParser()
    assert [] == parser.feed(b'data: {"a": 1}\r')
    assert [] == parser.feed(b"\n\r")
    assert [{"a": 1}] == parser.feed(b"\n")


def test_error_event_is_returned_as_is() -> None:
    """An event with a top-level error key comes back unchanged for the caller to judge."""
    error = {"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}}
    assert [error] == ChatStreamParser().feed(b"data: " + json.dumps(error).encode() + b"\n\n")


def test_flush_returns_an_event_cut_off_by_the_body_end() -> None:
    """A last event with no blank line after it is given back by flush()."""
    parser = ChatStreamParser()
    assert [{"a": 1}] == parser.feed(b'data: {"a": 1}\n\ndata: [DONE]')
    assert [None] == parser.flush()
    assert [] == parser.flush()


def test_invalid_json_is_backend_unreachable() -> None:
    """An event whose data is not JSON raises BackendUnreachable saying so."""
    with pytest.raises(BackendUnreachable) as caught:
        ChatStreamParser().feed(b"data: {not json\n\n")
    assert "not valid JSON" in caught.value.message


def test_non_object_json_is_backend_unreachable() -> None:
    """An event whose JSON is not an object raises BackendUnreachable."""
    with pytest.raises(BackendUnreachable) as caught:
        ChatStreamParser().feed(b"data: [1, 2]\n\n")
    assert "not a JSON object" in caught.value.message


def test_oversized_event_split_over_chunks_is_refused() -> None:
    """One event growing past 8 MiB across chunks raises, without waiting for its end."""
    parser = ChatStreamParser()
    parser.feed(b'data: {"a": "')
    with pytest.raises(BackendUnreachable) as caught:
        for _ in range(9):
            parser.feed(b"x" * (1024 * 1024))
    assert "backend sent an oversized stream event" == caught.value.message


def test_oversized_event_over_many_data_lines_is_refused() -> None:
    """Many short data lines that add up past the limit raise too."""
    parser = ChatStreamParser(max_event_bytes=1000)
    with pytest.raises(BackendUnreachable):
        parser.feed(b"data: xxxxxxxxx\n" * 200)


def test_many_events_beyond_the_limit_in_total_are_fine() -> None:
    """The bound is per event: a long stream of small events is never refused."""
    parser = ChatStreamParser(max_event_bytes=1000)
    events = feed_all(parser, [b'data: {"n": 1}\n\n' * 100 for _ in range(10)])
    assert 1000 == len(events)
    assert 8 * 1024 * 1024 == MAX_EVENT_BYTES
