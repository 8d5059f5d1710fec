"""The upstream HTTP/1.1 client on its own, at the byte level, against raw loopback servers.

Each server writes exact bytes (split across reads where the test says so), and each test
calls `send()`, `fetch()` or the pool directly, as httpcore and uvicorn test their own
clients: framing (lengths, chunks, the close), interim answers, head limits, the pool's cap,
waiters, idle sweep and close, and the one stale keep-alive retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from proxy.config import BackendConfig
from proxy.errors import BackendUnreachable
from proxy.upstream import Backend, Response, fetch, send

Serve = Callable[["RawServer", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    """A keep-alive 200 with a Content-Length."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


class RawServer:
    """A loopback backend whose every connection runs `serve(server, number, reader, writer)`;
    it records each request it read and how many connections are (and were) open."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.connections = 0
        self.live = 0
        self.most_live = 0
        self.requests: list[bytes] = []
        self.closed = 0  # connections the client closed (EOF or reset seen)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.live += 1
        self.most_live = max(self.most_live, self.live)
        self.writers.add(writer)
        try:
            await self.serve(self, self.connections, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.live -= 1
            self.writers.discard(writer)
            writer.transport.abort()

    async def read_request(self, reader: asyncio.StreamReader, body: bool = True) -> bytes:
        """One request's head (and its Content-Length body unless `body` is False)."""
        head = await reader.readuntil(b"\r\n\r\n")
        if body:
            _, _, rest = head.lower().partition(b"content-length:")
            head += await reader.readexactly(int(rest.split(b"\r\n")[0] or b"0"))
        self.requests.append(head)
        return head

    async def until_closed(self, reader: asyncio.StreamReader) -> None:
        """Until the client closes the connection (or 5 s)."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(5):
                while await reader.read(65536):
                    pass
        self.closed += 1

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.transport.abort()
            await self.server.wait_closed()


def answering(*answers: bytes | list[bytes], then_close: bool = False) -> Serve:
    """Answer the n-th request (over all connections) with answers[n], a list being written
    piece by piece with a pause between; later requests get `ok()`. The connection stays
    open for more requests unless `then_close`."""
    pending = list(answers)

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        while True:
            await s.read_request(reader)
            answer = pending.pop(0) if pending else ok()
            for piece in answer if isinstance(answer, list) else [answer]:
                writer.write(piece)
                await writer.drain()
                if isinstance(answer, list):
                    await asyncio.sleep(0.05)
            if then_close:
                await s.until_closed(reader)
                return

    return serve


@contextlib.asynccontextmanager
async def raw_backend(serve: Serve, **config: object):
    """A RawServer and a Backend for it (`config`: BackendConfig fields)."""
    server = RawServer(serve)
    url = await server.start()
    backend = Backend("raw", BackendConfig(url=url, **config), None, connect_s=2.0)  # type: ignore[arg-type]
    try:
        yield server, backend
    finally:
        backend.close()
        await server.close()


async def post(backend: Backend, body: bytes = b"{}") -> Response:
    async with asyncio.timeout(5):
        return await send(backend, "POST", backend.target("/v1/x"), b"", body)


async def exchange(backend: Backend, body: bytes = b"{}") -> tuple[int, bytes]:
    """One POST: status and whole body, the response released."""
    response = await post(backend, body)
    try:
        async with asyncio.timeout(5):
            data = await response.read()
    except BaseException:
        response.close()
        raise
    response.release()
    return response.status, data


async def settled() -> None:
    """Let pending protocol callbacks run (a close, a late read)."""
    for _ in range(5):
        await asyncio.sleep(0.01)


# Framing ------------------------------------------------------------------------------------


async def test_length_answers_share_one_connection() -> None:
    """Two answers framed by Content-Length are read whole on one kept-alive connection."""
    async with raw_backend(answering(ok(b"one"), ok(b"two"))) as (server, backend):
        assert [(200, b"one"), (200, b"two")] == [await exchange(backend) for _ in range(2)]
        assert 1 == server.connections


async def test_connection_close_with_length_is_not_reused() -> None:
    """`Connection: close` with a length: the body is whole, the next request opens a new
    connection."""
    close = ok(b"one", b"Connection: close\r\n")
    async with raw_backend(answering(close, then_close=True)) as (server, backend):
        assert (200, b"one") == await exchange(backend)
        assert (200, b"ok") == await exchange(backend)
        assert 2 == server.connections


CLOSE_DELIMITED = {
    "HTTP/1.1 Connection: close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    "HTTP/1.0": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
    "HTTP/1.0 keep-alive asked, no length": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n",
    "transfer-encoding not chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
}


@pytest.mark.parametrize("head", CLOSE_DELIMITED.values(), ids=CLOSE_DELIMITED.keys())
async def test_answer_ended_by_close_is_complete(head: bytes) -> None:
    """An answer with no length, ended by the backend closing, is complete at the close (not
    a failure), and its connection is not reused."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        writer.write(head + b"first part, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"second part")
        await writer.drain()
        writer.close()

    async with raw_backend(serve) as (_server, backend):
        response = await post(backend)
        async with asyncio.timeout(5):
            body = await response.read()
        assert (200, b"first part, second part", True) == (response.status, body, response.done)
        response.release()
        await settled()
        assert not backend.pool.open


