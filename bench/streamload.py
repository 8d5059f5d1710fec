"""A streaming load generator on raw asyncio protocols (uvloop when available).

Each connection is one `asyncio.Protocol` that writes a prebuilt HTTP/1.1 request and scans
the response bytes without decoding them: it records the time to the first SSE event (the
first blank line of the body), the number of events, the total time and any error.

Two shapes of load:
- `loop`: C keep-alive connections, each sending requests back to back for D seconds (S2).
- `burst`: N connections opened first (outside the measurement), then request i is sent at
  t0 + i * ramp / N, one request per connection (S3 and the concurrency sweep).

    python -m bench.streamload --port 8001 --mode loop --connections 64 --duration 10
    python -m bench.streamload --port 8001 --mode burst --streams 1000 --ramp-ms 50 \
        --header x-sim-chunk-delay-ms:50 --tokens 20

It prints one JSON object. The end of a chunked body is recognised by its `0\\r\\n\\r\\n`
terminator at the end of a read, which is exact for SSE (events never contain a raw CR).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.aio import run
from bench.stats import summarize

CHUNKED_END = b"\r\n0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Where to send what, and how much of it."""

    host: str = "127.0.0.1"
    port: int = 8001
    path: str = "/v1/chat/completions"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    mode: str = "loop"  # loop | burst
    connections: int = 64  # loop
    duration_s: float = 10.0  # loop
    streams: int = 1000  # burst
    ramp_ms: float = 50.0  # burst
    rounds: int = 1  # burst: repeat the whole burst this many times (more samples)
    timeout_s: float = 60.0  # hard bound on each round (all of loop mode) after connecting
    expect_events: int = 0  # when > 0, a stream with another number of events is an error

    def request_bytes(self) -> bytes:
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"host: {self.host}:{self.port}",
            "content-type: application/json",
            "accept: text/event-stream",
            f"content-length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def chat_body(tokens: int, *, model: str = "sim-model", stream: bool = True) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": tokens,
            "stream": stream,
        }
    )


