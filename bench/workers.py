"""`make bench-workers`: issue 10's figures: 1 worker against 2 on this machine, and the scrape.

    python -m bench.workers                  # the full run (about 4 minutes); bench/RESULTS.md
    python -m bench.workers --quick          # a smoke run (about 1 minute); RESULTS.md untouched
    python -m bench.workers --shapes nginx --no-scrape

For each backend shape, started once on loopback: `nginx` (bench/nginx_backend.conf: one nginx
worker answering every chat with the same small chat.completion, so the backend is never the
limit) and `sim` (bench/simbackend.py, the Python simulated vLLM, which costs CPU of its own),
the gateway runs with `server.workers: 1` and `server.workers: 2`, alternated over the rounds
(1, 2, 1, 2, ...) so noise on the machine hits both. Each run starts `python -m proxy --config
<yaml>` afresh (the default config: access log on, stdout to a file under the work directory),
waits until every worker serves, warms up with wrk, then measures S1's shape (wrk, 64
keep-alive connections, non-streamed chat of 16 tokens) and stops the gateway by its PID
(SIGTERM; the supervisor stops its workers). Nothing is pinned: the gateway's workers, the
backend and wrk all share the machine's cores, and each run records the CPU that each of them
and everything else on the machine used. Then `python -m bench.scrape` times `/metrics` with 2
workers and 100 models. Prints the tables, writes bench/out/workers.json and (full runs) the
`## Workers` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import fleetreport, sections, workersreport
from bench.aio import run
from bench.nginx import nginx_binary
from bench.processes import Service, free_port, start, stop
from bench.procstat import CLOCK_TICKS, cpu_seconds, tree
from bench.scrape import all_answer
from bench.streamload import chat_body, raise_nofile_limit
from bench.wrk import run_wrk

ROOT = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = Path(__file__).with_name("nginx_backend.conf")
BODY = chat_body(16, stream=False)  # S1's request
WORKER_COUNTS = (1, 2)


@dataclass(frozen=True)
class Settings:
    rounds: dict[str, int]  # shape -> rounds of (1 worker, 2 workers)
    measure_s: float = 10.0
    warmup_s: float = 2.0
    direct_s: float = 3.0  # wrk straight at the backend, once per shape
    connections: int = 64
    scrape_models: int = 100
    scrape_workers: int = 2

    @classmethod
    def full(cls) -> Settings:
        return cls(rounds={"nginx": 4, "sim": 2})

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds={"nginx": 1, "sim": 1}, measure_s=3.0, warmup_s=1.0, direct_s=1.0)


# -- the backends ---------------------------------------------------------------------------
def start_canned(work: Path, nofile: int) -> Service:
    """nginx with bench/nginx_backend.conf under its own prefix, in the foreground."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed: run bench/ensure_tools.sh")
    prefix = work / "nginx-backend"
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)  # the worker may run as an unprivileged user
    port = free_port()
    values = {"PREFIX": str(prefix), "PORT": str(port), "NOFILE": str(nofile)}
    values["CONNECTIONS"] = str(max(1024, nofile))
    text = NGINX_TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", value)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return start("nginx-backend", argv, port=port, cpu=None, log_dir=prefix)