async def test_answer_reset_without_length_is_a_failure() -> None:
    """An answer with no length cut by a reset (not a clean close) is a failure."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\npart")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with raw_backend(serve) as (_server, backend):
        response = await post(backend)
        with pytest.raises(BackendUnreachable):
            async with asyncio.timeout(5):
                await response.read()
        response.close()


async def test_http10_keep_alive_with_length_is_reused() -> None:
    """An HTTP/1.0 answer asking for keep-alive, with a length, keeps its connection."""
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\none"
    async with raw_backend(answering(answer)) as (server, backend):
        assert [(200, b"one"), (200, b"ok")] == [await exchange(backend) for _ in range(2)]
        assert 1 == server.connections


MALFORMED = {
    "garbage status line": b"HTPT/1.1 two hundred\r\n\r\n",
    "status not a number": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nContent-Type text/plain\r\nContent-Length: 0\r\n\r\n",
    "bad content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n1",
    "two content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "NUL in a header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "bare LF in a head": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_head_is_backend_unreachable(answer: bytes) -> None:
    """A head the parser refuses raises BackendUnreachable from send(); the connection closes."""
    async with raw_backend(answering(answer)) as (_server, backend):
        with pytest.raises(BackendUnreachable):
            await post(backend)
        await settled()
        assert not backend.pool.open
        assert (200, b"ok") == await exchange(backend)


# Chunked ------------------------------------------------------------------------------------

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED = {
    "extensions": [CHUNKED_HEAD + b'2;name=value;q="x y"\r\nok\r\n3;last\r\n yo\r\n0;end\r\n\r\n'],
    "CRLFs split across reads": [
        CHUNKED_HEAD + b"2\r",
        b"\nok\r",
        b"\n3\r\n yo\r",
        b"\n0\r",
        b"\n\r",
        b"\n",
    ],
    "trailers": [CHUNKED_HEAD + b"2\r\nok\r\n3\r\n yo\r\n0\r\nX-Checksum: 1\r\nX-More: 2\r\n\r\n"],
    "zero-size last chunk alone": [CHUNKED_HEAD + b"2\r\nok\r\n3\r\n yo\r\n", b"0\r\n\r\n"],
    "one byte per read": [CHUNKED_HEAD] + [bytes([b]) for b in b"2\r\nok\r\n3\r\n yo\r\n0\r\n\r\n"],
}


@pytest.mark.parametrize("pieces", CHUNKED.values(), ids=CHUNKED.keys())
async def test_chunked_edge_cases_decode_and_reuse(pieces: list[bytes]) -> None:
    """Chunked bodies with extensions, split CRLFs, trailers or a late last chunk decode to
    their payload; the connection is reused and the next answer is its own."""
    async with raw_backend(answering(pieces)) as (server, backend):
        response = await post(backend)
        async with asyncio.timeout(5):
            body = await response.read()
        assert (b"ok yo", [b"Transfer-Encoding"]) == (body, [k for k, _ in response.headers])
        response.release()
        assert (200, b"ok") == await exchange(backend)
        assert 1 == server.connections


async def test_last_chunk_arriving_alone_ends_the_body_only_then() -> None:
    """Until the zero-size chunk arrives the body is not done; then it is."""
    gate = asyncio.Event()

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        writer.write(CHUNKED_HEAD + b"2\r\nok\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await s.until_closed(reader)

    async with raw_backend(serve) as (_server, backend):
        response = await post(backend)
        assert b"ok" == await response.read_chunk()
        await settled()
        assert False is response.done
        gate.set()
        async with asyncio.timeout(5):
            assert b"" == await response.read_chunk()
        assert True is response.done
        response.release()


async def test_a_diverted_body_reaches_the_sink_one_piece_per_read() -> None:
    """Chunks that arrive in one read (events sent back to back) reach the sink as one piece,
    their bytes in order, so the relay writes once per read, not once per chunk; a chunk
    split across reads is handed on as far as it came."""
    events = [b"data: %d\n\n" % i for i in range(20)]
    gates = [asyncio.Event(), asyncio.Event()]

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        writer.write(CHUNKED_HEAD)
        await writer.drain()
        await gates[0].wait()
        writer.write(b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"b\r\nhalf")
        await writer.drain()
        await gates[1].wait()
        writer.write(b" done\n\n\r\n0\r\n\r\n")
        await writer.drain()
        await s.until_closed(reader)

    async with raw_backend(serve) as (_server, backend):
        response = await post(backend)
        pieces: list[bytes] = []
        arrived = asyncio.Event()

        def sink(piece: bytes) -> None:
            pieces.append(piece)
            arrived.set()

        assert b"" == response.divert(sink)
        gates[0].set()
        async with asyncio.timeout(5):
            await arrived.wait()
        assert [b"".join(events) + b"half"] == pieces
        gates[1].set()
        async with asyncio.timeout(5):
            await response.wait()
        assert ([b"".join(events) + b"half", b" done\n\n"], True) == (pieces, response.done)
        response.undivert()
        response.release()


async def test_good_chunks_before_a_malformed_one_in_one_read_still_reach_the_sink() -> None:
    """A read whose chunks turn malformed part way: the sink gets the bytes of the good ones,
    then the body fails as malformed HTTP."""
    good = b"data: 1\n\n"
    gate = asyncio.Event()

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        writer.write(CHUNKED_HEAD)
        await writer.drain()
        await gate.wait()
        writer.write(b"%x\r\n%b\r\n" % (len(good), good) * 2 + b"zz\r\nnot a size\r\n")
        await writer.drain()
        await s.until_closed(reader)

    async with raw_backend(serve) as (_server, backend):
        response = await post(backend)
        pieces: list[bytes] = []
        response.divert(pieces.append)
        gate.set()
        async with asyncio.timeout(5):
            with pytest.raises(BackendUnreachable, match="backend sent malformed HTTP"):
                await response.wait()
        assert [good * 2] == pieces
        response.undivert()


# Lengths that lie ---------------------------------------------------------------------------


async def test_body_shorter_than_length_then_close_fails() -> None:
    """A body that ends (backend closes) before its Content-Length is a failure, never done."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        await writer.drain()
        await asyncio.sleep(0.05)

    async with raw_backend(serve) as (_server, backend):
        response = await post(backend)
        with pytest.raises(BackendUnreachable):
            async with asyncio.timeout(5):
                await response.read()
        assert False is response.done
        response.close()


