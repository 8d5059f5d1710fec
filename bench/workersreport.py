"""bench.workers' summaries, its tables and the Workers section of bench/RESULTS.md."""

from __future__ import annotations

import statistics
from typing import Any

from bench.fleetreport import Table, markdown_table, text_table

TITLE = "Workers"
SHAPE_NAMES = {"nginx": "nginx, canned answer", "sim": "bench.simbackend (Python)"}
SCRAPE_FIELDS = ("samples", "kib", "p50", "p90", "p99", "max", "sent", "counted", "answered")


def brief(run: dict[str, Any]) -> str:
    """One progress line for a gateway run."""
    c = run["cores"]
    return (
        f"{run['requests_per_s']:,.0f} req/s, p50 {run['latency_ms']['p50']} ms, "
        f"p99 {run['latency_ms']['p99']} ms, errors {run['errors']}; cores: gateway "
        f"{c['gateway']} ({'+'.join(map(str, c['per_worker']))}), backend {c['backend']}, "
        f"wrk {c['wrk']}, other {c['other']}"
    )


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per worker count: the median of each figure over its runs; then the 2-to-1 ratios."""
    out: dict[str, Any] = {}
    for workers in sorted({r["workers"] for r in runs}):
        mine = [r for r in runs if r["workers"] == workers]
        cores = [r["cores"] for r in mine]
        out[str(workers)] = {
            "runs": len(mine),
            "requests_per_s_each": [r["requests_per_s"] for r in mine],
            "requests_per_s": _median([r["requests_per_s"] for r in mine]),
            "p50_ms": _median([r["latency_ms"]["p50"] for r in mine]),
            "p99_ms": _median([r["latency_ms"]["p99"] for r in mine]),
            "p99_ms_each": [r["latency_ms"]["p99"] for r in mine],
            "errors": sum(r["errors"] for r in mine),
            "gateway_cpu_us_per_request": _median([r["gateway_cpu_us_per_request"] for r in mine]),
            "cores": {
                key: _median([c[key] for c in cores]) for key in ("gateway", "backend", "wrk")
            },
            "per_worker_cores": [  # busiest first
                _median(list(w))
                for w in zip(*(sorted(c["per_worker"], reverse=True) for c in cores), strict=True)
            ],
            "other_cores_max": max(c["other"] for c in cores),
            "other_cores": _median([c["other"] for c in cores]),
            "steal_cores": _median([c.get("steal", 0.0) for c in cores]),
        }
    one, two = out.get("1"), out.get("2")
    if one and two:
        out["ratio"] = {
            key: round(two[key] / one[key], 3) if one[key] else None
            for key in ("requests_per_s", "p50_ms", "p99_ms", "gateway_cpu_us_per_request")
        }
    return out


def parse_scrape(stdout: str) -> list[dict[str, Any]]:
    """The rows of bench.scrape's table: the setup, then its nine figures (right-aligned)."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("setup "))
    rows = []
    for line in lines[head + 1 :]:
        if not line.strip() or line.startswith("logs:"):
            break
        label, *figures = line.rsplit(None, len(SCRAPE_FIELDS))
        row: dict[str, Any] = {"setup": label.strip()}
        for key, value in zip(SCRAPE_FIELDS, figures, strict=True):
            row[key] = value if key == "answered" else float(value)
        rows.append(row)
    return rows


def _n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def throughput_table(results: dict[str, Any]) -> Table:
    header = [
        "backend", "workers", "req/s", "p50 (ms)", "p99 (ms)", "errors",
        "gateway cores (per worker)", "gateway CPU-us/request", "backend cores", "wrk cores",
        "other work, cores", "steal, cores", "backend alone, req/s",
    ]  # fmt: skip
    rows = []
    for shape, part in results["shapes"].items():
        summary = part["summary"]
        for workers in ("1", "2"):
            s = summary.get(workers)
            if s is None:
                continue
            rows.append(
                [
                    SHAPE_NAMES[shape],
                    workers,
                    _n(s["requests_per_s"], 0),
                    _n(s["p50_ms"], 2),
                    _n(s["p99_ms"], 2),
                    str(s["errors"]),
                    f"{s['cores']['gateway']:.2f} ({' + '.join(map(str, s['per_worker_cores']))})",
                    _n(s["gateway_cpu_us_per_request"]),
                    f"{s['cores']['backend']:.2f}",
                    f"{s['cores']['wrk']:.2f}",
                    f"{s['other_cores']:.2f} (max {s['other_cores_max']:.2f})",
                    f"{s['steal_cores']:.2f}",
                    _n(part["direct"]["requests_per_s"], 0),
                ]
            )
        if "ratio" in summary:
            r = summary["ratio"]
            rows.append(
                [
                    SHAPE_NAMES[shape], "2 / 1", _x(r["requests_per_s"]), _x(r["p50_ms"]),
                    _x(r["p99_ms"]), "", "", _x(r["gateway_cpu_us_per_request"]),
                    "", "", "", "", "",
                ]
            )  # fmt: skip
    return header, rows


def scrape_table(scrape: dict[str, Any]) -> Table:
    header = ["setup", "p50 = median (ms)", "p90 (ms)", "p99 (ms)", "max (ms)", "samples", "KiB"]
    header += ["requests sent", "counted by the scrape", "workers answered"]
    rows = [
        [
            r["setup"], _n(r["p50"]), _n(r["p90"]), _n(r["p99"]), _n(r["max"]), _n(r["samples"], 0),
            _n(r["kib"], 0), _n(r["sent"], 0), _n(r["counted"], 0), r["answered"],
        ]
        for r in scrape["rows"]
    ]  # fmt: skip
    return header, rows


