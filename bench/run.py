"""`make bench`: run issue 3's scenarios on direct, nginx and inference-proxy; print the table.

    python -m bench.run            # the full suite (about 4 minutes; bounded by --budget-s)
    python -m bench.run --quick    # a smoke run of every scenario (about 1 minute)

Starts its own simulated backend (CPU 0), nginx and the gateway (CPU 1) on free loopback
ports, runs S1-S4 and the concurrency sweep against each path in turn, stops what it started,
and writes bench/out/results.json, bench/out/ttfe_vs_concurrency.png and (full runs)
bench/RESULTS.md. The summary table is printed last.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench import profile as profiling
from bench import report, sections
from bench.attribution import TITLE as ATTRIBUTION_TITLE
from bench.fleetreport import keep_section
from bench.nginx import nginx_binary, start_nginx
from bench.plot import plot_ttfe
from bench.processes import Service, StartError, free_port, start, stop
from bench.scenarios import (
    LOAD_CPU,
    PROXY_CPU,
    ROOT,
    Settings,
    StreamShape,
    Target,
    s1_requests,
    s2_streams,
    s3_concurrent,
    s4_disconnect,
)
from bench.streamload import raise_nofile_limit

DEFAULT_PROXY_CMD = "{python} -m proxy --backend {backend} --host 127.0.0.1 --port {port}"
FLOOR_CMD = "{python} -m bench.floor --backend {backend} --host 127.0.0.1 --port {port}"
# Open files for every process started: S3c's 10,000 streams take two sockets each in a proxy.
NOFILE = 65536
PROFILED = ("floor", "proxy")
PROFILE_TITLES = {"s1": "S1 (requests)", "s2": "S2 (streams)", "s2p": "S2 paced", "s3": "S3"}
FAILURES = (RuntimeError, OSError, ValueError, subprocess.SubprocessError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run of every scenario")
    parser.add_argument("--paths", default="direct,nginx,floor,proxy", help="comma list to measure")
    parser.add_argument("--proxy-cmd", default=DEFAULT_PROXY_CMD, help="{python} {backend} {port}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--results-md",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write bench/RESULTS.md (default: on for full runs, off for --quick)",
    )
    parser.add_argument("--budget-s", type=float, default=900.0, help="skip what would run later")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measurements, rerun S1, S2, S2 paced and S3 on the gateway and the "
        "floor under py-spy: flame graphs and top frames in --out",
    )
    parser.add_argument(
        "--profile-only", action="store_true", help="--profile without the measurements first"
    )
    parser.add_argument(
        "--profile-md", type=Path, help="with --profile: the top ten frames as Markdown here"
    )
    return parser.parse_args(argv)


def log(started: float, message: str) -> None:
    print(f"[{time.monotonic() - started:5.0f}s] {message}", file=sys.stderr, flush=True)


class Suite:
    """The running services, the targets, and the figures collected so far."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.started = time.monotonic()
        self.services: list[Service] = []
        self.targets: list[Target] = []
        self.backend: Service | None = None
        # Logs and nginx's prefix, kept after the run for a look (bench/out/ is not committed).
        self.work = args.out / "work"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.nofile = raise_nofile_limit(NOFILE)
        self.results: dict[str, Any] = {
            "unavailable": {},
            "failures": {},
            "s1": {},
            "s2": {},
            "s2p": {},
            "s3": {},
            "s3_order": [s.key for s in settings.s3],
            "sweep": {},
            "s4": {},
        }

    # -- services --------------------------------------------------------------------------
    def start_services(self, paths: list[str]) -> None:
        backend_port = free_port()
        self.backend = start(
            "simbackend",
            [sys.executable, "-m", "bench.simbackend", f"--port={backend_port}", "--keepalive-s=5"],
            port=backend_port,
            cpu=0,
            log_dir=self.work,
            cwd=ROOT,
        )
        self.services.append(self.backend)
        if "direct" in paths:
            self.targets.append(Target("direct", backend_port, None))
        if "nginx" in paths:
            self._start_nginx(backend_port)
        if "floor" in paths:
            self._start_python("floor", FLOOR_CMD, backend_port)
        if "proxy" in paths:
            self._start_proxy(backend_port)
        log(self.started, "measuring " + ", ".join(f"{t.name} ({t.url})" for t in self.targets))

    def _start_nginx(self, backend_port: int) -> None:
        if nginx_binary() is None:
            self.results["unavailable"]["nginx"] = "nginx is not installed"
            return
        try:
            service = start_nginx(
                self.work / "nginx", free_port(), backend_port, cpu=PROXY_CPU, nofile=self.nofile
            )
        except (StartError, OSError) as exc:
            self.results["unavailable"]["nginx"] = str(exc)
            return
        self.services.append(service)
        self.targets.append(Target("nginx", service.port, service.pid))

    def _start_proxy(self, backend_port: int) -> None:
        if not (ROOT / "proxy" / "__main__.py").exists():
            self.results["unavailable"]["proxy"] = "proxy/__main__.py does not exist yet"
            return
        self._start_python("proxy", self.args.proxy_cmd, backend_port)

    def _start_python(self, name: str, template: str, backend_port: int) -> None:
        """Start the gateway or the floor from its command template, pinned like nginx."""
        port = free_port()
        command = template.format(
            python=sys.executable, backend=f"http://127.0.0.1:{backend_port}", port=port
        )
        try:
            service = start(
                name, shlex.split(command), port=port, cpu=PROXY_CPU, log_dir=self.work, cwd=ROOT
            )
        except (StartError, OSError) as exc:
            self.results["unavailable"][name] = str(exc)
            return
        self.services.append(service)
        self.targets.append(Target(name, port, service.pid))

    def stop_services(self) -> None:
        for service in reversed(self.services):
            stop(service)
        self.services.clear()

    # -- scenarios -------------------------------------------------------------------------
    def each(self, key: str, run: Callable[[Target], dict[str, Any]], into: dict[str, Any]) -> None:
        """Run one scenario against every path; a failure is recorded, not fatal."""
        for target in self.targets:
            where = f"{key}/{target.name}"
            if time.monotonic() - self.started > self.args.budget_s:
                self.results["failures"][where] = "skipped: over the time budget"
                continue
            if not self._alive(target):
                self.results["failures"][where] = "skipped: the process had exited"
                continue
            try:
                into[target.name] = figures = run(target)
            except FAILURES as exc:
                self.results["failures"][where] = f"{type(exc).__name__}: {exc}"[:600]
                log(self.started, f"{where} FAILED: {exc}")
                continue
            log(self.started, f"{where}: {brief(figures)}")

    def _alive(self, target: Target) -> bool:
        return all(s.popen.poll() is None for s in self.services if s.pid == target.pid) and (
            self.backend is not None and self.backend.popen.poll() is None
        )

    def run_all(self) -> None:
        assert self.backend is not None
        backend_pid, backend_port = self.backend.pid, self.backend.port
        settings, results = self.settings, self.results
        if self.args.profile_only:
            self.profile(backend_pid)
            return
        self.each("s1", lambda t: s1_requests(t, backend_pid, settings), results["s1"])
        self.each("s2", lambda t: s2_streams(t, backend_pid, settings), results["s2"])
        paced = partial(s2_streams, backend_pid=backend_pid, settings=settings, paced=True)
        self.each("s2 paced", paced, results["s2p"])
        for shape in settings.s3:
            into = results["s3"].setdefault(shape.key, {})
            self.each(f"s3 {shape.key}", partial(s3_concurrent, shape=shape), into)
        self.sweep()
        self.each("s4", lambda t: s4_disconnect(t, backend_port, settings), results["s4"])
        if self.args.profile:
            self.profile(backend_pid)

    def profile(self, backend_pid: int) -> None:
        """S1, S2, S2 paced and S3's first shape again on the gateway and the floor, each
        sampled by two py-spy recorders at once: a flame graph (SVG) and collapsed stacks
        (their top frames as text). Not part of the table."""
        targets = [t for t in self.targets if t.name in PROFILED and t.pid is not None]
        if not targets or profiling.py_spy() is None:
            self.results["failures"]["profile"] = "needs the gateway running and py-spy installed"
            return
        settings, first = self.settings, self.settings.s3[0]
        runs: dict[str, tuple[float, Callable[[Target], dict[str, Any]]]] = {
            "s1": (
                settings.warmup_s + settings.s1_s,
                partial(s1_requests, **self._on(backend_pid)),
            ),
            "s2": (settings.warmup_s + settings.s2_s, partial(s2_streams, **self._on(backend_pid))),
            "s2p": (
                settings.warmup_s + settings.s2_s,
                partial(s2_streams, **self._on(backend_pid), paced=True),
            ),
            "s3": (
                (first.ramp_ms + first.tokens * first.gap_ms) / 1000 + 2,
                partial(s3_concurrent, shape=first),
            ),
        }
        profiles: dict[str, dict[str, Any]] = {}
        self.results["profile"] = profiles
        for target in targets:
            assert target.pid is not None
            for key, (seconds, scenario) in runs.items():
                stem = self.args.out / f"profile-{target.name}-{key}"
                collapsed, svg = stem.with_suffix(".collapsed"), stem.with_suffix(".svg")
                recorders = [
                    profiling.start_recording(target.pid, seconds, collapsed, LOAD_CPU),
                    profiling.start_recording(target.pid, seconds, svg, LOAD_CPU, "flamegraph"),
                ]
                try:
                    profiles.setdefault(target.name, {})[key] = scenario(target)
                except FAILURES as exc:
                    self.results["failures"][f"profile {key}/{target.name}"] = str(exc)[:600]
                finally:
                    for recorder in recorders:
                        recorder.wait(timeout=seconds + 30)
                if collapsed.exists():
                    stem.with_suffix(".txt").write_text(profiling.top_functions(collapsed))
                    log(self.started, f"profile {target.name} {key}: {stem}.txt, .svg")
        if self.args.profile_md is not None:
            self.args.profile_md.write_text(self.profile_markdown(targets))

    def _on(self, backend_pid: int) -> dict[str, Any]:
        return {"backend_pid": backend_pid, "settings": self.settings}

    def profile_markdown(self, targets: list[Target]) -> str:
        """The top ten frames of each profile, with the commit they were taken at."""
        parts = [
            "# Profiles: the top ten frames",
            "",
            f"Written by `python -m bench.run {' '.join(sys.argv[1:])}` on "
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {report.commit(ROOT)}. "
            "py-spy at 250 Hz, without pausing the process, over each scenario's warm-up and run "
            "(S3: its first shape); `self` is where samples land, `inclusive` the frames they "
            "pass through. The flame graphs are `bench/out/profile-<path>-<scenario>.svg`.",
            "",
        ]
        for target in targets:
            for key in ("s1", "s2", "s2p", "s3"):
                collapsed = self.args.out / f"profile-{target.name}-{key}.collapsed"
                if collapsed.exists():
                    title = f"{target.name}, {PROFILE_TITLES[key]}"
                    parts.append(
                        profiling.top_markdown(title, collapsed.read_text("utf-8", "replace"))
                    )
        return "\n".join(parts)

    def sweep(self) -> None:
        """Time to first event at a few concurrencies, plus S3's points, for the plot."""
        first = self.settings.s3[0]
        sweep: dict[str, dict[str, Any]] = {t.name: {} for t in self.targets}
        for streams in self.settings.sweep:
            rounds = max(1, min(10, math.ceil(50 / streams)))  # at least ~50 samples
            shape = StreamShape(streams, first.tokens, first.gap_ms, first.ramp_ms, rounds)
            into: dict[str, Any] = {}
            self.each(f"sweep {shape.key}", partial(s3_concurrent, shape=shape), into)
            for name, figures in into.items():
                sweep[name][str(streams)] = figures["ttfe_ms"]
        for shape in self.settings.s3:
            for name, figures in self.results["s3"].get(shape.key, {}).items():
                sweep[name][str(shape.streams)] = figures["ttfe_ms"]
        self.results["sweep"] = sweep