LONGER = {
    "same write": [ok(b"hello") + b"WORLD"],
    "extra response, same write": [ok(b"hello") + ok(b"EVIL!")],
    "extra response, next read": [ok(b"hello"), ok(b"EVIL!")],
}


@pytest.mark.parametrize("pieces", LONGER.values(), ids=LONGER.keys())
async def test_bytes_past_the_length_close_the_connection(pieces: list[bytes]) -> None:
    """Bytes past a complete answer (a length too short, a second response) are never read
    as another answer: the connection is closed, the next request gets its own answer."""
    async with raw_backend(answering(pieces)) as (server, backend):
        first = await exchange(backend)
        await asyncio.sleep(0.2)  # whatever follows has arrived
        second = await exchange(backend)
        assert [(200, b"hello"), (200, b"ok")] == [first, second]
        assert 2 == server.connections


async def test_stray_byte_while_idle_closes_the_connection() -> None:
    """An idle pooled connection that receives any byte is closed at once; the next request
    opens a new connection and gets its own answer, not the stray one."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        while True:
            await s.read_request(reader)
            writer.write(ok())
            await writer.drain()
            if n == 1:
                await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # a stray head, half of it
                await writer.drain()
                await s.until_closed(reader)
                return

    async with raw_backend(serve) as (server, backend):
        assert (200, b"ok") == await exchange(backend)
        await asyncio.sleep(0.1)
        assert 1 == server.closed  # the client closed it the moment the byte arrived
        assert not backend.pool.open
        assert (200, b"ok") == await exchange(backend)
        assert 2 == server.connections


async def test_answer_before_the_body_was_written_is_not_reused() -> None:
    """A backend that answers before reading the request body: the answer is relayed, the
    connection (with body bytes still unsent) is closed, the next request gets a new one."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        if n == 1:
            await s.read_request(reader, body=False)
            writer.write(ok(b"early"))
            await writer.drain()
            await asyncio.sleep(1)  # never reads the body
            return
        await answering()(s, n, reader, writer)

    async with raw_backend(serve) as (server, backend):
        assert (200, b"early") == await exchange(backend, b"x" * (32 * 1024 * 1024))
        assert (200, b"ok") == await exchange(backend)
        assert 2 == server.connections


