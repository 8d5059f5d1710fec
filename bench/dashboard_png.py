"""docs/dashboard.png: the Grafana dashboard's queries plotted from a real Prometheus.

Runs tests/dashboard_scene.py's gateway (two workers, fake backends) under its traffic for a
while, with Prometheus scraping it every second; the spare backend is unplugged two thirds of
the way through. Then every panel of conf/grafana/inference-proxy.json is drawn from
/api/v1/query_range, one subplot per panel, its legend as Grafana's `legendFormat` writes it.
Needs Debian's `prometheus` and matplotlib (requirements/bench.txt):

    .venv/bin/python -m bench.dashboard_png --seconds 90
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.aio import run
from tests.dashboard_scene import ROOT, scene
from tests.prometheus_fixture import JOB, Prometheus

DASHBOARD = ROOT / "conf" / "grafana" / "inference-proxy.json"
STEP_S = 2
# What Grafana substitutes with a 1 s scrape and a range of a few minutes.
VARIABLES = {"$__rate_interval": "10s", "$__interval": f"{STEP_S}s", "$job": JOB}
SCALE = {"percentunit": (100, "%"), "bytes": (2**-20, "MiB"), "s": (1, "s"), "reqps": (1, "/s")}

Series = tuple[str, list[float], list[float]]  # legend, times (s from the start), values


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


async def record(seconds: float) -> tuple[list[tuple[dict[str, Any], list[Series]]], float]:
    """Each panel with its series over the run, and the unplug's time from the start."""
    with tempfile.TemporaryDirectory(prefix="dashboard-png-") as directory:
        async with scene(Path(directory)) as gateway, aiohttp.ClientSession() as session:
            stop = asyncio.Event()
            traffic = asyncio.create_task(gateway.traffic(stop, rounds=10_000))
            prometheus = Prometheus(Path(directory), [f"127.0.0.1:{gateway.port}"], [])
            try:
                await prometheus.ready(session)
                start = time.time()
                await asyncio.sleep(seconds * 2 / 3)
                await gateway.unplug("spare")
                unplugged = time.time() - start
                await asyncio.sleep(seconds / 3)
                end = time.time()
                drawn = []
                for panel in panels():
                    series: list[Series] = []
                    for target in panel["targets"]:
                        data = await prometheus.get(
                            session,
                            "/api/v1/query_range",
                            query=substitute(target["expr"]),
                            start=str(start),
                            end=str(end),
                            step=str(STEP_S),
                        )
                        for result in data["result"]:
                            times = [float(t) - start for t, _ in result["values"]]
                            values = [float(v) for _, v in result["values"]]
                            label = legend(target["legendFormat"], result["metric"])
                            series.append((label, times, values))
                    drawn.append((panel, series))
            finally:
                stop.set()
                await traffic
                prometheus.kill()
    return drawn, unplugged


def plot(drawn: list[tuple[dict[str, Any], list[Series]]], unplugged: float, out: Path) -> None:
    import matplotlib as mpl  # a bench dependency, not the gateway's

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # after mpl.use("Agg")

    columns = 4
    rows = -(-len(drawn) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(20, 3.3 * rows), dpi=80, squeeze=False)
    for ax, (panel, series) in zip(axes.flat, drawn, strict=False):
        factor, unit = SCALE.get(panel["fieldConfig"]["defaults"].get("unit", ""), (1, ""))
        for label, times, values in series[:10]:
            ax.plot(times, [v * factor for v in values], linewidth=1.2, label=label)
        ax.axvline(unplugged, color="grey", linestyle=":", linewidth=1)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=6, loc="upper left", ncols=2)
    for ax in axes.flat[len(drawn) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds (dotted: the spare backend unplugged)", fontsize=8)
    fig.suptitle(
        "inference-proxy dashboard: its queries on a real Prometheus, a two-worker gateway "
        "under test traffic",
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90, help="length of the run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args(argv)
    drawn, unplugged = run(record(args.seconds))
    plot(drawn, unplugged, args.out)
    print(f"wrote {args.out}: {len(drawn)} panels")


if __name__ == "__main__":
    main()
