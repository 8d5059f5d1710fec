"""`python -m bench.attribution`: where the gateway's CPU per request goes, above the floor.

S1's shape (non-streaming chat, 64 wrk connections, the simulated backend answering at once),
one process under test pinned to CPU 1 (backend and wrk on CPU 0), CPU from /proc split into
user and system time, for these cases, in interleaved rounds (each figure the median):

- **floor**: `bench.floor`, aiohttp's low-level server on the gateway's upstream client;
- **floor + busy work**: the floor doing `--busy-us` microseconds of pure Python arithmetic
  per request before it forwards it (no system call, no allocation that lives). Its system
  time shows what the kernel charges a pass-through for being slower, whatever makes it so:
  on loopback, each write runs the peer's receive path and wakes the peer, and a peer that
  idles between requests (the backend, behind a slower proxy) costs more to wake;
- **gateway**: `python -m proxy --backend URL`, every default on (as `make bench` runs it);
- **gateway without X**: the same gateway with one default phase replaced by a no-op (or by
  the floor's own code), in the process under test only. Not a configuration anyone can
  choose: a measurement of what that phase costs, as the gateway runs it, with its share of
  cold caches and young collections. The phases taken out are in `PHASES`;
- **gateway without all of them**: what is left is the chain itself (aiohttp's `web.Request`
  and app, the dispatch, the middleware's frame, the request's record, the body, the plan,
  the retry loop, the attempt and the relay's start).

Every case must answer every request 200: a replaced phase that broke requests would make a
figure of nothing, so the run stops on the first error.

    python -m bench.attribution                # 3 rounds of 6 s per case; writes RESULTS.md
    python -m bench.attribution --quick        # 1 round of 2 s per case; prints only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import rounds, sections
from bench.processes import free_port, start, stop
from bench.procstat import cpu_split
from bench.scenarios import LOAD_CPU, PROXY_CPU, ROOT
from bench.wrk import run_wrk

TITLE = "Where the gateway's CPU goes"
MODEL = "sim-model"
BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there, how are you today"}],
        "max_tokens": 16,
    }
)
CONNECTIONS = 64


# --- the phases, each replaced in the process under test (`--serve-without`) ---------------


def _nothing(*_args: object) -> None:
    return None


def _no_block(*_args: object) -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


def _fixed_view() -> dict[str, object]:
    from proxy.view import peek

    view = peek(BODY, ("messages",))  # every request of the run carries this body
    return {"proxy.routes.openai:peek": lambda *_args: view}


def _floor_headers() -> dict[str, object]:
    from bench import floor

    def upstream(raw: Any, **_ignored: object) -> bytes:
        return floor.upstream_lines(raw)

    def downstream(raw: Any, **_ignored: object) -> Any:
        return floor.downstream_headers(raw)

    return {
        "proxy.forward:upstream_headers": upstream,
        "proxy.relay:downstream_headers": downstream,
    }


# name -> what it stands for, and what takes its place ("module:name" or "module:Class.name")
PHASES: dict[str, tuple[str, Callable[[], dict[str, object]]]] = {
    "access-log": ("the access-log line", lambda: {"proxy.accesslog:AccessLog.write": _nothing}),
    "metrics": (
        "the metrics tallied at the request's end (`_account`)",
        lambda: {"proxy.middleware:_account": _nothing},
    ),
    "auth": (
        "the key check (no keys configured: the call and its lookups)",
        lambda: {"proxy.middleware:authenticate": _nothing},
    ),
    "request-id": (
        "a new request id (a fixed one instead)",
        lambda: {"proxy.middleware:request_id_of": lambda _value: "bench-request-id"},
    ),
    "deadline": (
        "the request's deadline on the shared timer",
        lambda: {"proxy.deadlines:Deadlines.at": _no_block},
    ),
    "limits": (
        "the limits phase (`limited`; no limits configured)",
        lambda: {"proxy.serve:limited": _no_block},
    ),
    "peek": ("the body decoded for `model`, `stream` and the prompt", _fixed_view),
    "headers": ("the gateway's header filtering (the floor's instead)", _floor_headers),
    "usage": (
        "the token count read from the answer's tail",
        lambda: {"proxy.relay:usage_in": _nothing},
    ),
    "health": (
        "the backend's health told of a success",
        lambda: {"proxy.forward:request_succeeded": _nothing},
    ),
    "guard": (
        "the connection guard's books of busy and idle connections",
        lambda: {
            "proxy.listener:GuardedServer.request_started": _nothing,
            "proxy.listener:GuardedServer.request_finished": _nothing,
        },
    ),
}


def swap(target: str, value: object) -> None:
    """Put `value` in place of `target` ("module:name" or "module:Class.name"), which must
    exist: a phase renamed in the gateway must not leave a case that measures the whole
    gateway under its name."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    if not hasattr(owner, name):
        raise AttributeError(f"{target} does not exist: bench/attribution.py's PHASES are stale")
    setattr(owner, name, value)


