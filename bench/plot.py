"""The PNG: time to first event against concurrency, p50 and p99, one colour per path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"direct": "#4c72b0", "nginx": "#55a868", "floor": "#8172b2", "proxy": "#c44e52"}


def plot_ttfe(sweep: dict[str, dict[str, Any]], out: Path, title_note: str) -> Path | None:
    """Draw `sweep` ({path: {concurrency: ttfe summary}}) to `out`; None without matplotlib."""
    try:
        import matplotlib as mpl  # optional: the table and JSON do without it

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # after mpl.use("Agg")
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for path, points in sweep.items():
        xs = sorted(int(c) for c, s in points.items() if s)
        if not xs:
            continue
        colour = COLOURS.get(path)
        for pct, style in (("p50", "--"), ("p99", "-")):
            ys = [max(points[str(x)][pct], 0.01) for x in xs]
            ax.plot(xs, ys, style, marker="o", color=colour, label=f"{path} {pct}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("time to first event (ms)")
    ax.set_title(f"Time to first event vs concurrency\n{title_note}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncols=3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
