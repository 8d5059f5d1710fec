"""The fleet benchmark's client: one HTTP/1.1 request at a time per connection, each outcome kept.

Unlike bench/streamload.py (one request shape, totals only), every request here has its own
body and headers, and the outcome of each is kept: which backend answered (the simulated
backends echo the upstream model id, one per backend, in every event), the time to its first
SSE event, and, for a failure, how far it got:

- `before_head`: no answer head, or an error status: nothing of an answer reached the client,
  so the gateway could have tried another target (issue 9's target: 0 of these);
- `after_head`: a 200 head, then the stream ended before its first event;
- `mid_stream`: events arrived, then an error event or a cut before `[DONE]`.

Two shapes of load, both bounded in count and time: `closed_loop` (W workers back to back
until a deadline or a request count) and `open_loop` (Poisson arrivals at a rate, with a cap
on the requests outstanding; one beyond it is counted as `shed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Request = tuple[bytes, tuple[tuple[str, str], ...], bool]  # body, extra headers, stream
MODEL_MARK = b'"model":"'


@dataclass(slots=True)
class Outcome:
    """What became of one request."""

    started: float  # perf_counter seconds
    stream: bool
    status: int = 0
    backend: str | None = None
    ttft_ms: float | None = None  # to the first SSE event (streams) or the whole body
    total_ms: float = 0.0
    failure: str | None = None  # None, before_head, after_head, mid_stream
    detail: str = ""
    index: int = -1  # the request's place in the list `open_loop` was given


@dataclass(slots=True)
class Pool:
    """Keep-alive connections to one host:port, opened as needed."""

    host: str
    port: int
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.idle:
            return self.idle.pop()
        return await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def put(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.idle.append(conn)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def _head(path: str, host: str, body: bytes, headers: tuple[tuple[str, str], ...]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _backend_of(data: bytes) -> str | None:
    at = data.find(MODEL_MARK)
    if at < 0:
        return None
    end = data.find(b'"', at + len(MODEL_MARK))
    return data[at + len(MODEL_MARK) : end].decode(errors="replace") if end > 0 else None


async def send(
    pool: Pool, request: Request, timeout_s: float, path: str = "/v1/chat/completions"
) -> Outcome:
    """One request on a pooled connection; never raises for what the server or network did."""
    body, headers, stream = request
    out = Outcome(started=time.perf_counter(), stream=stream)
    seen = bytearray()  # the body, kept only up to the first event (for the model id)
    got_head = got_event = done = False
    conn = None
    try:
        async with asyncio.timeout(timeout_s):
            conn = await pool.get()
            reader, writer = conn
            writer.write(_head(path, f"{pool.host}:{pool.port}", body, headers) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            out.status = int(lines[0].split(b" ", 2)[1])
            got_head = True
            fields = {
                k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])
            }
            if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    data = await reader.readexactly(size + 2)
                    if not got_event and b"\n\n" in data:
                        got_event = True
                        out.ttft_ms = (time.perf_counter() - out.started) * 1000
                    if len(seen) < 4096:
                        seen += data
                    if b'data: {"error"' in data:
                        out.failure, out.detail = "mid_stream", "error event"
                    done = done or b"[DONE]" in data
            else:
                data = await reader.readexactly(int(fields.get(b"content-length", b"0")))
                seen += data[:4096]
                out.ttft_ms = (time.perf_counter() - out.started) * 1000
            if fields.get(b"connection", b"").lower() == b"close":
                writer.close()
            else:
                pool.put(conn)
            conn = None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        out.detail = type(exc).__name__
        out.failure = out.failure or _stage(got_head, got_event)
    except TimeoutError:
        out.detail = "timeout"
        out.failure = out.failure or _stage(got_head, got_event)
    finally:
        if conn is not None:
            conn[1].close()
    out.total_ms = (time.perf_counter() - out.started) * 1000
    out.backend = _backend_of(bytes(seen))
    if out.failure is None and out.status != 200:
        out.failure, out.detail = "before_head", f"status {out.status}"
    elif out.failure is None and stream and not done:
        out.failure, out.detail = _stage(True, got_event), "no [DONE]"
    return out


def _stage(got_head: bool, got_event: bool) -> str:
    if not got_head:
        return "before_head"
    return "mid_stream" if got_event else "after_head"


async def closed_loop(
    pool: Pool,
    next_request: Callable[[int], Request],
    *,
    workers: int,
    duration_s: float,
    max_requests: int,
    timeout_s: float,
) -> list[Outcome]:
    """`workers` clients back to back until `duration_s` or `max_requests` have passed."""
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + duration_s
    counter = iter(range(max_requests))

    async def worker() -> None:
        for index in counter:
            if time.perf_counter() >= deadline:
                return
            outcomes.append(await send(pool, next_request(index), timeout_s))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return outcomes


async def open_loop(
    pool: Pool | tuple[Pool, ...],
    requests: list[Request],
    *,
    rate_per_s: float,
    max_outstanding: int,
    timeout_s: float,
    seed: int = 1,
) -> tuple[list[Outcome], int]:
    """`requests` sent at Poisson arrivals of `rate_per_s`; (outcomes, shed). With several
    pools (gateways), each request goes to one of them drawn at random (a load balancer)."""
    rng = random.Random(seed)
    pools = pool if isinstance(pool, tuple) else (pool,)
    coin = random.Random(seed + 1)
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()
    shed = 0

    async def one(index: int, request: Request, to: Pool) -> None:
        outcome = await send(to, request, timeout_s)
        outcome.index = index
        outcomes.append(outcome)

    at = time.perf_counter()
    for index, request in enumerate(requests):
        at += rng.expovariate(rate_per_s)
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_outstanding:
            shed += 1
            continue
        to = pools[coin.randrange(len(pools))]
        task = asyncio.create_task(one(index, request, to))  # owned by `tasks`, awaited below
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks), timeout_s + 5)
    return outcomes, shed
