"""bench.growth's tables, the steps they show, the plot and the ## Growth section (pure but
the plot)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.plot import COLOURS
from bench.report import dig, fmt

TITLE = "Growth"
PATHS = ("direct", "nginx", "floor", "proxy")
PER_UNIT_RISE = 1.25  # a per-unit figure (per event, per stream) that rises more is a step
TOTAL_SLACK = 1.25  # a total that grows this much faster than its x is a step


@dataclass(frozen=True, slots=True)
class Table:
    """One figure against one sweep's points, a row per path.

    `per_unit`: the figure is per request, event or stream of a sweep over their number or
    length, so it should stay flat; else it may grow at most as fast as the points do."""

    title: str
    points: tuple[str, ...]  # the sweep's keys, numbers as text
    labels: tuple[str, ...]  # the column headings
    rows: dict[str, list[float | None]]
    per_unit: bool


def _size_label(size: str) -> str:
    n = int(size)
    return f"{n // 1024 // 1024} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


def _table(
    results: dict[str, Any], sweep: str, title: str, keys: tuple[str, ...], per_unit: bool
) -> Table:
    points = tuple(sorted(results.get(sweep, {}), key=int))
    labels = tuple(_size_label(p) if sweep == "body" else f"{int(p):,}" for p in points)
    rows = {
        path: [dig(results, sweep, point, path, *keys) for point in points]
        for path in PATHS
        if any(dig(results, sweep, point, path, *keys) is not None for point in points)
    }
    return Table(title, points, labels, rows, per_unit)


def _bytes_per_stream(results: dict[str, Any]) -> Table:
    """RSS with the streams open less RSS before the sweep's first point, per stream."""
    sweep = results.get("concurrency", {})
    points = tuple(sorted(sweep, key=int))
    rows: dict[str, list[float | None]] = {}
    for path in PATHS:
        idle = dig(sweep, points[0], path, "rss_bytes", "start") if points else None
        values: list[float | None] = []
        for point in points:
            peak = dig(sweep, point, path, "rss_bytes", "peak")
            values.append(
                None if idle is None or peak is None else round((peak - idle) / int(point))
            )
        if any(v is not None for v in values):
            rows[path] = values
    labels = tuple(f"{int(p):,}" for p in points)
    return Table("bytes per open stream, against concurrent streams", points, labels, rows, True)


def tables(results: dict[str, Any]) -> list[Table]:
    """The growth tables, in the order of the plot's panels."""
    return [
        _table(
            results,
            "body",
            "CPU-us per request, against prompt size",
            ("proxy_cpu_us_per_request",),
            False,
        ),
        _table(
            results, "body", "latency p99 (ms), against prompt size", ("latency_ms", "p99"), False
        ),
        _table(
            results,
            "length",
            "CPU-us per event, against stream length (events)",
            ("proxy_cpu_us_per_chunk",),
            True,
        ),
        _table(
            results,
            "concurrency",
            "first event p99 (ms), against concurrent streams",
            ("ttfe_ms", "p99"),
            False,
        ),
        _table(
            results,
            "concurrency",
            "peak RSS (MiB), against concurrent streams",
            ("rss_mib", "peak"),
            False,
        ),
        _bytes_per_stream(results),
    ]


def steps(found: list[Table]) -> list[str]:
    """Where a figure grows faster than it may: a per-unit figure that rises by more than
    PER_UNIT_RISE from one point to the next, or a total that outgrows its points'
    ratio by more than TOTAL_SLACK (the gateway and the floor only: the references are not
    ours to explain)."""
    notes = []
    for table in found:
        for path in ("floor", "proxy"):
            values = table.rows.get(path)
            if values is None:
                continue
            for i in range(1, len(values)):
                a, b = values[i - 1], values[i]
                if a is None or b is None or a <= 0:
                    continue
                grew = b / a
                allowed = PER_UNIT_RISE
                if not table.per_unit:
                    allowed = TOTAL_SLACK * int(table.points[i]) / int(table.points[i - 1])
                if grew > allowed:
                    notes.append(
                        f"{path}, {table.title}: x{grew:.2f} from {table.labels[i - 1]} to "
                        f"{table.labels[i]} ({fmt(a)} -> {fmt(b)})"
                    )
    return notes


def _cells(table: Table) -> tuple[list[str], list[list[str]]]:
    header = ["path", *table.labels]
    body = [[path, *(fmt(v) for v in values)] for path, values in table.rows.items()]
    return header, body


def text(table: Table) -> str:
    header, body = _cells(table)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        ).rstrip()
        for cells in [header, *body]
    ]
    return "\n".join([table.title, *lines[:1], "-" * len(lines[0]), *lines[1:]])


def markdown(table: Table) -> str:
    header, body = _cells(table)
    lines = [f"**{table.title}**", "", "| " + " | ".join(header) + " |"]
    lines.append("| --- |" + " ---: |" * (len(header) - 1))
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def section(results: dict[str, Any], found: list[Table], plot: str | None) -> str:
    """The ## Growth section of bench/RESULTS.md."""
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        f"## {TITLE}",
        "",
        "Written by `make bench-growth` (`python -m bench.growth --results-md`); bench/README.md "
        "explains each sweep. CPU figures are the process's own (from /proc); latency and "
        "RSS come from the same runs.",
        "",
        f"- date: {meta['date']}, commit: {meta['commit']}",
        f"- machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}",
        f"- run: `{meta['command']}` in {meta['elapsed_s']:.0f} s"
        + (" (quick: short runs, indicative only)" if meta["quick"] else ""),
    ]
    for where, reason in results.get("failures", {}).items():
        lines.append(f"- **{where} failed**: {reason}")
    lines.append("")
    for table in found:
        lines += [markdown(table), ""]
    if plot:
        lines += [f"![growth]({plot})", ""]
    notes = steps(found)
    lines.append(
        "Steps (a per-unit figure rising by more than "
        f"{PER_UNIT_RISE:g}x between points, or a total outgrowing its points by more than "
        f"{TOTAL_SLACK:g}x), floor and proxy:" + ("" if notes else " none.")
    )
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> Path | None:
    """One panel per table, log-log, a line per path; None without matplotlib."""
    try:
        import matplotlib as mpl  # optional: the tables and JSON do without it

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # after mpl.use("Agg")
        from matplotlib.ticker import NullLocator
    except ImportError:
        return None
    found = tables(results)
    fig, axes = plt.subplots(2, 3, figsize=(14, 8), dpi=100)
    for ax, table in zip(axes.flat, found, strict=False):
        xs = [int(p) for p in table.points]
        for path, values in table.rows.items():
            pairs = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None and v > 0]
            if pairs:
                ax.plot(*zip(*pairs, strict=True), marker="o", color=COLOURS.get(path), label=path)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(table.title, fontsize=9)
        ax.set_xticks(xs, table.labels, fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())  # the points are the ticks
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
