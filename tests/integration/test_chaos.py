"""Chaos: backends that stall, lie, reset or die, and clients that crawl or reset, on loopback.

What test_streaming.py and test_keepalive.py already prove is not repeated here (an idle
timeout and a deadline mid-stream, a backend or client closing cleanly, a slow client getting
every byte, the stale keep-alive retry); these add raw-socket misbehaviours around them and
check that nothing is left behind: no request in flight, no upstream connection open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest

from tests.conftest import one_backend, wait_for
from tests.integration.test_streaming import CHAT, raw_request

NO_HEALTH = "health: {interval_s: 3600}\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
# Health answers close their connection, so every POST meets a fresh one (no stale retry).
HEALTH_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}"
)
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head, its body read past (Content-Length only)."""
    head = await reader.readuntil(b"\r\n\r\n")
    _, _, rest = head.lower().partition(b"content-length:")
    await reader.readexactly(int(rest.split(b"\r\n")[0] or b"0"))
    return head


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST: SO_LINGER on, zero seconds, then close."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Script = Callable[["ChaosBackend", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ChaosBackend:
    """A raw HTTP/1.1 backend: GETs (health checks) answered, the first POST handed to a script
    free to break HTTP, later ones answered well; it counts what its writes handed the kernel
    and notes when the gateway closed a connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.posts = 0
        self.written = 0  # bytes the scripts' drain() accepted
        self.closed_at: list[float] = []  # time.monotonic() when the gateway's close was seen
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            head = await read_request(reader)
            if not head.startswith(b"POST"):
                writer.write(HEALTH_OK)
                await writer.drain()
                return
            self.posts += 1
            await (self.script if self.posts == 1 else healthy_stream)(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.written += len(data)

    async def until_closed(self, reader: asyncio.StreamReader, within_s: float = 10) -> None:
        """Wait for the gateway to close this connection (EOF or reset), and note when."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(within_s):
                while await reader.read(65536):
                    pass
        self.closed_at.append(time.monotonic())

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.transport.abort()
            await self.server.wait_closed()


async def healthy_stream(b: ChaosBackend, reader, writer) -> None:
    """A well-formed short stream, then the connection kept until the gateway drops it."""
    await b.send(writer, SSE_HEAD + chunk(EVENT) * 3 + chunk(DONE) + b"0\r\n\r\n")
    await b.until_closed(reader)


async def chaos_gateway(gateway_factory, script: Script, extra: str = ""):
    """A ChaosBackend running `script`, and a gateway in front of it (no periodic health)."""
    backend = ChaosBackend(script)
    url = await backend.start()
    gw = await gateway_factory(one_backend(url, extra=NO_HEALTH + extra))
    return backend, gw


async def post(url: str, body: bytes = CHAT) -> tuple[int, bytes]:
    """Status and whole body of one POST; an answer that never ends fails the test (5 s)."""
    try:
        async with (
            aiohttp.ClientSession() as s,
            asyncio.timeout(5),
            s.post(url + "/v1/chat/completions", data=body) as r,
        ):
            return r.status, await r.read()
    except TimeoutError:
        pytest.fail("the answer did not end within 5 s: the client hangs")


def error_type(payload: bytes) -> str:
    """The `type` of a gateway error envelope (the two keys checked)."""
    error = orjson.loads(payload)["error"]
    assert {"type", "message"} == set(error)
    return error["type"]


def last_event_error(body: bytes) -> str:
    """The error type of a stream's last event; the stream must have no [DONE]."""
    events = [e for e in body.split(b"\n\n") if e]
    assert DONE.strip() not in events
    assert events[-1].startswith(b"data: ")
    return error_type(events[-1][len(b"data: ") :])


async def no_leaks(gw) -> None:
    """Nothing in flight and no upstream connection left open for the broken exchange."""
    backend = gw.state.backends["gpu"]
    await wait_for(lambda: backend.in_flight == 0 and not backend.pool.open)


async def still_serves(gw) -> None:
    """The gateway answers the next request, which the backend answers well."""
    status, body = await post(gw.url)
    assert 200 == status
    assert body.endswith(DONE)


# 1. A stalled stream ------------------------------------------------------------------------