def serve_without(names: list[str], proxy_argv: list[str]) -> int:
    """Run the gateway with the named phases taken out (in this process only)."""
    for name in names:
        for target, value in PHASES[name][1]().items():
            swap(target, value)
    from proxy.__main__ import main

    return main(proxy_argv)


def serve_floor_busy(busy_us: float, floor_argv: list[str]) -> None:
    """Run the floor, doing `busy_us` of pure arithmetic before each request."""
    from bench import floor

    def spin(rounds: int) -> int:
        total = 0
        for i in range(rounds):
            total += i
        return total

    began = time.process_time()
    spin(2_000_000)
    rounds = int(busy_us / 1e6 / ((time.process_time() - began) / 2_000_000))
    forward = floor.Floor.__call__

    async def busy_then_forward(self: floor.Floor, request: Any) -> Any:
        spin(rounds)
        return await forward(self, request)

    floor.Floor.__call__ = busy_then_forward  # type: ignore[method-assign]
    floor.main(floor_argv)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    argv: list[str]  # with {backend} and {port} to fill
    runs: list[dict[str, float]] = field(default_factory=list)


def cases(busy_us: float) -> list[Case]:
    gateway = ["{backend}", "--host", "127.0.0.1", "--port", "{port}"]
    me = [sys.executable, "-m", "bench.attribution"]
    floor = ["--backend", "{backend}", "--host", "127.0.0.1", "--port", "{port}"]
    out = [
        Case("floor", [sys.executable, "-m", "bench.floor", *floor]),
        Case(
            f"floor + {busy_us:.0f} us of busy work",
            [*me, "--serve-floor-busy", str(busy_us), "--", *floor],
        ),
        Case("gateway", [sys.executable, "-m", "proxy", "--backend", *gateway]),
    ]
    out += [
        Case(f"gateway without {name}", [*me, "--serve-without", name, "--", "--backend", *gateway])
        for name in PHASES
    ]
    every = ",".join(PHASES)
    out.append(
        Case(
            "gateway without all of them",
            [*me, "--serve-without", every, "--", "--backend", *gateway],
        )
    )
    return out


def measure(case: Case, backend: str, work: Path, seconds: float) -> None:
    """One run of one case: its own process, a warm-up, then the measured window."""
    port = free_port()
    argv = [a.replace("{backend}", backend).replace("{port}", str(port)) for a in case.argv]
    service = start("under-test", argv, port=port, cpu=PROXY_CPU, log_dir=work, cwd=ROOT)
    url = f"{service.url}/v1/chat/completions"
    try:
        run_wrk(url, BODY, connections=CONNECTIONS, duration_s=2.0, cpu=LOAD_CPU)
        user0, system0 = cpu_split(service.pid)
        result = run_wrk(url, BODY, connections=CONNECTIONS, duration_s=seconds, cpu=LOAD_CPU)
        user1, system1 = cpu_split(service.pid)
    finally:
        stop(service)
    if result["errors"]:
        raise RuntimeError(f"{case.name}: {result['error_kinds']} in the measured window")
    requests = max(1, result["requests"])
    per = 1e6 / requests
    case.runs.append(
        {
            "requests_per_s": result["requests_per_s"],
            "user_us": (user1 - user0) * per,
            "system_us": (system1 - system0) * per,
        }
    )


