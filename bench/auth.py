"""`python -m bench.auth`: what auth and rate limits cost a request, side by side in one run.

Starts the simulated backend, a redis-server of its own and, for each case in turn, one
gateway process (pinned to CPU 1; the backend, Redis and wrk on CPU 0), then drives it with
wrk (non-streaming chat requests, 16 connections) and reads the gateway's CPU time from /proc:

- no auth; a static key; a static key held to limits in the process (`auth.default_limits`);
- a managed key with limits, its store a SQLite file (limits in the process);
- a managed key without limits, and with limits, its store Redis (limits shared in Redis: one
  check script before the request, one settle script after it).

Every limit is far above what the run sends, so nothing is refused: the figures are the price
of checking. The cases run in rounds (each case once per round) and each figure is the median
of its rounds. Prints one table and writes the "## Auth and limits" section of bench/RESULTS.md
(bench/sections.py; the other sections stay).

    python -m bench.auth            # 3 rounds of 5 s per case
    python -m bench.auth --quick    # 1 round of 2 s per case
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import rounds, sections
from bench.processes import Service, StartError, free_port, pinned, start, stop
from bench.procstat import cpu_seconds
from bench.scenarios import LOAD_CPU, PROXY_CPU, ROOT
from bench.wrk import MARK, SCRIPT

TITLE = "Auth and limits"
BODY = orjson.dumps(
    {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
)
CONNECTIONS = 16
BIG = {"rpm": 100_000_000, "tpm": 10_000_000_000, "max_in_flight": 100_000}
STATIC_KEY = "bench-static-key-0123456789"
SIM_OPTIONS = ("--ttft-ms", "0", "--chunk-delay-ms", "0")


@dataclass
class Case:
    name: str
    auth: dict[str, Any]  # the config's auth section
    key: str | None  # "static", "managed", or None (no auth)
    store: str | None = None  # "sqlite" or "redis"
    limits: bool = False  # the managed key's own limits
    runs: list[dict[str, float]] = field(default_factory=list)


def cases() -> list[Case]:
    limited = {"default_limits": BIG}
    return [
        Case("no auth", {}, None),
        Case("static key", {}, "static"),
        Case("static key + limits (in process)", limited, "static"),
        Case("managed key + limits, SQLite (in process)", {}, "managed", "sqlite", True),
        Case("managed key, Redis (no limits)", {}, "managed", "redis"),
        Case("managed key + limits, Redis (shared)", {}, "managed", "redis", True),
    ]


def wrk(url: str, key: str | None, duration_s: float) -> dict[str, Any]:
    binary = shutil.which("wrk")
    if binary is None:
        raise FileNotFoundError("wrk is not installed: run bench/ensure_tools.sh")
    argv = [binary, "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(duration_s))}s"]
    argv += ["--timeout", "10s", "-s", str(SCRIPT)]
    if key is not None:
        argv += ["-H", f"Authorization: Bearer {key}"]
    done = subprocess.run(
        pinned([*argv, url + "/v1/chat/completions"], LOAD_CPU),
        capture_output=True,
        text=True,
        env={**os.environ, "WRK_BODY": BODY.decode()},
        timeout=duration_s + 30,
        check=False,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary (exit {done.returncode}): {done.stderr[-300:]}")
    raw = orjson.loads(line[len(MARK) :])
    raw["errors_total"] = sum(raw["errors"].values())
    return raw


def redis_server(work: Path) -> Service | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(work)]
    log = work / "redis.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(pinned(argv, LOAD_CPU), stdout=out, stderr=subprocess.STDOUT)
    service = Service("redis", popen, "127.0.0.1", port, log)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return service
        except OSError:
            time.sleep(0.02)
    stop(service)
    raise StartError(f"redis-server did not start:\n{service.log_tail()}")


def managed_key(config: Path, case: Case, env: dict[str, str]) -> str:
    """A new key in the case's store, made with the `keys create` command."""
    argv = [sys.executable, "-m", "proxy", "--config", str(config), "keys", "create"]
    argv += ["--name", f"bench-{time.monotonic_ns()}", "--json"]
    if case.limits:
        argv += ["--rpm", str(BIG["rpm"]), "--tpm", str(BIG["tpm"])]
        argv += ["--max-in-flight", str(BIG["max_in_flight"])]
    made = subprocess.run(argv, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return str(orjson.loads(made.stdout)["key"])


def measure(case: Case, backend: str, redis: Service | None, work: Path, seconds: float) -> None:
    """One run of one case: a gateway of its own, a warm-up, then the measured window."""
    auth = dict(case.auth)
    if case.store == "sqlite":
        auth["store"] = str(work / f"keys-{len(case.runs)}-{time.monotonic_ns()}.db")
    elif case.store == "redis":
        assert redis is not None
        auth["store"] = f"redis://127.0.0.1:{redis.port}/0"
    if case.key == "static":
        auth["keys_env"] = "BENCH_KEYS"
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "auth": auth,
        "backends": {"sim": {"url": backend, "kind": "vllm"}},
        "models": {"sim-model": {"targets": [{"backend": "sim"}]}},
    }
    path = work / f"gateway-{port}.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    env = {**os.environ, "BENCH_KEYS": STATIC_KEY}
    key = STATIC_KEY if case.key == "static" else None
    if case.key == "managed":
        key = managed_key(path, case, env)
    argv = [sys.executable, "-m", "proxy", "--config", str(path)]
    gateway = start(
        "gateway", argv, port=port, cpu=PROXY_CPU, log_dir=work, env={"BENCH_KEYS": STATIC_KEY}
    )
    try:
        url = gateway.url
        wrk(url, key, 1.0)  # warm-up: connections, caches, the scripts in Redis
        cpu_before = cpu_seconds(gateway.pid)
        redis_before = cpu_seconds(redis.pid) if redis is not None else 0.0
        result = wrk(url, key, seconds)
        cpu = cpu_seconds(gateway.pid) - cpu_before
        redis_cpu = (cpu_seconds(redis.pid) - redis_before) if redis is not None else 0.0
    finally:
        stop(gateway)
    requests = max(1, result["requests"])
    case.runs.append(
        {
            "requests_per_s": requests / (result["duration_us"] / 1e6),
            "p50_ms": result["latency_us"]["p50"] / 1000,
            "p99_ms": result["latency_us"]["p99"] / 1000,
            "cpu_us": cpu * 1e6 / requests,
            "redis_cpu_us": redis_cpu * 1e6 / requests if case.store == "redis" else 0.0,
            "errors": result["errors_total"],
        }
    )


