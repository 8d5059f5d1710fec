"""Turn the raw figures into the summary table (text and Markdown), the JSON and RESULTS.md."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

PATHS = ("direct", "nginx", "floor", "proxy")
RATIOS = (("nginx", "direct"), ("proxy", "direct"), ("proxy", "nginx"), ("proxy", "floor"))
FLOOR_LIMIT = 1.25  # the gateway's CPU per request and per event, as a multiple of the floor's
# Per S3 shape, in order: (added first-event p99 ms, peak RSS MiB) the gateway must stay within.
S3_TARGETS = ((25.0, None), (60.0, 150.0), (100.0, 300.0))


@dataclass(frozen=True, slots=True)
class Row:
    """One figure across the paths, with the gateway's target and whether it holds."""

    label: str
    values: dict[str, float | None]
    target: str = ""
    verdict: str = ""
    ratios: bool = True


def dig(data: Any, *keys: str) -> Any:
    """data[k1][k2]...; None when any step is missing."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISS")


def _within(value: float | None, limit: float | None) -> bool | None:
    if value is None or limit is None:
        return None
    return value <= limit


def _per_path(results: dict[str, Any], *keys: str) -> dict[str, float | None]:
    return {p: dig(results, *keys[:1], p, *keys[1:]) for p in PATHS}


def _cpu_row(label: str, cpu: dict[str, float | None], nginx_times: float | None) -> Row:
    """A CPU figure with its targets: within `nginx_times` x nginx's (when given) and within
    FLOOR_LIMIT x the floor's; the verdict names each (`nginx ok, floor MISS`)."""
    checks = []
    if nginx_times is not None:
        limit = cpu["nginx"] * nginx_times if cpu["nginx"] else None
        checks.append((f"<= {nginx_times:g} x nginx", "nginx", _within(cpu["proxy"], limit)))
    limit = cpu["floor"] * FLOOR_LIMIT if cpu["floor"] else None
    checks.append((f"<= {FLOOR_LIMIT:g} x floor", "floor", _within(cpu["proxy"], limit)))
    target = ", ".join(text for text, _, _ in checks)
    verdict = ", ".join(f"{name} {_verdict(ok)}" for _, name, ok in checks if ok is not None)
    return Row(label, cpu, target, verdict)


def build_rows(results: dict[str, Any]) -> list[Row]:
    """Every figure of the summary table, in the issue's order."""
    rows = [
        Row("S1 requests/s", _per_path(results, "s1", "requests_per_s")),
        Row("S1 latency p50 (ms)", _per_path(results, "s1", "latency_ms", "p50")),
        Row("S1 latency p99 (ms)", _per_path(results, "s1", "latency_ms", "p99")),
        Row("S1 errors", _per_path(results, "s1", "errors"), ratios=False),
    ]
    cpu = _per_path(results, "s1", "proxy_cpu_us_per_request")
    rows.append(_cpu_row("S1 CPU-us per request", cpu, 4))
    for key, name, nginx_times in (("s2", "S2", 3.0), ("s2p", "S2 paced", None)):
        rows += [
            Row(f"{name} chunks/s", _per_path(results, key, "events_per_s")),
            Row(f"{name} first event p50 (ms)", _per_path(results, key, "ttfe_ms", "p50")),
            Row(f"{name} first event p99 (ms)", _per_path(results, key, "ttfe_ms", "p99")),
            Row(f"{name} errors", _per_path(results, key, "errors"), ratios=False),
        ]
        cpu = _per_path(results, key, "proxy_cpu_us_per_chunk")
        rows.append(_cpu_row(f"{name} CPU-us per chunk", cpu, nginx_times))
    for index, shape in enumerate(results.get("s3_order", [])):
        added_limit, rss_limit = S3_TARGETS[min(index, len(S3_TARGETS) - 1)]
        rows += _s3_rows(results, shape, added_limit, rss_limit)
    for phase in ("headers", "first_token", "mid_stream"):
        values = {p: _s4_worst(dig(results, "s4", p, phase)) for p in PATHS}
        rows.append(
            Row(
                f"S4 {phase} -> backend sees close, max (ms)",
                values,
                "<= 10 ms",
                _verdict(_within(values["proxy"], 10.0))
                if "proxy" in results.get("s4", {})
                else "",
            )
        )
    return rows


def _s3_rows(
    results: dict[str, Any], shape: str, added_limit: float, rss_limit: float | None
) -> list[Row]:
    errors = {p: dig(results, "s3", shape, p, "errors") for p in PATHS}
    p99 = {p: dig(results, "s3", shape, p, "ttfe_ms", "p99") for p in PATHS}
    base = p99["direct"]
    added = {
        p: (round(v - base, 3) if v is not None and base is not None else None)
        for p, v in p99.items()
    }
    rss = {p: dig(results, "s3", shape, p, "rss_mib", "peak") for p in PATHS}
    has_proxy = dig(results, "s3", shape, "proxy") is not None
    added_ok = _within(added["proxy"], added_limit)
    errors_ok = None if errors["proxy"] is None else errors["proxy"] == 0
    rows = [
        Row(f"S3 {shape} errors", errors, "0", _verdict(errors_ok), ratios=False),
        Row(f"S3 {shape} first event p99 (ms)", p99),
        Row(
            f"S3 {shape} added p99 over direct (ms)",
            added,
            f"<= {added_limit:g} ms",
            _verdict(added_ok) if has_proxy else "",
            ratios=False,
        ),
    ]
    rss_target = f"<= {rss_limit:g} MiB" if rss_limit else ""
    rss_ok = _within(rss["proxy"], rss_limit) if rss_limit else None
    rows.append(Row(f"S3 {shape} peak RSS (MiB)", rss, rss_target, _verdict(rss_ok)))
    rows.append(
        Row(
            f"S3 {shape} bytes per open stream",
            {p: bytes_per_stream(results, shape, p) for p in PATHS},
        )
    )
    rows.append(
        Row(
            f"S3 {shape} CPU-us per stream",
            {p: dig(results, "s3", shape, p, "proxy_cpu_us_per_stream") for p in PATHS},
        )
    )
    return rows