def median(case: Case, key: str) -> float:
    return statistics.median(run[key] for run in case.runs)


def _total(run: dict[str, float]) -> float:
    return run["user_us"] + run["system_us"]


def saved(gateway: Case, case: Case) -> float:
    """The median over rounds of the gateway's total less the case's in the same round: the
    machine's pace drifts between rounds more than most phases cost."""
    pairs = zip(gateway.runs, case.runs, strict=True)  # every case runs once a round
    return statistics.median(_total(g) - _total(c) for g, c in pairs)


def table(all_cases: list[Case]) -> list[str]:
    """One row per case; the gateway's rows also say what taking the phase out saved."""
    by_name = {case.name: case for case in all_cases}
    gateway = by_name["gateway"]
    floor_user = median(by_name["floor"], "user_us")
    lines = [
        "| case | requests/s | user CPU-us per request | system CPU-us | total | "
        "total, lowest and highest round | user above the floor | "
        "saved against the gateway, same round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in all_cases:
        user, system = median(case, "user_us"), median(case, "system_us")
        totals = sorted(_total(run) for run in case.runs)
        less = f"{saved(gateway, case):.1f}" if case.name.startswith("gateway without") else "-"
        lines.append(
            f"| {case.name} | {median(case, 'requests_per_s'):,.0f} | {user:.1f} | "
            f"{system:.1f} | {user + system:.1f} | {totals[0]:.1f}-{totals[-1]:.1f} | "
            f"{user - floor_user:.1f} | {less} |"
        )
    return lines


def section(lines: list[str], rounds: int, seconds: float, elapsed: float) -> str:
    about = [
        "Written by `python -m bench.attribution` (its docstring says how): S1's shape, the",
        "floor, the floor with busy work, the gateway, and the gateway with each default",
        "phase taken out in turn (in the measured process only: no configuration does",
        "this). 'saved' is the median over rounds of what the gateway's CPU per request",
        "fell by without the phase, against the gateway's own run in the same round.",
    ]
    opening = sections.stamp(rounds, seconds, elapsed, "interleaved, medians")
    body = [
        *lines,
        "",
        "The phases:",
        "",
        *(f"- `{name}`: {what}" for name, (what, _) in PHASES.items()),
    ]
    return sections.made(TITLE, about, opening, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attribution", description=__doc__.split("\n")[0]
    )
    rounds.add_options(parser, seconds=6.0)
    parser.add_argument("--busy-us", type=float, default=70.0, help="the floor's busy work")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--serve-without", help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor-busy", type=float, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.serve_without is not None:
        names = args.serve_without.split(",")
        unknown = [n for n in names if n not in PHASES]
        if unknown:
            parser.error(f"no such phase: {', '.join(unknown)} (phases: {', '.join(PHASES)})")
        return serve_without(names, rest)
    if args.serve_floor_busy is not None:
        serve_floor_busy(args.serve_floor_busy, rest)
        return 0
    count, seconds = rounds.chosen(args)
    started = time.monotonic()
    all_cases = cases(args.busy_us)
    with tempfile.TemporaryDirectory(prefix="bench-attribution-") as tmp:
        work = Path(tmp)
        backend = rounds.simbackend(work, f"--model={MODEL}", "--keepalive-s=30")
        try:
            rounds.interleaved(
                count,
                all_cases,
                lambda case: case.name,
                lambda case: measure(case, backend.url, work, seconds),
            )
        finally:
            stop(backend)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    raw = {case.name: {"argv": case.argv, "runs": case.runs} for case in all_cases}
    (out / "attribution.json").write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    lines = table(all_cases)
    print("\n".join(lines))
    if not args.no_write and not args.quick:
        sections.write(TITLE, section(lines, count, seconds, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