def start_sim(work: Path, _nofile: int) -> Service:
    """bench.simbackend: the Python simulated vLLM (S1's backend in bench.run)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.simbackend", f"--port={port}", "--keepalive-s=5"]
    return start("simbackend", argv, port=port, cpu=None, log_dir=work, cwd=ROOT)


BACKENDS: dict[str, Callable[[Path, int], Service]] = {"nginx": start_canned, "sim": start_sim}


def gateway_yaml(backend_port: int, workers: int) -> str:
    """The default config but for the worker count, over one backend serving `sim-model`."""
    return (
        "server:\n"
        "  host: 127.0.0.1\n"
        f"  workers: {workers}\n"
        "  access_log: true  # the default, as in production: one JSON line per request\n"
        "backends:\n"
        f"  backend: {{url: 'http://127.0.0.1:{backend_port}', kind: vllm, health_path: /health}}\n"
        "models:\n"
        "  sim-model: {targets: [{backend: backend}]}\n"
    )


# -- one measured window --------------------------------------------------------------------
def machine_seconds() -> tuple[float, float]:
    """Every CPU's busy seconds so far, steal left out, and the steal seconds (/proc/stat).

    Steal is time the hypervisor gave this VM's CPUs to someone else: not work on this machine,
    but time our processes could not run, so it is counted apart.
    """
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


class Window:
    """CPU used during the `with` block: the gateway (each process), the backend, wrk, the rest.

    Every figure is in cores (CPU seconds / wall seconds). wrk's is this process's children's
    rusage (wrk is the only child that ends inside the window); "other" is every CPU's busy time
    from /proc/stat (steal left out) less all of ours: other work on the machine shows there;
    "steal" is the hypervisor's.
    """

    def __init__(self, gateway_pid: int, backend_pid: int) -> None:
        self.gateway_pid = gateway_pid
        self.backend_pid = backend_pid
        self.pids = [p for p in tree(gateway_pid) if p != gateway_pid] or [gateway_pid]
        self.cores: dict[str, Any] = {}

    def _read(self) -> tuple[float, dict[int, float], float, float, tuple[float, float]]:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (
            time.perf_counter(),
            {p: cpu_seconds(p) for p in {self.gateway_pid, *self.pids}},
            cpu_seconds(self.backend_pid),
            usage.ru_utime + usage.ru_stime,
            machine_seconds(),
        )

    def __enter__(self) -> Window:
        self._before = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        t1, gw1, be1, wrk1, (busy1, steal1) = self._read()
        t0, gw0, be0, wrk0, (busy0, steal0) = self._before
        wall = t1 - t0
        gateway = (gw1[self.gateway_pid] - gw0[self.gateway_pid]) / wall  # the whole tree
        per_worker = [round((gw1[p] - gw0[p]) / wall, 2) for p in self.pids]
        backend, wrk = (be1 - be0) / wall, (wrk1 - wrk0) / wall
        self.cores = {
            "gateway": round(gateway, 2),
            "per_worker": per_worker,
            "backend": round(backend, 2),
            "wrk": round(wrk, 2),
            "other": round(max(0.0, (busy1 - busy0) / wall - gateway - backend - wrk), 2),
            "steal": round((steal1 - steal0) / wall, 2),
            "wall_s": round(wall, 2),
        }


def gateway_run(
    shape: str, backend: Service, workers: int, index: int, settings: Settings, work: Path
) -> dict[str, Any]:
    """Start the gateway with `workers`, warm it up, measure S1's shape, stop it."""
    config = work / f"gateway-{shape}-{workers}w.yaml"
    config.write_text(gateway_yaml(backend.port, workers))
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "--config", str(config), "--port", str(port)]
    name = f"gateway-{shape}-{workers}w-run{index}"
    gateway = start(name, argv, port=port, cpu=None, log_dir=work, timeout_s=60, cwd=ROOT)
    try:
        if workers > 1:
            run(all_answer(gateway.url, workers))
        url = gateway.url + "/v1/chat/completions"
        n = settings.connections
        run_wrk(url, BODY, connections=n, duration_s=settings.warmup_s, cpu=None)
        with Window(gateway.pid, backend.pid) as window:
            wrk = run_wrk(url, BODY, connections=n, duration_s=settings.measure_s, cpu=None)
        allowed = {str(p): sorted(os.sched_getaffinity(p)) for p in window.pids}
    finally:
        stop(gateway, timeout_s=40)
    cpu_us = window.cores["gateway"] * window.cores["wall_s"] * 1e6 / max(1, wrk["requests"])
    return {
        "workers": workers,
        "run": index,
        **wrk,
        "cores": window.cores,
        "gateway_cpu_us_per_request": round(cpu_us, 1),
        "cpus_allowed": allowed,
        "log": str(gateway.log),
    }


