"""`python -m bench.tracing`: S1's CPU per request with tracing off and on, side by side.

Starts the simulated backend, an OTLP/HTTP sink standing in for a collector (both on CPU 0)
and, for each case in turn, one gateway process pinned to CPU 1, driven by wrk as S1 is
(non-streaming chat of 16 tokens, 64 keep-alive connections); the gateway's CPU time comes
from /proc:

- tracing off (no `tracing` section: the SDK is never imported);
- tracing on, `sample_ratio: 0`: every request gets its trace context, nothing is exported;
- tracing on, `sample_ratio: 1`: every request's two spans are exported to the sink;
- with `--before REV`, first the gateway as it was at REV (`git archive`d to a scratch
  directory), no tracing section: what tracing off costs against the code before its hooks.

The cases run in rounds (each case once per round); each figure is the median of its rounds.
Prints one table and writes bench/out/tracing.json; bench/RESULTS.md is left alone.

    python -m bench.tracing            # 3 rounds of 5 s per case
    python -m bench.tracing --quick    # 1 round of 2 s per case
    python -m bench.tracing --before efd3d7d   # and the gateway before tracing, as the base
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from bench import rounds
from bench.processes import free_port, http_get, start, stop
from bench.procstat import cpu_seconds
from bench.scenarios import LOAD_CPU, PROXY_CPU, ROOT
from bench.streamload import chat_body
from bench.wrk import run_wrk

CONNECTIONS = 64  # as S1
SIM_OPTIONS = ("--ttft-ms", "0", "--chunk-delay-ms", "0")


@dataclass
class Case:
    name: str
    tracing: dict[str, Any] | None  # the config's tracing section (its endpoint added)
    tree: Path | None = None  # run the gateway of this source tree (--before), not ours
    runs: list[dict[str, float]] = field(default_factory=list)


def cases() -> list[Case]:
    return [
        Case("tracing off", None),
        Case("tracing on, sample_ratio 0 (nothing exported)", {"sample_ratio": 0}),
        Case("tracing on, sample_ratio 1 (2 spans per request exported)", {"sample_ratio": 1}),
    ]


def source_tree(rev: str, work: Path) -> Path:
    """The `proxy` package as it was at `rev`, unpacked under `work`."""
    archive = subprocess.run(
        ["git", "archive", rev, "proxy"], capture_output=True, cwd=ROOT, check=True
    ).stdout
    tree = work / f"tree-{rev}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def collector(port: int) -> None:
    """The sink: answers every OTLP/HTTP export with 200 and an empty response."""

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def dropped(gateway_port: int) -> float:
    """The gateway's proxy_trace_spans_dropped_total, both reasons."""
    text = http_get("127.0.0.1", gateway_port, "/metrics").decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("proxy_trace_spans_dropped_total{")
    )


def measure(case: Case, backend: str, sink: str, work: Path, seconds: float) -> None:
    """One run of one case: a gateway of its own, a warm-up, then the measured window."""
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "backends": {"sim": {"url": backend, "kind": "vllm"}},
        "models": {"sim-model": {"targets": [{"backend": "sim"}]}},
    }
    if case.tracing is not None:
        config["tracing"] = {"otlp_endpoint": sink, **case.tracing}
    path = work / f"gateway-{port}.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    argv = [sys.executable, "-m", "proxy", "--config", str(path)]
    gateway = start("gateway", argv, port=port, cpu=PROXY_CPU, log_dir=work, cwd=case.tree)
    url = gateway.url + "/v1/chat/completions"
    body = chat_body(16, stream=False)
    try:
        run_wrk(url, body, connections=CONNECTIONS, duration_s=1.0, cpu=LOAD_CPU)  # warm-up
        cpu_before = cpu_seconds(gateway.pid)
        result = run_wrk(url, body, connections=CONNECTIONS, duration_s=seconds, cpu=LOAD_CPU)
        cpu = cpu_seconds(gateway.pid) - cpu_before
        lost = dropped(port) if case.tracing is not None else 0.0
    finally:
        stop(gateway)
    requests = max(1, result["requests"])
    case.runs.append(
        {
            "requests_per_s": result["requests_per_s"],
            "p50_ms": result["latency_ms"]["p50"],
            "p99_ms": result["latency_ms"]["p99"],
            "cpu_us": cpu * 1e6 / requests,
            "errors": result["errors"],
            "spans_dropped": lost,
        }
    )


def median(case: Case, key: str) -> float:
    return statistics.median(run[key] for run in case.runs)


def table(all_cases: list[Case]) -> list[str]:
    """The figures, each case's CPU against the first case's (the base)."""
    base = median(all_cases[0], "cpu_us")
    lines = [
        "| S1 case | requests/s | p50 (ms) | p99 (ms) | gateway CPU-us per request | "
        "vs the first row | spans dropped | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines.extend(
        f"| {case.name} | {median(case, 'requests_per_s'):,.0f} | "
        f"{median(case, 'p50_ms'):.2f} | {median(case, 'p99_ms'):.2f} | "
        f"{median(case, 'cpu_us'):.1f} | {median(case, 'cpu_us') / base:.2f}x | "
        f"{sum(int(r['spans_dropped']) for r in case.runs)} | "
        f"{sum(int(r['errors']) for r in case.runs)} |"
        for case in all_cases
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tracing", description=__doc__.split("\n")[0]
    )
    rounds.add_options(parser, seconds=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--before", metavar="REV", help="add the gateway at REV as the base case")
    parser.add_argument("--collector", type=int, help=argparse.SUPPRESS)  # the sink's own mode
    args = parser.parse_args(argv)
    if args.collector is not None:
        collector(args.collector)
        return 0
    count, seconds = rounds.chosen(args)
    started = time.monotonic()
    all_cases = cases()
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        work = Path(tmp)
        if args.before:
            before = Case(f"before tracing ({args.before})", None, source_tree(args.before, work))
            all_cases.insert(0, before)
        backend = rounds.simbackend(work, *SIM_OPTIONS)
        sink_port = free_port()
        sink_argv = [sys.executable, "-m", "bench.tracing", "--collector", str(sink_port)]
        sink = start("collector", sink_argv, port=sink_port, cpu=LOAD_CPU, log_dir=work, cwd=ROOT)
        try:
            rounds.interleaved(
                count,
                all_cases,
                lambda case: case.name,
                lambda case: measure(case, backend.url, f"{sink.url}/v1/traces", work, seconds),
            )
        finally:
            stop(sink)
            stop(backend)
    lines = table(all_cases)
    print("\n".join(lines))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "commit": commit,
        "rounds": count,
        "seconds": seconds,
        "elapsed_s": round(time.monotonic() - started, 1),
        "cases": {case.name: case.runs for case in all_cases},
        "table": lines,
    }
    (args.out / "tracing.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
