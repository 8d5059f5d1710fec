"""The scenarios of issue 3, each run against one path (direct, nginx or the gateway).

Every load generator runs as its own process pinned to CPU 0 beside the simulated backend;
the proxy under test has CPU 1 to itself. Each function returns plain figures (a dict that
goes into results.json as is). CPU time is the proxy's own, from /proc, over the load's run.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import disconnect
from bench.processes import pinned
from bench.procstat import CpuWindow, MachineBusy, PeakRss, wait_quiet
from bench.streamload import chat_body
from bench.wrk import run_wrk

ROOT = Path(__file__).resolve().parent.parent
LOAD_CPU = 0
PROXY_CPU = 1
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Target:
    """One path to measure: where the client connects and which process (if any) proxies."""

    name: str
    port: int
    pid: int | None  # the proxy under test; None for direct
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StreamShape:
    """S3 load: `streams` streams of `tokens` tokens `gap_ms` apart, started over `ramp_ms`."""

    streams: int
    tokens: int
    gap_ms: int
    ramp_ms: int
    rounds: int = 1  # repeat the burst, for more samples at low concurrency

    @property
    def key(self) -> str:
        return f"{self.streams}x{self.tokens}@{self.gap_ms}ms"


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how hard each scenario runs (`quick()` for a smoke run)."""

    s1_s: float = 10.0
    s2_s: float = 10.0
    warmup_s: float = 1.0
    connections: int = 64
    s1_tokens: int = 16
    s2_tokens: int = 50
    # S2 paced: each event its own read, write and wake-up, as a GPU sends tokens.
    s2p_gap_ms: int = 25
    s2p_connections: int = 256
    # S3a and S3b: 5,000 starts/s; S3c: 10,000 streams held open at one event a second.
    s3: tuple[StreamShape, ...] = (
        StreamShape(1000, 20, 50, 200),
        StreamShape(5000, 20, 250, 1000),
        StreamShape(10000, 10, 1000, 4000),
    )
    sweep: tuple[int, ...] = (1, 10, 100, 300)  # plus S3's first shape, at 20 tokens 50 ms apart
    s4_reps: int = 5
    s4_hold_ms: int = 5000

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            s1_s=2.0,
            s2_s=2.0,
            warmup_s=0.5,
            s2p_connections=64,
            s3=(
                StreamShape(500, 10, 50, 100),
                StreamShape(1000, 5, 250, 500),
                StreamShape(2000, 3, 1000, 800),
            ),
            sweep=(1, 50),
            s4_reps=2,
            s4_hold_ms=2000,
        )


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Window:
    """One measured run: the proxy's, the backend's and the load's CPU, and each CPU's busy share.

    Entering waits (up to 3 s) for the proxy's CPU to be idle, so one run's tail, or another
    program on the machine, does not land in the next; `quiet_before` says how idle it got.
    """

    def __init__(self, proxy_pid: int | None, backend_pid: int | None) -> None:
        self.proxy = CpuWindow(proxy_pid)
        self.backend = CpuWindow(backend_pid)
        self.machine = MachineBusy()
        self.quiet_before = 0.0
        self.load_cpu_s = 0.0
        self._load0 = 0.0

    def __enter__(self) -> Window:
        self.quiet_before = wait_quiet(PROXY_CPU)
        self._load0 = _children_cpu_s()
        self.machine.__enter__()
        self.proxy.__enter__()
        self.backend.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.backend.__exit__(None, None, None)
        self.proxy.__exit__(None, None, None)
        self.machine.__exit__(None, None, None)
        self.load_cpu_s = _children_cpu_s() - self._load0

    def figures(self) -> dict[str, Any]:
        wall = self.proxy.wall_s
        return {
            "proxy_cpu_s": round(self.proxy.cpu_s, 3) if self.proxy.pid else None,
            "load_cpu_busy": round((self.backend.cpu_s + self.load_cpu_s) / wall, 3)
            if self.backend.pid and wall
            else None,
            "cpu_busy": self.machine.busy,
            "proxy_cpu_busy_before": self.quiet_before,
        }


def _per(cpu_s: float, count: int) -> float | None:
    return round(cpu_s * 1e6 / count, 2) if count else None


