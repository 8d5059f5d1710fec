"""Issue 8, the upstream side: a backend that writes hostile or broken bytes, seen through the
gateway by two clients one after the other. Each test asserts the safe outcome for the first
client and that nothing of its exchange reaches the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import aiohttp

from tests.conftest import one_backend, wait_for
from tests.integration.test_upstream_client import RawServer, ok

NO_HEALTH = "health: {interval_s: 3600}\n"
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
HEALTH_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
ANSWER_1 = b'{"answer": "for client 1"}'
ANSWER_2 = b'{"answer": "for client 2"}'


def json_ok(body: bytes, extra: bytes = b"") -> bytes:
    return ok(body, b"Content-Type: application/json\r\n" + extra)


def posts_answered(first: list[bytes | float]) -> object:
    """A backend: health GETs answered (and closed); the first POST answered with `first`
    (bytes written in order, a float a pause in seconds), every later POST with ANSWER_2,
    on a connection kept open."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        while True:
            head = await s.read_request(reader)
            if head.startswith(b"GET"):
                writer.write(HEALTH_OK)
                await writer.drain()
                return
            posts = sum(1 for r in s.requests if r.startswith(b"POST"))
            for piece in first if posts == 1 else [json_ok(ANSWER_2)]:
                if isinstance(piece, float):
                    await asyncio.sleep(piece)
                else:
                    writer.write(piece)
                    await writer.drain()

    return serve


@contextlib.asynccontextmanager
async def hostile(gateway_factory, first: list[bytes | float]):
    server = RawServer(posts_answered(first))  # type: ignore[arg-type]
    url = await server.start()
    try:
        gw = await gateway_factory(one_backend(url, extra=NO_HEALTH))
        await wait_for(lambda: server.connections >= 1)  # the start-up probe
        await asyncio.sleep(0.05)
        yield server, gw
    finally:
        await server.close()


async def raw_post(url: str) -> bytes:
    """Everything the gateway sends back to one POST (Connection: close), within 3 s."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(CHAT), CHAT)
    )
    got = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(3):
            while data := await reader.read(65536):
                got += data
    writer.close()
    return got


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    """The status and (de-chunked) body of one answer the gateway wrote."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    if b"transfer-encoding: chunked" in head.lower():
        out = b""
        while body:
            size, _, rest = body.partition(b"\r\n")
            length = int(size, 16)
            out, body = out + rest[:length], rest[length + 2 :]
            if length == 0:
                break
        body = out
    return status, body


async def two_clients(gw) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    first = status_and_body(await raw_post(gw.url))
    second = status_and_body(await raw_post(gw.url))
    return first, second


def error_type(body: bytes) -> str:
    return json.loads(body)["error"]["type"]


# item 3: interim answers --------------------------------------------------------------------


async def test_interim_answer_never_becomes_an_answer(gateway_factory) -> None:
    """A 100 Continue, then the real answer 0.3 s later: client 1 gets the real answer and
    client 2 its own (before: client 1 got the 100, client 2 got client 1's answer)."""
    first = [b"HTTP/1.1 100 Continue\r\n\r\n", 0.3, json_ok(ANSWER_1)]
    async with hostile(gateway_factory, first) as (_server, gw):
        assert ((200, ANSWER_1), (200, ANSWER_2)) == await two_clients(gw)


async def test_early_hints_in_a_row_are_skipped(gateway_factory) -> None:
    """103 Early Hints twice (each with a Link header), split across reads, then the answer:
    relayed as the one answer, none of the hints' headers with it."""
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    first = [hint, 0.05, hint[:20], 0.05, hint[20:] + b"HTTP/1.1 200", 0.05, json_ok(ANSWER_1)[12:]]
    async with hostile(gateway_factory, first) as (_server, gw):
        raw = await raw_post(gw.url)
        assert (200, ANSWER_1) == status_and_body(raw)
        assert b"link:" not in raw.lower()
        assert (200, ANSWER_2) == status_and_body(await raw_post(gw.url))


async def test_switching_protocols_is_a_502(gateway_factory) -> None:
    """A 101 Switching Protocols is a 502 backend_unreachable and the connection is closed;
    client 2 is served on a new connection."""
    first = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"]
    first += [0.05, b"\x00\x00\x12\x04"]  # the start of an HTTP/2 SETTINGS frame
    async with hostile(gateway_factory, first) as (_server, gw):
        (status, body), second = await two_clients(gw)
        assert ((502, "backend_unreachable"), (200, ANSWER_2)) == (
            (status, error_type(body)),
            second,
        )


# item 4: bytes after a complete answer ------------------------------------------------------

STRAY = json_ok(b'{"answer": "stray"}')


async def test_extra_response_in_the_same_write_is_dropped(gateway_factory) -> None:
    """An extra response written with the first one reaches nobody: client 1 gets its answer
    whole, client 2 its own, on a new connection."""
    async with hostile(gateway_factory, [json_ok(ANSWER_1) + STRAY]) as (server, gw):
        before = server.connections
        assert ((200, ANSWER_1), (200, ANSWER_2)) == await two_clients(gw)
        assert 2 == server.connections - before  # the first one closed, a new one


async def test_content_length_too_short_leaks_nothing(gateway_factory) -> None:
    """A Content-Length shorter than the body sent: the rest reaches no client."""
    lying = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
    body = b'{"a": 1}  ' + STRAY
    async with hostile(gateway_factory, [lying + body]) as (_server, gw):
        assert ((200, body[:10]), (200, ANSWER_2)) == await two_clients(gw)