def median(case: Case, key: str) -> float:
    return statistics.median(run[key] for run in case.runs)


def table(all_cases: list[Case]) -> list[str]:
    base = median(all_cases[0], "cpu_us")
    base_p99 = median(all_cases[0], "p99_ms")
    lines = [
        "| case | requests/s | p50 (ms) | p99 (ms) | gateway CPU-us per request | "
        "vs no auth | p99 vs no auth | Redis CPU-us per request | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in all_cases:
        redis_cpu = median(case, "redis_cpu_us")
        lines.append(
            f"| {case.name} | {median(case, 'requests_per_s'):,.0f} | "
            f"{median(case, 'p50_ms'):.2f} | {median(case, 'p99_ms'):.2f} | "
            f"{median(case, 'cpu_us'):.1f} | {median(case, 'cpu_us') / base:.2f}x | "
            f"{median(case, 'p99_ms') / base_p99:.2f}x | "
            f"{f'{redis_cpu:.1f}' if case.store == 'redis' else '-'} | "
            f"{sum(int(r['errors']) for r in case.runs)} |"
        )
    return lines


def section(lines: list[str], rounds: int, seconds: float, elapsed: float) -> str:
    about = [
        "Written by `python -m bench.auth`: what a request pays for its key check and its rate",
        "limits, the simulated backend answering at once (non-streaming chat, 16 connections,",
        "wrk), one gateway worker pinned to CPU 1 (backend, Redis and wrk on CPU 0). Every",
        "limit is far above the load, so nothing is refused. Gateway CPU is the gateway's own",
        "process; Redis's is shown beside it. Read the ratios: a shared machine's absolute",
        "figures move from run to run, and between this section and the others.",
    ]
    opening = sections.stamp(rounds, seconds, elapsed, "medians")
    return sections.made(TITLE, about, opening, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.auth", description=__doc__.split("\n")[0]
    )
    rounds.add_options(parser, seconds=5.0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)
    count, seconds = rounds.chosen(args)
    started = time.monotonic()
    all_cases = cases()
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        work = Path(tmp)
        backend = rounds.simbackend(work, *SIM_OPTIONS)
        redis = redis_server(work)
        if redis is None:
            all_cases = [c for c in all_cases if c.store != "redis"]
            print("redis-server is not installed: the Redis cases are left out", file=sys.stderr)
        try:
            rounds.interleaved(
                count,
                all_cases,
                lambda case: case.name,
                lambda case: measure(case, backend.url, redis, work, seconds),
            )
        finally:
            if redis is not None:
                stop(redis)
            stop(backend)
    lines = table(all_cases)
    print("\n".join(lines))
    if not args.no_write and not args.quick:
        sections.write(TITLE, section(lines, count, seconds, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