def streamload(args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run bench.streamload pinned to the load CPU; its JSON summary."""
    argv = pinned([sys.executable, "-m", "bench.streamload", *args], LOAD_CPU)
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"streamload failed ({done.returncode}): {done.stderr[-800:]}")
    result: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return result


def s1_requests(
    target: Target, backend_pid: int, settings: Settings, body: bytes | None = None
) -> dict[str, Any]:
    """S1: non-streaming chat over 64 keep-alive connections (wrk): req/s, latency, CPU.
    `body`: another request body than S1's short chat (the growth sweep's long prompts)."""
    url = f"{target.url}/v1/chat/completions"
    body = chat_body(settings.s1_tokens, stream=False) if body is None else body
    connections = settings.connections
    run_wrk(url, body, connections=connections, duration_s=settings.warmup_s, cpu=LOAD_CPU)
    with Window(target.pid, backend_pid) as window:
        wrk = run_wrk(url, body, connections=connections, duration_s=settings.s1_s, cpu=LOAD_CPU)
    proxy_cpu = window.proxy.cpu_s
    return {
        **wrk,
        **window.figures(),
        "proxy_cpu_us_per_request": _per(proxy_cpu, wrk["requests"]) if target.pid else None,
        "backend_cpu_us_per_request": _per(window.backend.cpu_s, wrk["requests"]),
    }


def s2_streams(
    target: Target, backend_pid: int, settings: Settings, *, paced: bool = False
) -> dict[str, Any]:
    """S2: streams of 50 tokens over 64 connections: chunks/s, CPU per chunk. Back to back,
    or `paced`: over 256 connections, each token `s2p_gap_ms` after the one before."""
    common = [
        f"--port={target.port}",
        "--mode=loop",
        f"--tokens={settings.s2_tokens}",
        f"--expect-events={settings.s2_tokens + 3}",  # role, tokens, finish, [DONE]
    ]
    if paced:
        common += [
            f"--connections={settings.s2p_connections}",
            f"--header=x-sim-chunk-delay-ms:{settings.s2p_gap_ms}",
        ]
    else:
        common.append(f"--connections={settings.connections}")
    streamload([*common, f"--duration={settings.warmup_s}"], settings.warmup_s)
    with Window(target.pid, backend_pid) as window:
        load = streamload([*common, f"--duration={settings.s2_s}"], settings.s2_s)
    proxy_cpu = window.proxy.cpu_s
    return {
        **load,
        **window.figures(),
        "proxy_cpu_us_per_chunk": _per(proxy_cpu, load["events"]) if target.pid else None,
        "proxy_cpu_us_per_stream": _per(proxy_cpu, load["ok"]) if target.pid else None,
        "backend_cpu_us_per_chunk": _per(window.backend.cpu_s, load["events"]),
    }


def s3_concurrent(target: Target, shape: StreamShape) -> dict[str, Any]:
    """S3: many concurrent paced streams: errors, time to first event, the proxy's peak RSS."""
    args = [
        f"--port={target.port}",
        "--mode=burst",
        f"--streams={shape.streams}",
        f"--ramp-ms={shape.ramp_ms}",
        f"--tokens={shape.tokens}",
        f"--header=x-sim-chunk-delay-ms:{shape.gap_ms}",
        f"--expect-events={shape.tokens + 3}",
        f"--rounds={shape.rounds}",
    ]
    round_s = 2 * (shape.ramp_ms + shape.tokens * shape.gap_ms) / 1000.0 + 20
    args.append(f"--timeout={round_s}")
    bound_s = round_s * shape.rounds
    if target.pid is None:
        with Window(None, None) as window:
            load = streamload(args, bound_s)
        return {**load, **window.figures(), "shape": shape.key, "rss_mib": None}
    with Window(target.pid, None) as window, PeakRss(target.pid) as rss:
        load = streamload(args, bound_s)
    return {
        **load,
        **window.figures(),
        "shape": shape.key,
        "rss_mib": {"start": round(rss.start / MIB, 1), "peak": round(rss.peak / MIB, 1)},
        "streams": shape.streams,
        "rss_bytes": {"start": rss.start, "peak": rss.peak},  # report.bytes_per_stream
        "proxy_cpu_us_per_stream": _per(window.proxy.cpu_s, load["requests"]),
    }


def s4_disconnect(target: Target, backend_port: int, settings: Settings) -> dict[str, Any]:
    """S4: client hang-up in each phase -> ms until the backend sees its connection close."""
    return asyncio.run(
        disconnect.measure_all(
            (target.host, target.port),
            ("127.0.0.1", backend_port),
            reps=settings.s4_reps,
            hold_ms=settings.s4_hold_ms,
        )
    )
