"""The limiter's RESP framing (proxy.resp): commands packed, replies parsed whole or not yet."""

from __future__ import annotations

import pytest

from proxy.resp import RespConnectionError, RespError, pack, parse


def test_pack_is_an_array_of_bulk_strings() -> None:
    """Strings, bytes, ints and floats (their exact repr) as RESP bulk strings."""
    assert b"*4\r\n$7\r\nEVALSHA\r\n$2\r\n\xc3\xa9\r\n$1\r\n3\r\n$3\r\n0.1\r\n" == pack(
        ["EVALSHA", "\u00e9", 3, 0.1]
    )


@pytest.mark.parametrize(
    ("wire", "value"),
    [
        (b"+PONG\r\n", b"PONG"),
        (b":42\r\n", 42),
        (b"$5\r\nhe\r\no\r\n", b"he\r\no"),
        (b"$-1\r\n", None),
        (b"*3\r\n:1\r\n$3\r\n1.5\r\n*1\r\n:0\r\n", [1, b"1.5", [0]]),
        (b"*0\r\n", []),
    ],
)
def test_parse_each_kind(wire: bytes, value: object) -> None:
    """Each reply kind, and where the next reply starts."""
    assert (value, len(wire)) == parse(wire + b"+NEXT\r\n", 0)


def test_an_error_reply_is_returned_not_raised() -> None:
    """`-NOSCRIPT ...` comes back as a RespError for the caller waiting on it."""
    reply, end = parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert (RespError, "NOSCRIPT No matching script", 30) == (type(reply), str(reply), end)


@pytest.mark.parametrize("cut", [1, 3, 7, 12, 20])
def test_a_reply_cut_anywhere_is_not_there_yet(cut: int) -> None:
    """A reply split across reads parses only once all of it is in."""
    wire = b"*2\r\n$8\r\nabcdefgh\r\n:7\r\n"
    assert parse(wire[:cut], 0) is None
    assert ([b"abcdefgh", 7], len(wire)) == parse(wire, 0)


def test_garbage_is_a_connection_error() -> None:
    """Bytes that are no RESP reply end the connection rather than being guessed at."""
    with pytest.raises(RespConnectionError):
        parse(b"HTTP/1.1 400\r\n", 0)
