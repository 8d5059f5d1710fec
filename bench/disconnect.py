"""S4: how long after a client hangs up does the backend see its own connection closed?

A probe sends one streaming request carrying a unique `x-request-id`, waits until the exchange
is in the wanted phase, notes `time.monotonic_ns()` and closes its socket. The simulated backend
records, for every request whose peer went away, the same clock's reading when it noticed
(GET /sim/stats). Both processes read CLOCK_MONOTONIC, so the difference is the figure.

Phases, each made by the simulated backend's per-request delays:
- headers:      the backend holds the response head (`x-sim-header-delay-ms`);
- first_token:  head sent, first token held (`x-sim-ttft-ms`);
- mid_stream:   a few events received, the rest paced (`x-sim-chunk-delay-ms`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from bench.stats import summarize

SETTLE_S = 0.2  # time the request gets to reach the backend before the client hangs up


@dataclass(frozen=True, slots=True)
class Probe:
    """One phase to test: the delays that make it, and what the client waits for first."""

    phase: str
    headers: tuple[tuple[str, str], ...]
    wait_for: bytes  # b"" = nothing (just SETTLE_S); else bytes of the response to wait for


def probes(hold_ms: int) -> tuple[Probe, ...]:
    """The three phases; `hold_ms` is how long the backend holds its next step."""
    hold = str(hold_ms)
    return (
        Probe(
            "headers",
            (("x-sim-header-delay-ms", hold), ("x-sim-ttft-ms", hold), ("x-sim-tokens", "1000")),
            b"",
        ),
        Probe("first_token", (("x-sim-ttft-ms", hold), ("x-sim-tokens", "1000")), b"\r\n\r\n"),
        Probe(
            "mid_stream",
            (("x-sim-chunk-delay-ms", "20"), ("x-sim-tokens", "1000")),
            b'"content":" fox"',  # the fourth token: several events are through
        ),
    )


def _request(host: str, port: int, request_id: str, headers: tuple[tuple[str, str], ...]) -> bytes:
    body = orjson.dumps(
        {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        f"x-request-id: {request_id}",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def hang_up(host: str, port: int, probe: Probe, request_id: str, wait_s: float) -> int | None:
    """Send, wait for the phase, close; the monotonic ns of the close, or None on failure."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(_request(host, port, request_id, probe.headers))
        async with asyncio.timeout(wait_s):
            if probe.wait_for:
                await reader.readuntil(probe.wait_for)
            await asyncio.sleep(SETTLE_S)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return None
    closed_at = time.monotonic_ns()
    writer.close()
    return closed_at


async def backend_aborts(host: str, port: int) -> dict[str, int]:
    """request id -> monotonic ns at which the simulated backend saw the peer leave."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /sim/stats HTTP/1.1\r\nhost: sim\r\nconnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    stats = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
    return {a["request_id"]: a["t_closed_ns"] for a in stats["aborts"]}


async def measure_phase(
    target: tuple[str, int], backend: tuple[str, int], probe: Probe, reps: int, give_up_s: float
) -> dict[str, Any]:
    """`reps` probes at once; the backend's notice delay for each, in ms (None = never seen)."""
    ids = [f"s4-{probe.phase}-{uuid.uuid4().hex[:12]}" for _ in range(reps)]
    # Give up waiting for the phase well before the backend's hold ends and moves it on.
    wait_s = max(0.5, min(5.0, (give_up_s - 1.5) / 2))
    closed = await asyncio.gather(*(hang_up(*target, probe, rid, wait_s) for rid in ids))
    deadline = time.monotonic() + give_up_s
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        seen = await backend_aborts(*backend)
        if all(rid in seen for rid, t in zip(ids, closed, strict=True) if t is not None):
            break
        await asyncio.sleep(0.02)
    delays: list[float | None] = []
    for rid, t_close in zip(ids, closed, strict=True):
        if t_close is None or rid not in seen:
            delays.append(None)
        else:
            delays.append(round((seen[rid] - t_close) / 1e6, 3))
    measured = [d for d in delays if d is not None]
    return {
        "phase": probe.phase,
        "delays_ms": delays,
        "failed_probes": sum(t is None for t in closed),
        "never_seen": sum(d is None for d in delays),
        "ms": summarize(measured),
        "give_up_s": give_up_s,
    }


async def measure_all(
    target: tuple[str, int], backend: tuple[str, int], *, reps: int, hold_ms: int
) -> dict[str, dict[str, Any]]:
    """Every phase in turn against one path."""
    give_up_s = hold_ms / 1000.0 + 1.5
    return {
        probe.phase: await measure_phase(target, backend, probe, reps, give_up_s)
        for probe in probes(hold_ms)
    }