STALLS = {
    "after whole events": chunk(EVENT) * 2,
    "halfway through an event": chunk(EVENT) * 2 + chunk(EVENT)[: len(EVENT) // 2],
}


@pytest.mark.parametrize("sent", STALLS.values(), ids=STALLS.keys())
async def test_stalled_stream_times_out_and_closes_upstream(gateway_factory, sent) -> None:
    """A backend gone silent mid-stream trips idle_s: the backend sees its connection closed,
    none stays open, and the client's stream ends with a parseable backend_timeout event."""

    async def stall(b: ChaosBackend, reader, writer) -> None:
        await b.send(writer, SSE_HEAD + sent)
        await b.until_closed(reader)

    backend, gw = await chaos_gateway(gateway_factory, stall, "timeouts: {idle_s: 0.5}\n")
    try:
        start = time.monotonic()
        status, body = await post(gw.url)
        took = time.monotonic() - start
        assert 200 == status
        assert 0.5 <= took < 3
        await wait_for(lambda: len(backend.closed_at) == 1)
        assert backend.closed_at[0] - start < 3
        await no_leaks(gw)
        assert body.startswith(EVENT * 2)
        assert "backend_timeout" == last_event_error(body)
    finally:
        await backend.close()


# 2. Malformed HTTP --------------------------------------------------------------------------

BEFORE_HEAD = {
    "garbage status line": b"HTPT/1.1 two hundred\r\n\r\n",
    "status not a number": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nContent-Type application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "head then bad chunk size, json": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "head then bad chunk size, stream": SSE_HEAD + b"zz\r\n" + EVENT + b"\r\n",
}


@pytest.mark.parametrize("answer", BEFORE_HEAD.values(), ids=BEFORE_HEAD.keys())
async def test_malformed_answer_is_502_and_gateway_serves_on(gateway_factory, answer) -> None:
    """A head (or a body with it) the parser refuses is a 502 backend_unreachable envelope,
    nothing of the broken answer reaches the client, and the next request is served."""

    async def garbage(b: ChaosBackend, reader, writer) -> None:
        await b.send(writer, answer)
        await b.until_closed(reader)

    backend, gw = await chaos_gateway(gateway_factory, garbage)
    try:
        status, body = await post(gw.url)
        assert 502 == status
        assert "backend_unreachable" == error_type(body)
        await no_leaks(gw)
        await still_serves(gw)
    finally:
        await backend.close()


MID_STREAM = {
    "bad chunk size": (SSE_HEAD + chunk(EVENT) * 2, b"zz\r\nnot a chunk\r\n"),
    "chunk longer than announced": (SSE_HEAD + chunk(EVENT), b"4\r\nfar too long\r\n"),
    "content-length not reached": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100000\r\n\r\n"
        + EVENT * 2,
        None,  # then the backend closes
    ),
}


@pytest.mark.parametrize(("good", "bad"), MID_STREAM.values(), ids=MID_STREAM.keys())
async def test_malformed_mid_stream_ends_with_error_event(gateway_factory, good, bad) -> None:
    """A stream that turns to garbage (or ends short of its Content-Length) after events went
    out ends with one backend_unreachable event and no [DONE]; the gateway serves on."""

    async def broken(b: ChaosBackend, reader, writer) -> None:
        await b.send(writer, good)
        await asyncio.sleep(0.2)  # the client has the first events by now
        if bad is not None:
            await b.send(writer, bad)
            await b.until_closed(reader)

    backend, gw = await chaos_gateway(gateway_factory, broken)
    try:
        status, body = await post(gw.url)
        assert 200 == status
        assert "backend_unreachable" == last_event_error(body)
        assert body.startswith(EVENT)
        await no_leaks(gw)
        await still_serves(gw)
    finally:
        await backend.close()