@dataclass(slots=True)
class Results:
    """Samples collected by every connection of one run."""

    ttfe_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    events: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class StreamConnection(asyncio.Protocol):
    """One client connection sending requests and scanning streamed responses."""

    def __init__(self, runner: LoadRunner) -> None:
        self.runner = runner
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.in_flight = False
        self._reset()

    def _reset(self) -> None:
        self.head = bytearray()
        self.in_body = False
        self.status = 0
        self.chunked = False
        self.length = -1
        self.received = 0
        self.events = 0
        self.last = 0
        self.tail = b""
        self.done_seen = False
        self.error_event = False
        self.t_sent = 0
        self.t_first = 0
        self.keep_alive = True

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.in_flight:
            self.in_flight = False
            if self.in_body and not self.chunked and self.length < 0 and self.done_seen:
                self._complete()  # close-delimited body that ended properly
            else:
                self.runner.results.error("closed_early" if exc is None else type(exc).__name__)
                self.runner.request_done()
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:
            return
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(bytes(self.head[:end]))
            data = bytes(self.head[end + 4 :])
            self.in_body = True
            if self.status != 200:
                self.keep_alive = False
        if data:
            self._scan(data)
        elif self.length == 0:
            self._complete()

    # -- requests --------------------------------------------------------------------------
    def send(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self.runner.results.error("closed_before_send")
            return
        self._reset()
        self.in_flight = True
        self.runner.pending += 1
        self.t_sent = time.perf_counter_ns()
        self.transport.write(self.runner.request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"content-length":
                self.length = int(value.strip())
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False

    def _scan(self, data: bytes) -> None:
        count = data.count(b"\n\n") + (self.last == 10 and data[0] == 10)
        if count:
            if not self.events:
                self.t_first = time.perf_counter_ns()
            self.events += count
        self.last = data[-1]
        if not self.done_seen:
            self.done_seen = b"[DONE]" in data or b"[DONE]" in self.tail + data[:6]
        if b'data: {"error"' in data:
            self.error_event = True  # a gateway's mid-stream error event
        self.received += len(data)
        self.tail = data[-7:] if len(data) >= 7 else (self.tail + data)[-7:]
        if self.chunked:
            finished = self.tail.endswith(CHUNKED_END) or (
                self.received == 5 and self.tail == b"0\r\n\r\n"
            )
        else:
            finished = 0 <= self.length <= self.received
        if finished:
            self._complete()

    def _complete(self) -> None:
        self.in_flight = False
        now = time.perf_counter_ns()
        results = self.runner.results
        if self.status != 200:
            results.error(f"status_{self.status}")
        elif self.error_event or (self.events and not self.done_seen):
            results.error("stream_error")
        elif 0 < self.runner.spec.expect_events != self.events:
            results.error("events_mismatch")
        else:
            results.ok += 1
            results.events += self.events
            results.total_ms.append((now - self.t_sent) / 1e6)
            if self.t_first:
                results.ttfe_ms.append((self.t_first - self.t_sent) / 1e6)
        if self.runner.wants_more() and self.keep_alive:
            self.send()
        else:
            self.close()
        self.runner.request_done()


class LoadRunner:
    """Opens the connections, paces the requests, and bounds the whole run in time."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.request = spec.request_bytes()
        self.results = Results()
        self.deadline = 0.0  # loop mode: no new request after this (perf_counter seconds)
        self.pending = 0  # requests in flight
        self.sending = False  # still issuing the first requests
        self.all_done = asyncio.get_running_loop().create_future()

    def wants_more(self) -> bool:
        return self.spec.mode == "loop" and time.perf_counter() < self.deadline

    def request_done(self) -> None:
        self.pending -= 1
        if self.pending <= 0 and not self.sending and not self.all_done.done():
            self.all_done.set_result(None)

    async def connect(self, count: int, parallel: int = 256) -> list[StreamConnection]:
        """Open `count` connections, at most `parallel` handshakes at a time."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(parallel)
        spec = self.spec

        async def one() -> StreamConnection | None:
            async with gate:
                started = time.perf_counter_ns()
                try:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: StreamConnection(self), spec.host, spec.port
                        ),
                        timeout=10,
                    )
                except (OSError, TimeoutError) as exc:
                    self.results.error(f"connect_{type(exc).__name__}")
                    return None
                self.results.connect_ms.append((time.perf_counter_ns() - started) / 1e6)
                return conn

        conns = await asyncio.gather(*(one() for _ in range(count)))
        return [c for c in conns if c is not None]

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        rounds = spec.rounds if spec.mode == "burst" else 1
        window = 0.0
        timed_out = False
        for _ in range(rounds):
            elapsed, late = await self._one_round()
            window += elapsed
            timed_out = timed_out or late
        return self.summary(window, timed_out)

    async def _one_round(self) -> tuple[float, bool]:
        """Connect, send (looping or paced), wait for every response, close; (seconds, late)."""
        spec = self.spec
        self.all_done = asyncio.get_running_loop().create_future()
        count = spec.connections if spec.mode == "loop" else spec.streams
        conns = await self.connect(count)
        started = time.perf_counter()
        self.sending = True
        if spec.mode == "loop":
            self.deadline = started + spec.duration_s
            for conn in conns:
                conn.send()
        else:
            await self._paced(conns)
        self.sending = False
        if self.pending <= 0 and not self.all_done.done():
            self.all_done.set_result(None)
        timed_out = False
        if conns:
            try:
                await asyncio.wait_for(asyncio.shield(self.all_done), spec.timeout_s)
            except TimeoutError:
                timed_out = True
        window = time.perf_counter() - started
        for conn in conns:
            if conn.in_flight:
                conn.in_flight = False
                self.pending -= 1
                self.results.error("timeout")
            conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), 5)
        return window, timed_out

    async def _paced(self, conns: list[StreamConnection]) -> None:
        """Send request i at t0 + i * ramp / n, sleeping only when ahead of schedule."""
        step = self.spec.ramp_ms / 1000.0 / max(1, len(conns))
        t0 = time.perf_counter()
        for index, conn in enumerate(conns):
            delay = t0 + index * step - time.perf_counter()
            if delay > 0.001:
                await asyncio.sleep(delay)
            conn.send()

    def summary(self, window_s: float, timed_out: bool) -> dict[str, Any]:
        r = self.results
        completed = r.ok + sum(r.errors.values())
        return {
            "mode": self.spec.mode,
            "requests": completed,
            "ok": r.ok,
            "errors": sum(r.errors.values()),
            "error_kinds": r.errors,
            "timed_out": timed_out,
            "events": r.events,
            "window_s": round(window_s, 3),
            "requests_per_s": round(r.ok / window_s, 1) if window_s else 0.0,
            "events_per_s": round(r.events / window_s, 1) if window_s else 0.0,
            "ttfe_ms": summarize(r.ttfe_ms),
            "total_ms": summarize(r.total_ms),
            "connect_ms": summarize(r.connect_ms),
        }


def raise_nofile_limit(want: int = 0) -> int:
    """Lift the open-files limit to `want` (both soft and hard: the processes started after
    inherit it; raising the hard limit needs root, else the hard limit is kept), or at least
    the soft one to the hard one (thousands of sockets); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass  # not allowed: keep the hard limit
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run one load as `spec` says and return its summary (see `LoadRunner.summary`)."""
    return await LoadRunner(spec).run()


def parse_args(argv: list[str] | None = None) -> LoadSpec:
    parser = argparse.ArgumentParser(
        prog="python -m bench.streamload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--mode", choices=("loop", "burst"), default="loop")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--ramp-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=1, help="burst: repeat the burst")
    parser.add_argument("--tokens", type=int, default=50, help="max_tokens of each request")
    parser.add_argument("--no-stream", action="store_true", help="ask for a JSON response")
    parser.add_argument("--header", action="append", default=[], help="NAME:VALUE, repeatable")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--expect-events", type=int, default=0, help="0: do not check")
    args = parser.parse_args(argv)
    headers = tuple(
        (name.strip(), value.strip()) for name, _, value in (h.partition(":") for h in args.header)
    )
    return LoadSpec(
        host=args.host,
        port=args.port,
        path=args.path,
        body=chat_body(args.tokens, stream=not args.no_stream),
        headers=headers,
        mode=args.mode,
        connections=args.connections,
        duration_s=args.duration,
        streams=args.streams,
        ramp_ms=args.ramp_ms,
        rounds=max(1, args.rounds),
        timeout_s=args.timeout,
        expect_events=args.expect_events,
    )


def main(argv: list[str] | None = None) -> None:
    spec = parse_args(argv)
    raise_nofile_limit()
    gc.disable()  # a bounded run: no collector pauses inside the measured window
    summary = run(run_load(spec))
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")


if __name__ == "__main__":
    main()
