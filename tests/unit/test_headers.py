"""Which headers cross the gateway in each direction, and the request id."""

from __future__ import annotations

import re

import pytest
from multidict import CIMultiDict

from proxy.headers import downstream_headers, is_event_stream, upstream_headers
from proxy.middleware import request_id_of


def up(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """The header lines sent upstream for raw client headers."""
    return upstream_headers(pairs, request_id="req-1")


def down(pairs: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The headers relayed to the client for raw backend headers."""
    return downstream_headers(pairs, request_id="req-1")


HOP_BY_HOP = [
    (b"Connection", b"keep-alive"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Authenticate", b"Basic"),
    (b"Proxy-Authorization", b"Basic eDp5"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"TE", b"trailers"),
    (b"Trailer", b"X-Checksum"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Upgrade", b"h2c"),
]
ID_LINE = b"X-Request-ID: req-1\r\n"

# --- upstream ----------------------------------------------------------------------------


def test_upstream_keeps_end_to_end_headers() -> None:
    """End-to-end headers go upstream as sent (case, order, repeats), then the request id."""
    sent = [
        (b"Content-Type", b"application/json"),
        (b"accept", b"text/event-stream"),
        (b"User-Agent", b"OpenAI/Python 1.50.0"),
        (b"X-Custom", b"one"),
        (b"x-custom", b"two"),
    ]
    expected = (
        b"Content-Type: application/json\r\n"
        b"accept: text/event-stream\r\n"
        b"User-Agent: OpenAI/Python 1.50.0\r\n"
        b"X-Custom: one\r\n"
        b"x-custom: two\r\n" + ID_LINE
    )
    assert expected == up(sent)


def test_upstream_of_no_headers_is_the_request_id() -> None:
    """A request with no headers still goes upstream with its id."""
    assert ID_LINE == up([])


def test_upstream_drops_hop_by_hop_headers() -> None:
    """RFC 9110 hop-by-hop headers never go upstream, in any letter case."""
    lowered = [(n.lower(), v) for n, v in HOP_BY_HOP]
    assert b"Accept: */*\r\n" + ID_LINE == up([*HOP_BY_HOP, *lowered, (b"Accept", b"*/*")])


def test_upstream_drops_headers_listed_in_connection() -> None:
    """Headers the client named in Connection are hop-by-hop too, in any case and spacing."""
    sent = [
        (b"Connection", b"close, X-Hop ,x-other"),
        (b"connection", b"X-Third"),
        (b"X-Hop", b"1"),
        (b"X-Other", b"2"),
        (b"x-third", b"3"),
        (b"X-Kept", b"4"),
    ]
    assert b"X-Kept: 4\r\n" + ID_LINE == up(sent)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"Authorization", b"Bearer sk-gateway"),
        (b"authorization", b"Basic dDpzay1nYXRld2F5"),
        (b"x-api-key", b"sk-gateway"),
        (b"X-Goog-Api-Key", b"sk-gateway"),
        (b"Host", b"gateway.example:8000"),
        (b"Content-Length", b"123"),
        (b"Expect", b"100-continue"),
        (b"X-Request-ID", b"from-client"),
    ],
)
def test_upstream_never_gets_credentials_host_or_length(name: bytes, value: bytes) -> None:
    """The client's gateway key, Host, Content-Length, Expect and request id are not forwarded."""
    assert ID_LINE == up([(name, value)])


def test_upstream_keeps_multipart_boundary() -> None:
    """Content-Type goes upstream whole, multipart boundary included."""
    content_type = b"multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW"
    assert b"Content-Type: " + content_type + b"\r\n" + ID_LINE == up(
        [(b"Content-Type", content_type)]
    )


# --- downstream --------------------------------------------------------------------------


def test_downstream_keeps_end_to_end_headers() -> None:
    """The backend's end-to-end headers reach the client, repeats included, plus the id."""
    pairs = [
        (b"Content-Type", b"application/json"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"x-ratelimit-remaining", b"9"),
    ]
    expected = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("x-ratelimit-remaining", "9"),
            ("X-Request-ID", "req-1"),
        ]
    )
    assert expected == down(pairs)