def runs_in_order(part: dict[str, Any]) -> str:
    return ", ".join(
        f"{r['workers']}w {r['requests_per_s']:,.0f} req/s (p99 {r['latency_ms']['p99']:.1f} ms, "
        f"other work {r['cores']['other']:.2f}, steal {r['cores'].get('steal', 0.0):.2f})"
        for r in part["runs"]
    )


def _scaling_note(results: dict[str, Any]) -> str:
    """What 2 workers bought: the gateway's cores against its requests/s and CPU per request."""
    notes = []
    for shape, part in results["shapes"].items():
        one, two = part["summary"].get("1"), part["summary"].get("2")
        if not (one and two and one["cores"]["gateway"]):
            continue
        r = part["summary"]["ratio"]
        before, after = one["cores"]["gateway"], two["cores"]["gateway"]
        notes.append(
            f"{SHAPE_NAMES[shape]}: the gateway got {after / before:.2f}x the cores "
            f"({before:.2f} -> {after:.2f}), served "
            f"{_x(r['requests_per_s'])} the requests/s, at {_x(r['gateway_cpu_us_per_request'])} "
            "the CPU per request"
        )
    return "; ".join(notes)


def _busy_note(results: dict[str, Any]) -> str:
    """How busy both cores were with 2 workers: what each process took of the machine."""
    notes = []
    for shape, part in results["shapes"].items():
        s = part["summary"].get("2")
        if s is None:
            continue
        c = s["cores"]
        total = c["gateway"] + c["backend"] + c["wrk"] + s["other_cores"] + s["steal_cores"]
        notes.append(
            f"{SHAPE_NAMES[shape]}: {total:.2f} of {results['meta']['nproc']} cores busy "
            f"(gateway {c['gateway']:.2f}, backend {c['backend']:.2f}, wrk {c['wrk']:.2f}, "
            f"other {s['other_cores']:.2f}, steal {s['steal_cores']:.2f})"
        )
    return "; ".join(notes)


def text(results: dict[str, Any]) -> str:
    s = results["meta"]["settings"]
    out = [
        f"1 worker against 2: wrk, {s['connections']} connections, non-streamed chat of 16 tokens, "
        f"{s['measure_s']:.0f} s after {s['warmup_s']:.0f} s of warm-up; medians; nothing pinned "
        f"(wrk and the backend share the {results['meta']['nproc']} cores with the gateway)",
        "",
        text_table(throughput_table(results)),
        "",
    ]
    out += [f"{SHAPE_NAMES[k]}, each run: {runs_in_order(p)}" for k, p in results["shapes"].items()]
    out.append(f"with 2 workers: {_busy_note(results)}")
    out.append(f"2 workers against 1: {_scaling_note(results)}")
    if "scrape" in results:
        sc = results["scrape"]
        out += [
            "",
            f"/metrics scrape: `{sc['command']}` (other work: {sc['other_cores']:.2f} cores, "
            f"steal {sc.get('steal_cores', 0.0):.2f})",
        ]
        out.append("")
        out.append(text_table(scrape_table(results["scrape"])))
    return "\n".join(out)


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    s = m["settings"]
    mach = m["machine"]
    rounds = ", ".join(f"{SHAPE_NAMES[k]} {n}" for k, n in s["rounds"].items())
    lines = [
        f"## {TITLE}",
        "",
        "Written by `make bench-workers` (`python -m bench.workers`); bench/README.md says how "
        "each figure is made.",
        "",
        f"- date: {m['date']}; commit: {m['commit']}",
        f"- machine: {mach['cpu']}, `nproc` {m['nproc']}, {mach['memory_gib']} GiB, "
        f"Linux {mach['kernel']}, Python {mach['python']}, {mach['nginx']}, {mach['wrk']}",
        f"- run: `{m['command']}` in {m.get('elapsed_s', 0):.0f} s; "
        f"load average before: {' '.join(m['loadavg_before'])}",
        f"- **nothing pinned**: the gateway's workers, the backend and wrk share the "
        f"{m['nproc']} cores, so 2 workers cannot have 2 cores to themselves; the gateway runs "
        "the default config (access log on, standard output to a file)",
        f"- wrk, {s['connections']} keep-alive connections, non-streamed chat of 16 tokens, "
        f"{s['measure_s']:.0f} s after {s['warmup_s']:.0f} s of warm-up, the gateway started "
        f"afresh for each run; runs alternate 1, 2, 1, 2, ... (rounds: {rounds}); each figure "
        "is the median over its runs",
        "",
        "### Requests/s and p99: 1 worker against 2",
        "",
        markdown_table(throughput_table(results)),
        "",
    ]
    lines += [
        f"- {SHAPE_NAMES[k]}, each run in order: {runs_in_order(p)}"
        for k, p in results["shapes"].items()
    ]
    lines.append(f"- with 2 workers: {_busy_note(results)}")
    lines.append(f"- 2 workers against 1: {_scaling_note(results)}")
    if "scrape" in results:
        lines += [
            "",
            f"### /metrics scrape with 2 workers and 100 models (`{results['scrape']['command']}`)",
            "",
            markdown_table(scrape_table(results["scrape"])),
            "",
            "- 100 sequential scrapes of each setup after 3 of warm-up; the last row is the one "
            "an operator's Prometheus sees (`server.workers: 2`, one port); other work on the "
            f"machine during the scrape run: {results['scrape']['other_cores']:.2f} cores (steal "
            f"{results['scrape'].get('steal_cores', 0.0):.2f})",
        ]
    return "\n".join(lines) + "\n"
