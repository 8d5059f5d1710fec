"""Requests aiohttp refuses on its own: the gateway's envelope, never the request's bytes
(a header there may hold a key) in the answer or in any log line; Expect and the HTTP
version are answered by the gateway, after authentication."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tests.conftest import one_backend

KEY = "sk-very-secret-key-0123456789"
KEYED = {"API_KEYS": KEY}


async def exchange(url: str, raw: bytes, *, within_s: float = 5) -> bytes:
    """Send exact bytes; everything the gateway answers before it closes (or `within_s`)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    received = b""
    try:
        async with asyncio.timeout(within_s):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        pass
    finally:
        writer.close()
    return received


MALFORMED = {
    "bare LF in a header line": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
        + b"\nX-Other: 1\r\n\r\n"
    ),
    "DEL byte in Authorization": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
        + b"\x7f\r\n\r\n"
    ),
    "control byte in a Gemini ?key=": (
        b"POST /gemini/v1/models/m:generateContent?key=" + KEY.encode()
        + b"\x01 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    ),
}  # fmt: skip


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_never_echoes_its_bytes(
    gateway_factory, upstream, caplog, raw
) -> None:
    """aiohttp's own 400 is the gateway's JSON envelope with an X-Request-ID, an access-log
    line is written, and the key appears in no answer and no log line."""
    gw = await gateway_factory(one_backend(upstream.url), env=KEYED)
    with caplog.at_level(logging.DEBUG):
        answer = await exchange(gw.url, raw)
        await asyncio.sleep(0.05)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:300]
    assert b"x-request-id:" in head.lower()
    assert "invalid_request" == json.loads(body)["error"]["type"]
    assert KEY.encode() not in answer
    assert KEY not in caplog.text
    line = json.loads(gw.access_lines()[-1])
    assert (400, "unmatched", "invalid_request") == (line["status"], line["route"], line["error"])
    assert KEY not in b"\n".join(gw.access_lines()).decode()
    assert [] == upstream.posts


async def test_a_flood_of_malformed_requests_is_logged_once(
    gateway_factory, upstream, caplog
) -> None:
    """Fifty malformed requests in a burst make one log line, not fifty."""
    gw = await gateway_factory(one_backend(upstream.url))
    raw = MALFORMED["DEL byte in Authorization"]
    with caplog.at_level(logging.INFO):
        await asyncio.gather(*(exchange(gw.url, raw) for _ in range(50)))
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert 1 == len(lines)
    assert [] == [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_unknown_expect_is_a_417_without_echo(gateway_factory, upstream) -> None:
    """An Expect the gateway cannot meet is a 417 envelope that does not echo its value."""
    gw = await gateway_factory(one_backend(upstream.url), env=KEYED)
    answer = await exchange(
        gw.url,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
        + b"\r\nExpect: " + KEY.encode() + b"\r\nContent-Length: 2\r\n\r\n{}",
    )  # fmt: skip
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417")
    assert "invalid_request" == json.loads(body)["error"]["type"]
    assert KEY.encode() not in answer
    assert [] == upstream.posts


async def test_no_100_continue_before_the_key_is_checked(gateway_factory, upstream) -> None:
    """Without a valid key, `Expect: 100-continue` gets the 401 and no interim 100 first, so
    the client never sends its body."""
    gw = await gateway_factory(one_backend(upstream.url), env=KEYED)
    answer = await exchange(
        gw.url,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 30\r\n\r\n",
        within_s=1,
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"100 Continue" not in answer


async def test_100_continue_after_a_good_key(gateway_factory, upstream) -> None:
    """With a valid key, `Expect: 100-continue` is answered 100 before the body is read, and
    the request goes on as usual (the Expect header itself is not sent upstream)."""
    gw = await gateway_factory(one_backend(upstream.url), env=KEYED)
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"model": "m", "messages": []}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
        + b"\r\nExpect: 100-continue\r\nConnection: close\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )  # fmt: skip
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"HTTP/1.1 100 Continue\r\n\r\n" == interim
    writer.write(body)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert "expect" not in upstream.last.headers


async def test_http_2_request_line_is_a_505_in_http_1_1(gateway_factory, upstream) -> None:
    """A request line claiming HTTP/2.0 is answered 505 in HTTP/1.1 framing (it was answered
    `HTTP/2.0 200 OK` over HTTP/1.1 framing)."""
    gw = await gateway_factory(one_backend(upstream.url))
    answer = await exchange(gw.url, b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", within_s=1)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505"), answer[:200]
    assert "invalid_request" == json.loads(body)["error"]["type"]