def bytes_per_stream(results: dict[str, Any], shape: str, path: str) -> float | None:
    """RSS with the shape's streams open less RSS idle, per stream. Idle is the path's RSS
    before its first S3 shape: a heap grown by an earlier shape is reused, not returned, so
    each shape's own start would leave out what it reused."""
    order = results.get("s3_order") or [shape]
    idle = dig(results, "s3", order[0], path, "rss_bytes", "start")
    peak = dig(results, "s3", shape, path, "rss_bytes", "peak")
    streams = dig(results, "s3", shape, path, "streams")
    if idle is None or peak is None or not streams:
        return None
    return float(round((peak - idle) / streams))


def _s4_worst(phase: dict[str, Any] | None) -> float | None:
    """The slowest probe of a phase; +inf when some probe was never seen by the backend."""
    if not phase:
        return None
    if phase.get("never_seen"):
        return math.inf
    worst = dig(phase, "ms", "max")
    return None if worst is None else float(worst)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if math.isinf(value):
        return "never"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(row: Row, top: str, bottom: str) -> str:
    a, b = row.values.get(top), row.values.get(bottom)
    if not row.ratios or a is None or b is None or b == 0 or math.isinf(a) or math.isinf(b):
        return "-"
    return f"{a / b:.2f}x"


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["figure", *PATHS, *(f"{a}/{b}" for a, b in RATIOS), "target", "proxy"]
    body = [
        [
            row.label,
            *(fmt(row.values.get(p)) for p in PATHS),
            *(ratio(row, a, b) for a, b in RATIOS),
            row.target,
            row.verdict,
        ]
        for row in rows
    ]
    return header, body


def text_table(rows: list[Row]) -> str:
    header, body = table_cells(rows)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(c) for c in body)])


def markdown_table(rows: list[Row]) -> str:
    header, body = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def interference(results: dict[str, Any]) -> list[str]:
    """Runs that another program may have disturbed: CPU 1 busy before, or during direct runs."""
    runs: list[tuple[str, dict[str, Any]]] = []
    for key in ("s1", "s2", "s2p"):
        runs += [(f"{key}/{p}", f) for p, f in results.get(key, {}).items()]
    for shape, by_path in results.get("s3", {}).items():
        runs += [(f"s3 {shape}/{p}", f) for p, f in by_path.items()]
    notes = []
    for where, figures in runs:
        before = figures.get("proxy_cpu_busy_before") or 0.0
        during = dig(figures, "cpu_busy", "1") or 0.0
        if before >= 0.1:
            notes.append(f"{where}: CPU 1 was {before:.0%} busy before the run started")
        elif where.endswith("/direct") and during >= 0.1:
            notes.append(f"{where}: CPU 1 was {during:.0%} busy with no proxy under test")
    return notes


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = ""
    mem_kib = 0
    try:
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return {
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _run(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": _run(["wrk", "-v"]).split("\n")[0].split(" [")[0],
    }


def commit(root: Path) -> str:
    sha = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    if len(sha) != 40:
        return "none (no commit yet)"
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return sha + (" (with uncommitted changes)" if dirty else "")


def write_json(results: dict[str, Any], rows: list[Row], out: Path) -> None:
    table = [
        {"figure": r.label, **r.values, "target": r.target, "proxy_verdict": r.verdict}
        for r in rows
    ]
    # orjson writes inf as null; "never" is kept explicit in the S4 raw figures.
    out.write_bytes(
        orjson.dumps(
            {**results, "table": table}, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
        )
    )


def results_markdown(results: dict[str, Any], rows: list[Row], plot: str | None) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench.run`); bench/README.md explains each figure.",
        "",
        f"- date: {meta['date']}",
        f"- commit: {meta['commit']}",
        f"- machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, Linux {m['kernel']}",
        f"- software: Python {m['python']}, {m['nginx']}, {m['wrk']}",
        f"- run: `{meta['command']}` in {meta['elapsed_s']:.0f} s"
        + (" (quick: short runs, targets indicative only)" if meta["quick"] else ""),
        "- pinning: simulated backend and load generators on CPU 0, the proxy under test on CPU 1",
    ]
    for path, reason in results.get("unavailable", {}).items():
        lines.append(f"- **{path} not measured**: {reason}")
    for where, reason in results.get("failures", {}).items():
        lines.append(f"- **{where} failed**: {reason}")
    notes = interference(results)
    if notes:
        lines.append(
            f"- **possible interference from other programs in {len(notes)} runs** "
            "(rerun on a quiet machine before trusting their wall-clock figures; CPU time per "
            "request or chunk is the proxy's own and suffers least):"
        )
        lines += [f"  - {note}" for note in notes]
    lines += ["", markdown_table(rows), ""]
    if plot:
        lines += [f"![time to first event vs concurrency]({plot})", ""]
    lines += [
        "`proxy` is inference-proxy with one worker; `floor` is `bench/floor.py`, aiohttp's "
        "low-level server on the gateway's upstream client and nothing else. Ratios are the "
        "first path's figure divided by the second's. The last column says whether the gateway "
        "meets issues 3 and 12's targets.",
        "",
    ]
    return "\n".join(lines)
