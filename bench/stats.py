"""Summaries of samples: nearest-rank percentiles, pure and dependency-free."""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50, 90, 99)


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted samples (NaN when there are none)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean of the samples, rounded to 3 decimals; {} when empty."""
    if not samples:
        return {}
    ordered = sorted(samples)
    out = {f"p{p}": round(percentile(ordered, p), 3) for p in PERCENTILES}
    out["max"] = round(ordered[-1], 3)
    out["mean"] = round(sum(ordered) / len(ordered), 3)
    return out
