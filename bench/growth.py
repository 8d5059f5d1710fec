"""`make bench-growth`: how the gateway's costs grow with body size, stream length and streams.

    python -m bench.growth                 # about 5 minutes; --quick: a smoke run
    python -m bench.growth --results-md    # and replace bench/RESULTS.md's ## Growth section

Three sweeps, each point run on every path (direct, nginx, floor, proxy) with `bench.run`'s
services, pinning and scenarios (the gateway and the floor on CPU 1, the rest on CPU 0):
- body size: S1 (wrk, non-streamed chat of 16 tokens) with prompts of 1 KiB to 1 MiB:
  CPU-us per request and latency p99;
- stream length: S2 (back-to-back streams) of 10 to 4,000 tokens: CPU-us per event;
- concurrency: S3 bursts of 100 to 10,000 streams held open (6 events a second apart,
  2,500 starts a second): first-event p99 and peak RSS.
Writes bench/out/growth/growth.json, growth.png and the table (bench/growthreport.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from bench import growthreport, report, sections
from bench.run import DEFAULT_PROXY_CMD, Suite, log, pin_self
from bench.scenarios import ROOT, Settings, StreamShape, s1_requests, s2_streams, s3_concurrent

KIB = 1024
BODY_SIZES = (1 * KIB, 16 * KIB, 256 * KIB, 1024 * KIB)
STREAM_LENGTHS = (10, 100, 1000, 4000)
CONCURRENCY = (100, 1000, 5000, 10000)
STARTS_PER_S = 2500  # every concurrency point opens its streams at this rate
HELD = StreamShape(0, 6, 1000, 0)  # each stream: 6 tokens a second apart (about 6 s open)


def prompt_body(size: int) -> bytes:
    """A non-streamed chat request of about `size` bytes (its prompt fills the rest)."""
    empty = orjson.dumps(_chat(""))
    words = "lorem ipsum dolor sit amet " * (size // 27 + 1)
    return orjson.dumps(_chat(words[: max(1, size - len(empty))]))


def _chat(content: str) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        "stream": False,
    }


def held_shape(streams: int) -> StreamShape:
    return replace(HELD, streams=streams, ramp_ms=max(40, round(streams * 1000 / STARTS_PER_S)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.growth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short runs, smaller points")
    parser.add_argument("--paths", default="direct,nginx,floor,proxy", help="comma list")
    parser.add_argument("--proxy-cmd", default=DEFAULT_PROXY_CMD, help="{python} {backend} {port}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "growth")
    parser.add_argument(
        "--results-md", action="store_true", help="replace bench/RESULTS.md's ## Growth section"
    )
    parser.add_argument("--budget-s", type=float, default=600.0, help="skip what would run later")
    args = parser.parse_args(argv)
    args.profile = args.profile_only = False  # what Suite reads of bench.run's arguments
    args.profile_md = None
    return args


def sweep(suite: Suite, quick: bool) -> dict[str, Any]:
    """Every point of the three sweeps on every path: {sweep: {point: {path: figures}}}."""
    assert suite.backend is not None
    backend_pid = suite.backend.pid
    short = Settings(s1_s=1.0, s2_s=1.0, warmup_s=0.5, connections=16)
    settings = short if quick else Settings(s1_s=3.0, s2_s=3.0, warmup_s=0.5, connections=16)
    out: dict[str, Any] = {"body": {}, "length": {}, "concurrency": {}}
    for size in BODY_SIZES:
        body = prompt_body(size)
        run = partial(s1_requests, backend_pid=backend_pid, settings=settings, body=body)
        suite.each(f"body {size // KIB} KiB", run, out["body"].setdefault(str(size), {}))
    for tokens in STREAM_LENGTHS[:3] if quick else STREAM_LENGTHS:
        run = partial(
            s2_streams, backend_pid=backend_pid, settings=replace(settings, s2_tokens=tokens)
        )
        suite.each(f"length {tokens}", run, out["length"].setdefault(str(tokens), {}))
    for streams in (100, 1000) if quick else CONCURRENCY:
        run = partial(s3_concurrent, shape=held_shape(streams))
        suite.each(f"concurrency {streams}", run, out["concurrency"].setdefault(str(streams), {}))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if "direct" not in paths:
        paths.insert(0, "direct")  # the added first-event latency needs it
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("missing wrk or taskset: run bench/ensure_tools.sh", file=sys.stderr)
        return 2
    pin_self()
    suite = Suite(args, Settings())
    try:
        suite.start_services(paths)
        figures = sweep(suite, args.quick)
    finally:
        suite.stop_services()
    results = {
        **figures,
        "failures": suite.results["failures"],
        "unavailable": suite.results["unavailable"],
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": report.commit(ROOT),
            "machine": report.machine(),
            "command": " ".join(["python -m bench.growth", *(argv or sys.argv[1:])]),
            "quick": args.quick,
            "elapsed_s": round(time.monotonic() - suite.started, 1),
            "paths": [t.name for t in suite.targets],
        },
    }
    log(suite.started, "done")
    return finish(results, args)


def finish(results: dict[str, Any], args: argparse.Namespace) -> int:
    """Write the JSON and the plot; with --results-md the ## Growth section; print the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "growth.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    png = growthreport.plot(results, args.out / "growth.png")
    tables = growthreport.tables(results)
    if args.results_md:
        plot_name = None
        if png is not None:
            plot_name = "results_growth.png"
            shutil.copyfile(png, ROOT / "bench" / plot_name)
        results_md = ROOT / "bench" / "RESULTS.md"
        old = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
        section = growthreport.section(results, tables, plot_name)
        results_md.write_text(sections.replace(old, growthreport.TITLE, section))
    print(f"\nwrote {args.out / 'growth.json'}" + (f", {png}" if png else ""))
    for where, reason in results["failures"].items():
        print(f"{where} failed: {reason.splitlines()[0] if reason else ''}")
    for table in tables:
        print("\n" + growthreport.text(table))
    for note in growthreport.steps(tables):
        print(f"step: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