async def test_head_answer_ends_at_its_head() -> None:
    """A HEAD answer announcing a length has no body: done at the head, the connection not
    reused (its framing is no longer known)."""
    async with raw_backend(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")) as (
        server,
        backend,
    ):
        async with asyncio.timeout(5):
            response = await send(backend, "HEAD", backend.target("/x"), b"", None)
            assert (200, b"", True) == (response.status, await response.read(), response.done)
        response.release()
        assert (200, b"ok") == await exchange(backend)
        assert 2 == server.connections


# Interim answers ----------------------------------------------------------------------------

INTERIM = {
    "100 Continue": [b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final")],
    "103 Early Hints": [
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + ok(b"final")
    ],
    "several in a row": [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\n",
        ok(b"final"),
    ],
    "split across reads": [
        b"HTTP/1.1 10",
        b"0 Continue\r",
        b"\n\r\nHTTP/1.1 200 OK\r\nContent-",
        b"Length: 5\r\n\r\nfinal",
    ],
    "interim alone, final later": [b"HTTP/1.1 100 Continue\r\n\r\n", ok(b"final")],
}


@pytest.mark.parametrize("pieces", INTERIM.values(), ids=INTERIM.keys())
async def test_interim_answers_are_skipped(pieces: list[bytes]) -> None:
    """1xx interim answers are skipped (RFC 9110 15.2): the final answer is the one returned,
    with none of the interim heads' headers, and the next request gets its own answer."""
    async with raw_backend(answering(pieces)) as (server, backend):
        response = await post(backend)
        async with asyncio.timeout(5):
            body = await response.read()
        assert (200, [b"Content-Length"], b"final") == (
            response.status,
            [k for k, _ in response.headers],
            body,
        )
        response.release()
        assert (200, b"ok") == await exchange(backend)
        assert 1 == server.connections


async def test_switching_protocols_is_refused() -> None:
    """101 Switching Protocols is BackendUnreachable and the connection is closed."""
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello"
    async with raw_backend(answering(answer)) as (_server, backend):
        with pytest.raises(BackendUnreachable, match="101"):
            await post(backend)
        await settled()
        assert not backend.pool.open


# Head limits --------------------------------------------------------------------------------


def head_of(size: int = 0, count: int = 0) -> bytes:
    """A 200 head with `count` small headers and one header padding it to about `size`."""
    lines = [b"X-H%d: v\r\n" % i for i in range(count)]
    if size:
        lines.append(b"X-Pad: " + b"p" * size + b"\r\n")
    return b"HTTP/1.1 200 OK\r\n" + b"".join(lines) + b"Content-Length: 2\r\n\r\nok"


HUGE_HEADS = {
    "one header of 65 KiB": [head_of(size=65 * 1024)],
    "a 1 MiB header line, no end": [b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * (1024 * 1024)],
    "101 headers": [head_of(count=101)],
    "interim heads adding up": [b"HTTP/1.1 103 Early Hints\r\nLink: " + b"l" * 30000 + b"\r\n\r\n"]
    * 3,
}


@pytest.mark.parametrize("pieces", HUGE_HEADS.values(), ids=HUGE_HEADS.keys())
async def test_oversized_head_is_refused(pieces: list[bytes]) -> None:
    """A head over 64 KiB or 100 headers is BackendUnreachable naming the limit; the
    connection is closed and the next request is served."""
    async with raw_backend(answering(pieces)) as (_server, backend):
        with pytest.raises(BackendUnreachable, match="head"):
            await post(backend)
        await settled()
        assert not backend.pool.open
        assert (200, b"ok") == await exchange(backend)


async def test_head_near_the_limits_is_taken() -> None:
    """A head just under 64 KiB with 90 headers, its body in the same write, is an answer."""
    answer = head_of(size=60 * 1024, count=90).replace(b"Content-Length: 2\r\n\r\nok", b"")
    answer += b"Content-Length: 200000\r\n\r\n" + b"b" * 200000
    async with raw_backend(answering(answer)) as (_server, backend):
        status, body = await exchange(backend)
        assert (200, 200000) == (status, len(body))


# The pool -----------------------------------------------------------------------------------


def holding(release: asyncio.Event) -> Serve:
    """Answers every request with a head at once and the body's last byte once `release` is set."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        while True:
            await s.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
            await writer.drain()
            await release.wait()
            writer.write(b"k")
            await writer.drain()

    return serve


async def test_waiter_gets_the_next_freed_connection() -> None:
    """At max_connections a request waits, then runs on the connection the first one freed."""
    release = asyncio.Event()
    release.set()
    async with raw_backend(holding(release), max_connections=1) as (server, backend):
        first = await post(backend)
        second = asyncio.ensure_future(exchange(backend))
        await settled()
        assert False is second.done()
        assert 1 == len(server.requests)
        assert b"ok" == await first.read()
        first.release()
        assert (200, b"ok") == await second
        assert (1, 2) == (server.connections, len(server.requests))


async def test_connections_being_opened_count_against_the_cap() -> None:
    """Concurrent requests at max_connections=1 never have two connections open at once."""
    async with raw_backend(answering(), max_connections=1) as (server, backend):
        results = await asyncio.gather(*(exchange(backend) for _ in range(5)))
        assert [(200, b"ok")] * 5 == results
        assert 1 == server.most_live


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    """A waiter cancelled while waiting, or just after being handed a connection, gives it on:
    the next request still runs."""
    release = asyncio.Event()
    release.set()
    async with raw_backend(holding(release), max_connections=1) as (server, backend):
        first = await post(backend)
        waiting = asyncio.ensure_future(post(backend))
        handed = asyncio.ensure_future(post(backend))
        await settled()
        waiting.cancel()
        await read_and_release(first)  # hands the connection to `handed`...
        handed.cancel()  # ...which is cancelled before it runs
        with contextlib.suppress(asyncio.CancelledError):
            await handed
        assert (200, b"ok") == await exchange(backend)
        assert 1 == server.connections


async def read_and_release(response: Response) -> None:
    async with asyncio.timeout(5):
        await response.read()
    response.release()


async def test_idle_sweep_closes_expired_connections() -> None:
    """sweep() closes idle connections past keepalive_s; the backend sees the close."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        writer.write(ok())
        await writer.drain()
        await s.until_closed(reader)

    async with raw_backend(serve, keepalive_s=0.05) as (server, backend):
        assert (200, b"ok") == await exchange(backend)
        assert 1 == len(backend.pool.open)
        backend.pool.sweep()
        assert 1 == len(backend.pool.open)  # not expired yet
        await asyncio.sleep(0.1)
        backend.pool.sweep()
        await settled()
        assert (0, 1) == (len(backend.pool.open), server.closed)


async def test_closing_the_pool_wakes_everyone() -> None:
    """Closing a pool with a request waiting for its head, one reading its body and one
    waiting for a connection raises BackendUnreachable in each; no task hangs."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        if n == 2:  # half a body; n == 1 never answers
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
            await writer.drain()
        await s.until_closed(reader)

    async with raw_backend(serve, max_connections=2) as (_server, backend):
        heads = asyncio.ensure_future(post(backend))
        await asyncio.sleep(0.05)
        reading = await post(backend)
        body = asyncio.ensure_future(reading.read())
        waiting = asyncio.ensure_future(post(backend))
        await settled()
        backend.pool.close()
        async with asyncio.timeout(2):
            outcomes = await asyncio.gather(heads, body, waiting, return_exceptions=True)
        assert [BackendUnreachable] * 3 == [type(o) for o in outcomes]
        with pytest.raises(BackendUnreachable):
            await post(backend)


# The stale keep-alive retry -----------------------------------------------------------------


def closing_at(second: Callable[[RawServer, asyncio.StreamWriter], Awaitable[None]]) -> Serve:
    """Answers the first request on the first connection, then does `second` with the next
    one; other connections are answered well."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        writer.write(ok(b"%d" % len(s.requests)))
        await writer.drain()
        if n == 1:
            await s.read_request(reader)
            await second(s, writer)
            return
        await answering()(s, n, reader, writer)

    return serve


async def close_unanswered(s: RawServer, writer: asyncio.StreamWriter) -> None:
    """The keep-alive timer fired just as the request arrived."""


async def close_half_answered(s: RawServer, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-")
    await writer.drain()


async def test_stale_connection_is_retried_once_on_a_new_one() -> None:
    """A pooled connection closed before any byte of the answer: retried on a new connection."""
    async with raw_backend(closing_at(close_unanswered)) as (server, backend):
        assert (200, b"1") == await exchange(backend)
        assert (200, b"3") == await exchange(backend)  # the third request the server read
        assert (2, 3) == (server.connections, len(server.requests))


async def test_stale_connection_with_part_of_an_answer_is_not_retried() -> None:
    """A pooled connection closed after a byte of the answer arrived is not retried."""
    async with raw_backend(closing_at(close_half_answered)) as (server, backend):
        assert (200, b"1") == await exchange(backend)
        with pytest.raises(BackendUnreachable):
            await exchange(backend)
        assert (1, 2) == (server.connections, len(server.requests))


async def test_stale_retry_happens_once() -> None:
    """When the retry's new connection closes unanswered too, the request fails: one retry."""

    async def serve(s: RawServer, n: int, reader, writer) -> None:
        await s.read_request(reader)
        if n == 1:
            writer.write(ok())
            await writer.drain()
            await s.read_request(reader)
        # closes unanswered

    async with raw_backend(serve) as (server, backend):
        assert (200, b"ok") == await exchange(backend)
        with pytest.raises(BackendUnreachable, match="closed the connection before answering"):
            await exchange(backend)
        assert (2, 3) == (server.connections, len(server.requests))


async def test_fetch_reads_a_small_resource() -> None:
    """fetch() GETs a path and returns status and body, the connection kept."""
    async with raw_backend(answering(ok(b'{"data": []}'))) as (server, backend):
        assert (200, b'{"data": []}') == await fetch(backend, "/v1/models")
        assert server.requests[0].startswith(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:")
        assert 1 == len(backend.pool.open)