def test_downstream_drops_hop_by_hop_and_length() -> None:
    """Hop-by-hop headers and Content-Length from the backend are not relayed."""
    pairs = [*HOP_BY_HOP, (b"content-length", b"10"), (b"Content-Type", b"application/json")]
    expected = CIMultiDict([("Content-Type", "application/json"), ("X-Request-ID", "req-1")])
    assert expected == down(pairs)


def test_downstream_drops_headers_listed_in_connection() -> None:
    """Headers the backend named in Connection are not relayed."""
    pairs = [(b"Connection", b"X-Backend-Hop"), (b"X-Backend-Hop", b"1"), (b"X-Model", b"q")]
    assert CIMultiDict([("X-Model", "q"), ("X-Request-ID", "req-1")]) == down(pairs)


def test_downstream_sets_the_request_id() -> None:
    """The response carries the gateway's request id, not the backend's."""
    assert ["req-1"] == down([(b"x-request-id", b"backend-id")]).getall("X-Request-ID")


@pytest.mark.parametrize(
    "content_type", ["text/event-stream", "text/event-stream; charset=utf-8", "Text/Event-Stream"]
)
def test_downstream_event_stream_is_marked_unbuffered(content_type: str) -> None:
    """SSE responses get Cache-Control: no-cache and X-Accel-Buffering: no."""
    expected = CIMultiDict(
        [
            ("Content-Type", content_type),
            ("X-Request-ID", "req-1"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
        ]
    )
    assert expected == down([(b"Content-Type", content_type.encode())])


def test_downstream_lowercase_content_type_is_seen() -> None:
    """A backend that sends `content-type` in lower case still gets its stream marked."""
    headers = down([(b"content-type", b"text/event-stream")])
    assert (["no-cache"], ["no"]) == (
        headers.getall("Cache-Control"),
        headers.getall("X-Accel-Buffering"),
    )


def test_downstream_event_stream_keeps_the_backends_cache_control() -> None:
    """A backend's own Cache-Control on a stream is kept; X-Accel-Buffering is forced to no."""
    headers = down(
        [
            (b"Content-Type", b"text/event-stream"),
            (b"cache-control", b"no-store"),
            (b"X-Accel-Buffering", b"yes"),
        ]
    )
    assert (["no-store"], ["no"]) == (
        headers.getall("Cache-Control"),
        headers.getall("X-Accel-Buffering"),
    )


def test_downstream_json_is_not_marked() -> None:
    """A JSON response gets neither Cache-Control nor X-Accel-Buffering from the gateway."""
    headers = down([(b"Content-Type", b"application/json")])
    assert ("Cache-Control" in headers, "X-Accel-Buffering" in headers) == (False, False)


def test_downstream_non_ascii_value_survives() -> None:
    """Header bytes outside ASCII are relayed as the same bytes (latin-1 round trip)."""
    value = "attachment; filename=caf\u00e9.txt".encode()
    headers = down([(b"Content-Disposition", value)])
    assert value == headers["Content-Disposition"].encode("latin-1")


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/event-stream", True),
        ("text/event-stream;charset=utf-8", True),
        (" TEXT/EVENT-STREAM ; charset=UTF-8", True),
        ("application/json", False),
        ("text/event-streams", False),
        ("text/plain; x=text/event-stream", False),
        ("", False),
    ],
)
def test_is_event_stream(content_type: str, expected: bool) -> None:
    """Only the media type counts, case-insensitively and ignoring parameters."""
    assert expected == is_event_stream(content_type)


# --- request id (middleware helper) ------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["abc-123", "0f1e2d3c4b5a", "trace:span/1+2=3@host_.x", "x" * 128]
)
def test_request_id_of_keeps_a_sane_client_value(value: str) -> None:
    """A client's X-Request-ID made of token characters, up to 128, is used as is."""
    assert value == request_id_of(value)


@pytest.mark.parametrize(
    "value", [None, "", "x" * 129, "has space", "line\nbreak", 'quote"', "caf\u00e9", "a,b"]
)
def test_request_id_of_makes_a_new_one_otherwise(value: str | None) -> None:
    """A missing, overlong or unsafe X-Request-ID is replaced by a fresh 32-hex id."""
    made = request_id_of(value)
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert made != request_id_of(value)