async def test_late_stray_bytes_on_an_idle_connection_reach_nobody(gateway_factory) -> None:
    """Half a stray response arriving while the connection idles in the pool, the rest after
    the next request: the idle connection is closed at the first byte, client 2 gets its own
    answer (before: client 2 got the stray answer)."""
    half = STRAY.index(b"Content-Length") + 10  # no header complete yet
    first = [json_ok(ANSWER_1), 0.1, STRAY[:half], 0.5, STRAY[half:]]
    async with hostile(gateway_factory, first) as (_server, gw):
        one = status_and_body(await raw_post(gw.url))
        await asyncio.sleep(0.3)  # the half stray head has arrived
        two = status_and_body(await raw_post(gw.url))
        assert ((200, ANSWER_1), (200, ANSWER_2)) == (one, two)


async def test_answer_before_the_body_was_sent_is_not_reused(gateway_factory) -> None:
    """A backend answering before reading a large request body: the answer is relayed, the
    unsent body is never taken for the next request, client 2 gets its own answer."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        head = await s.read_request(reader, body=False)
        if head.startswith(b"GET"):
            writer.write(HEALTH_OK)
            await writer.drain()
            return
        if sum(1 for r in s.requests if r.startswith(b"POST")) == 1:
            writer.write(json_ok(ANSWER_1))
            await writer.drain()
            await asyncio.sleep(2)
            return
        _, _, rest = head.lower().partition(b"content-length:")
        await reader.readexactly(int(rest.split(b"\r\n")[0]))
        writer.write(json_ok(ANSWER_2))
        await writer.drain()
        await s.until_closed(reader)

    server = RawServer(serve)
    url = await server.start()
    try:
        gw = await gateway_factory(one_backend(url, extra=NO_HEALTH))
        big = b'{"model": "m", "pad": "' + b"x" * (24 * 1024 * 1024) + b'"}'
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", data=io.BytesIO(big)) as r:
                one = (r.status, await r.read())
            async with s.post(gw.url + "/v1/chat/completions", data=CHAT) as r:
                two = (r.status, await r.read())
        assert ((200, ANSWER_1), (200, ANSWER_2)) == (one, two)
    finally:
        await server.close()


# item 8: answers ended by the close ---------------------------------------------------------

CLOSE_ENDED = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
EVENTS = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n' + b"data: [DONE]\n\n"


async def test_answer_ended_by_close_is_relayed_whole(gateway_factory) -> None:
    """An HTTP/1.0 stream ended by the close is relayed whole with the chunked terminator and
    logged as a success (before: no terminator, logged backend_unreachable)."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        head = await s.read_request(reader)
        if head.startswith(b"GET"):
            writer.write(HEALTH_OK)
        else:
            writer.write(CLOSE_ENDED + EVENTS[:20])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(EVENTS[20:])
        await writer.drain()
        writer.close()

    server = RawServer(serve)
    url = await server.start()
    try:
        gw = await gateway_factory(one_backend(url, extra=NO_HEALTH))
        raw = await raw_post(gw.url)
        assert raw.endswith(b"\r\n0\r\n\r\n")  # the chunked terminator: a whole body
        assert (200, EVENTS) == status_and_body(raw)
        await wait_for(lambda: len(gw.access_lines()) == 1)
        line = json.loads(gw.access_lines()[0])
        assert (200, None) == (line["status"], line["error"])
    finally:
        await server.close()


async def test_json_ended_by_close_is_relayed_whole(gateway_factory) -> None:
    """A `Connection: close` JSON answer without a length is relayed whole through the SDK-ish
    client (aiohttp reads it without a payload error)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        head = await s.read_request(reader)
        writer.write(HEALTH_OK if head.startswith(b"GET") else answer + ANSWER_1)
        await writer.drain()
        writer.close()

    server = RawServer(serve)
    url = await server.start()
    try:
        gw = await gateway_factory(one_backend(url, extra=NO_HEALTH))
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", data=CHAT) as r:
                assert (200, ANSWER_1) == (r.status, await r.read())
    finally:
        await server.close()


# item 9: head limits ------------------------------------------------------------------------


async def test_oversized_head_is_a_502_never_relayed(gateway_factory) -> None:
    """A 4 MiB header line is a 502 backend_unreachable naming the limit; not a byte of it
    reaches the client; client 2 is served."""
    first = [b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (4 * 1024 * 1024) + b"\r\n\r\n"]
    async with hostile(gateway_factory, first) as (_server, gw):
        raw = await raw_post(gw.url)
        status, body = status_and_body(raw)
        assert (502, "backend_unreachable") == (status, error_type(body))
        assert b"bbbb" not in raw
        assert b"64 KiB" in body
        assert (200, ANSWER_2) == status_and_body(await raw_post(gw.url))


async def test_too_many_headers_is_a_502(gateway_factory) -> None:
    """101 headers in a head is a 502 backend_unreachable naming the limit."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101))
    async with hostile(gateway_factory, [head + b"Content-Length: 2\r\n\r\n{}"]) as (_server, gw):
        (status, body), second = await two_clients(gw)
        assert ((502, "backend_unreachable"), (200, ANSWER_2)) == (
            (status, error_type(body)),
            second,
        )
        assert b"100 headers" in body