@pytest.mark.parametrize("pause_s", [0.0, 0.2], ids=["close at once", "close later"])
async def test_json_short_of_content_length_is_cut(gateway_factory, pause_s) -> None:
    """A JSON answer whose backend closes before its Content-Length is never passed off as
    whole: a 502 envelope if nothing went out yet, else the client's connection is cut."""

    async def short(b: ChaosBackend, reader, writer) -> None:
        await b.send(writer, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        await b.send(writer, b"Content-Length: 1000\r\n\r\n" + b'{"partial": ')
        await asyncio.sleep(pause_s)

    backend, gw = await chaos_gateway(gateway_factory, short)
    try:
        try:
            status, body = await post(gw.url)
        except aiohttp.ClientPayloadError:
            pass  # the head went out, then the gateway cut the connection: the client knows
        else:
            assert (502, "backend_unreachable") == (status, error_type(body))
        await no_leaks(gw)
        await still_serves(gw)
    finally:
        await backend.close()


# 3. TCP resets --------------------------------------------------------------------------


async def test_backend_reset_before_head_is_502(gateway_factory) -> None:
    """A backend that resets the connection (RST) instead of answering gives a 502 envelope."""

    async def rst(b: ChaosBackend, reader, writer) -> None:
        reset(writer)

    backend, gw = await chaos_gateway(gateway_factory, rst)
    try:
        status, body = await post(gw.url)
        assert (502, "backend_unreachable") == (status, error_type(body))
        await no_leaks(gw)
        await still_serves(gw)
    finally:
        await backend.close()


async def test_backend_reset_mid_stream_ends_with_error_event(gateway_factory) -> None:
    """A backend that resets mid-stream gives the client one backend_unreachable event."""

    async def rst(b: ChaosBackend, reader, writer) -> None:
        await b.send(writer, SSE_HEAD + chunk(EVENT) * 2)
        await asyncio.sleep(0.2)
        reset(writer)

    backend, gw = await chaos_gateway(gateway_factory, rst)
    try:
        status, body = await post(gw.url)
        assert 200 == status
        assert "backend_unreachable" == last_event_error(body)
        assert 2 == body.count(EVENT)
        await no_leaks(gw)
    finally:
        await backend.close()


async def test_client_reset_mid_stream_closes_upstream(gateway_factory) -> None:
    """A client that resets mid-stream: the backend sees its connection close within 1 s and
    the backend's in-flight count returns to 0."""

    async def endless(b: ChaosBackend, reader, writer) -> None:
        await b.send(writer, SSE_HEAD)
        watch = asyncio.ensure_future(b.until_closed(reader))
        try:
            for _ in range(200):  # 20 s at most
                if watch.done():
                    return
                await b.send(writer, chunk(EVENT))
                await asyncio.sleep(0.1)
        finally:
            await watch

    backend, gw = await chaos_gateway(gateway_factory, endless)
    try:
        sock = raw_request(int(gw.url.rsplit(":", 1)[1]), CHAT)
        await wait_for(lambda: backend.written > 3 * len(EVENT))
        assert 1 == gw.state.backends["gpu"].in_flight
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset_at = time.monotonic()
        sock.close()
        await wait_for(lambda: len(backend.closed_at) == 1, within_s=3)
        assert backend.closed_at[0] - reset_at < 1.0
        await no_leaks(gw)
    finally:
        await backend.close()


# 4. A crawling client ---------------------------------------------------------------------

FLOOD_EVENT = b"data: " + b"x" * (16 * 1024) + b"\n\n"
FLOOD_TOTAL = 64 * 1024 * 1024


async def test_crawling_client_backpressures_a_flooding_backend(gateway_factory) -> None:
    """A client reading a few bytes per 0.2 s from a backend that writes as fast as it can:
    the backend's writes stall well under 16 MiB and stay stalled (memory stays bounded)."""

    async def flood(b: ChaosBackend, reader, writer) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        await b.send(writer, SSE_HEAD)
        piece = chunk(FLOOD_EVENT)
        while b.written < FLOOD_TOTAL:
            await b.send(writer, piece)

    backend, gw = await chaos_gateway(gateway_factory, flood)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(CHAT)}\r\n\r\n"
        )
        await loop.sock_sendall(sock, head.encode() + CHAT)
        read = 0
        samples: list[int] = []
        async with asyncio.timeout(10):
            for tick in range(25):  # 5 s
                read += len(await loop.sock_recv(sock, 64))
                if tick in (12, 24):
                    samples.append(backend.written)
                await asyncio.sleep(0.2)
        early, late = samples
        print(f"\nbackend wrote {early} B at 2.4 s, {late} B at 5 s; client read {read} B")
        assert late < 16 * 1024 * 1024
        assert late - early < 1024 * 1024  # stalled: the crawl lets almost nothing through
        assert read < 2048
    finally:
        sock.close()
    try:
        await no_leaks(gw)
    finally:
        await backend.close()


# 5. A backend killed and restarted under load ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_sim(port: int) -> asyncio.subprocess.Process:
    """bench.simbackend in its own process: 40 tokens 25 ms apart (a 1 s stream)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.simbackend", "--port", str(port),
        "--chunk-delay-ms", "25", "--tokens", "40", "--keepalive-s", "30",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(10):
        line = await proc.stdout.readline()
    assert b"listening" in line, line
    return proc


async def stop_sim(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


SIM_CHAT = (
    b'{"model": "sim-model", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
)


async def one_stream(session: aiohttp.ClientSession, url: str) -> str:
    """'complete', 'error event' or '502'; anything else (a hang, a bare cut) raises."""
    async with asyncio.timeout(10), session.post(url + "/v1/chat/completions", data=SIM_CHAT) as r:
        body = await r.read()
        if r.status == 502:
            assert "backend_unreachable" == error_type(body)
            return "502"
        assert 200 == r.status
        if body.endswith(DONE):
            return "complete"
        assert "backend_unreachable" == last_event_error(body)
        return "error event"


async def test_backend_killed_and_restarted_under_load(gateway_factory) -> None:
    """50 streams through a backend that is SIGKILLed: each ends complete or with a clean
    error, never a hang; after a restart on the same port requests succeed, nothing leaked."""
    port = free_port()
    concurrency = 50
    proc = await start_sim(port)
    try:
        gw = await gateway_factory(one_backend(f"http://127.0.0.1:{port}", extra=NO_HEALTH))
        backend = gw.state.backends["gpu"]
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            clients = [
                asyncio.ensure_future(one_stream(session, gw.url)) for _ in range(concurrency)
            ]
            await wait_for(lambda: backend.in_flight == concurrency, within_s=5)
            await asyncio.sleep(0.3)  # every stream is under way
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            outcomes = await asyncio.gather(*clients)
            print(f"\nafter SIGKILL: {collections.Counter(outcomes)}")
            # one_stream checked each is a whole stream, an error event or a 502 envelope;
            assert "error event" in outcomes  # and the kill did land mid-stream
            # While it is down: clean 502s, no hang.
            assert ["502"] * 3 == [await one_stream(session, gw.url) for _ in range(3)]
            await no_leaks(gw)

            proc = await start_sim(port)
            again = await asyncio.gather(*(one_stream(session, gw.url) for _ in range(concurrency)))
            assert ["complete"] * concurrency == again
        await wait_for(lambda: backend.in_flight == 0)
        assert len(backend.pool.open) <= concurrency
    finally:
        await stop_sim(proc)