def brief(figures: dict[str, Any]) -> str:
    """A one-line progress note for the log."""
    keys = (
        "requests_per_s",
        "events_per_s",
        "errors",
        "proxy_cpu_us_per_request",
        "proxy_cpu_us_per_chunk",
    )
    parts = [f"{k}={figures[k]}" for k in keys if figures.get(k) is not None]
    parts += [
        f"{name} p50={figures[name]['p50']} p99={figures[name]['p99']}"
        for name in ("latency_ms", "ttfe_ms")
        if figures.get(name)
    ]
    if figures.get("rss_mib"):
        parts.append(f"peak_rss_mib={figures['rss_mib']['peak']}")
    if not parts:  # S4
        parts = [f"{phase}: {v['ms'].get('max', 'never')} ms" for phase, v in figures.items()]
    return ", ".join(parts)


def pin_self() -> None:
    """Keep this orchestrating process off the proxy's CPU."""
    if (os.cpu_count() or 1) > PROXY_CPU and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if "direct" not in paths:
        paths.insert(0, "direct")  # every ratio and the S3 "added" figures need it
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        print(f"missing {', '.join(missing)}: run bench/ensure_tools.sh", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings()
    pin_self()
    suite = Suite(args, settings)
    try:
        suite.start_services(paths)
        suite.run_all()
    finally:
        suite.stop_services()
    return finish(suite, args, argv)


def finish(suite: Suite, args: argparse.Namespace, argv: list[str] | None) -> int:
    """Write results.json, the plot and RESULTS.md; print the table last."""
    results = suite.results
    results["meta"] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": report.commit(ROOT),
        "machine": report.machine(),
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "elapsed_s": round(time.monotonic() - suite.started, 1),
        "settings": asdict(suite.settings),
        "paths": [t.name for t in suite.targets],
    }
    rows = report.build_rows(results)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, rows, args.out / "results.json")
    first = suite.settings.s3[0]
    note = (
        f"streams of {first.tokens} tokens {first.gap_ms} ms apart, starts spread over "
        f"{first.ramp_ms} ms (the {suite.settings.s3[-1].streams} point: "
        f"{suite.settings.s3[-1].gap_ms} ms apart)"
    )
    png = plot_ttfe(results["sweep"], args.out / "ttfe_vs_concurrency.png", note)
    measured = not (args.quick or args.profile_only)
    write_md = measured if args.results_md is None else args.results_md
    if write_md:
        plot_name = None
        if png is not None:
            plot_name = "results_ttfe.png"
            shutil.copyfile(png, ROOT / "bench" / plot_name)
        text = report.results_markdown(results, rows, plot_name)
        results_md = ROOT / "bench" / "RESULTS.md"
        # The sections that make bench-fleet, make bench-workers, bench.auth and
        # bench.attribution write stay.
        kept = sections.keep(
            results_md,
            keep_section(results_md, text),
            (
                "Workers",
                "Auth and limits",
                "Growth",
                ATTRIBUTION_TITLE,
                "Issue 12: where the gateway's time goes",
            ),
        )
        results_md.write_text(kept)
    print(f"\nwrote {args.out / 'results.json'}" + (f", {png}" if png else ""))
    print(f"logs of the processes under test: {suite.work}")
    for path, reason in results["unavailable"].items():
        print(f"{path} not measured: {reason.splitlines()[0]}")
    if args.profile_only:
        return 0  # no table: nothing was measured
    for warning in report.interference(results):
        print(f"warning: {warning}")
    print("\n" + report.text_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