def shape_part(shape: str, settings: Settings, work: Path, nofile: int) -> dict[str, Any]:
    """The backend alone (wrk straight at it), then the alternated gateway runs."""
    backend = BACKENDS[shape](work, nofile)
    try:
        url = backend.url + "/v1/chat/completions"
        n = settings.connections
        run_wrk(url, BODY, connections=n, duration_s=1, cpu=None)
        direct = run_wrk(url, BODY, connections=n, duration_s=settings.direct_s, cpu=None)
        log(f"{shape}: backend alone: {direct['requests_per_s']:,.0f} req/s")
        runs = []
        for index in range(settings.rounds[shape]):
            for workers in WORKER_COUNTS:
                figures = gateway_run(shape, backend, workers, index, settings, work)
                log(f"{shape}: {workers} worker(s), run {index}: {workersreport.brief(figures)}")
                runs.append(figures)
    finally:
        stop(backend)
    return {"direct": direct, "runs": runs, "summary": workersreport.summarize_runs(runs)}


# -- the scrape (bench/scrape.py, as it is) -------------------------------------------------
def _busy_and_children() -> tuple[float, float, float, float]:
    """Now, busy and steal seconds (machine_seconds), this process's reaped children's CPU."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, steal = machine_seconds()
    return time.perf_counter(), busy, steal, usage.ru_utime + usage.ru_stime


def scrape_part(settings: Settings) -> dict[str, Any]:
    """`python -m bench.scrape` with 2 workers and 100 models; its table, parsed."""
    argv = [
        sys.executable, "-m", "bench.scrape",
        "--workers", str(settings.scrape_workers), "--models", str(settings.scrape_models),
    ]  # fmt: skip
    before = _busy_and_children()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False, cwd=ROOT)
    after = _busy_and_children()
    if done.returncode != 0:
        raise RuntimeError(f"bench.scrape exited {done.returncode}: {done.stderr[-800:]}")
    wall, busy, steal, ours = (a - b for a, b in zip(after, before, strict=True))
    return {
        "command": "python -m bench.scrape " + " ".join(argv[3:]),
        # Every CPU's busy time less bench.scrape's and its processes' (all reaped by it).
        "other_cores": round(max(0.0, (busy - ours) / wall), 2),
        "steal_cores": round(steal / wall, 2),
        "rows": workersreport.parse_scrape(done.stdout),
        "output": done.stdout,
    }


# -- the entry point ------------------------------------------------------------------------
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:5.0f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run of every part")
    parser.add_argument("--shapes", default="nginx,sim", help="comma list of: nginx, sim")
    parser.add_argument("--no-scrape", action="store_true", help="leave bench.scrape out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--results-md",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the Workers section of bench/RESULTS.md (default: full runs of every part)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in BACKENDS]
    if unknown:
        print(f"unknown shapes: {', '.join(unknown)} (known: nginx, sim)", file=sys.stderr)
        return 2
    missing = [t for t in ("wrk",) if shutil.which(t) is None]
    missing += ["nginx"] if "nginx" in shapes and nginx_binary() is None else []
    if missing:
        print(f"missing {', '.join(missing)}: run bench/ensure_tools.sh", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings.full()
    work = args.out / "work-workers"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    nofile = raise_nofile_limit()
    results: dict[str, Any] = {
        "meta": fleetreport.meta(ROOT, argv, args.quick, asdict(settings), "bench.workers"),
        "shapes": {},
    }
    for shape in shapes:
        results["shapes"][shape] = shape_part(shape, settings, work, nofile)
    if not args.no_scrape:
        log("scrape: python -m bench.scrape (2 workers, 100 models)")
        results["scrape"] = scrape_part(settings)
    results["meta"]["elapsed_s"] = round(time.monotonic() - STARTED, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "workers.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    every_part = shapes == list(BACKENDS) and not args.no_scrape
    if args.results_md if args.results_md is not None else (every_part and not args.quick):
        path = ROOT / "bench" / "RESULTS.md"
        old = path.read_text() if path.exists() else "# Benchmark results\n"
        section = workersreport.markdown(results)
        path.write_text(sections.replace(old, workersreport.TITLE, section))
        print(f"wrote the {workersreport.TITLE} section of {path}")
    print(f"wrote {args.out / 'workers.json'}; logs in {work}\n")
    print(workersreport.text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
