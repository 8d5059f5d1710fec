"""One set of metric families from the snapshots of a gateway's workers (pure).

Each worker tallies its own requests. A scrape lands on one worker, which asks its peers for
their snapshots (`proxy/workermetrics.py`) and merges them here with its own:

- counters and histograms are summed per label set, exactly;
- `proxy_in_flight_requests` and `proxy_queue_depth` are summed: each request is in one worker;
- every other gauge (`proxy_backend_up`: each worker probes the backends on its own) and every
  `process_*` family get a `worker` label instead, because a sum of them means nothing;
- `proxy_workers` and `proxy_workers_answered` say how many workers there are and how many
  answered this scrape, so a missing worker shows instead of silently lowering the totals.

A snapshot is a worker's families (`proxy/exposition.py`) in msgpack; a peer's is decoded into
those Structs, which check names and types, so garbage is refused whole; a peer's family that
does not fit the scraping worker's own is left out with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from proxy.exposition import Family, Series

# Gauges whose sum over workers is the gateway's figure (a request is in one worker only).
SUMMED_GAUGES = frozenset({"proxy_in_flight_requests", "proxy_queue_depth"})
WORKER_LABEL = "worker"


class Snapshot(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a worker answers on its metrics socket."""

    version: Literal[1]
    families: list[Family]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def encode(families: list[Family]) -> bytes:
    return _encoder.encode(Snapshot(1, families))


def decode(data: bytes) -> list[Family]:
    """A peer's snapshot; raises msgspec.DecodeError (ValidationError too) when it is not one."""
    return _decoder.decode(data).families


@dataclass
class Merged:
    """The merged families, and what was left out of them and why (for the log)."""

    families: list[Family]
    left_out: list[str] = field(default_factory=list)


def rule(family: Family) -> Literal["sum", "per_worker"]:
    """How a family's series from several workers combine."""
    if family.name.startswith("process_"):
        return "per_worker"
    if family.type in ("counter", "histogram") or family.name in SUMMED_GAUGES:
        return "sum"
    return "per_worker"


def merge(snapshots: Sequence[tuple[str, Sequence[Family]]], expected: int) -> Merged:
    """Merge `(worker label, families)` pairs, the scraping worker's own first.

    The first snapshot decides which families exist, their types and label names: a peer's
    family that it lacks or that differs, or whose series do not have the family's shape, is
    left out, so no snapshot can make the exposition invalid. `expected`: how many workers.
    """
    left_out: list[str] = []
    own = {f.name: f for f in snapshots[0][1]} if snapshots else {}
    parts: dict[str, list[tuple[str, Family]]] = {name: [] for name in own}
    for worker, families in snapshots:
        for family in families:
            reason = _misfit(family, own.get(family.name))
            if reason:
                left_out.append(f"worker {worker}: {family.name}: {reason}")
            else:
                parts[family.name].append((worker, family))
    merged = [_merge_family(own[name], group) for name, group in parts.items() if group]
    merged.append(_gauge("proxy_workers", "Serving processes the gateway runs.", expected))
    merged.append(
        _gauge(
            "proxy_workers_answered",
            "Workers whose tallies are in this scrape (below proxy_workers when one did not "
            "answer in time: the totals then miss its share).",
            len(snapshots),
        )
    )
    return Merged(merged, left_out)


def _misfit(family: Family, own: Family | None) -> str:
    """Why `family` cannot be merged into `own`, or '' when it can."""
    if own is None:
        return "not a family of this worker"
    if family.type != own.type:
        return f"{family.type}, not {own.type}"
    if family.labels != own.labels:
        return f"labels {list(family.labels)}, not {list(own.labels)}"
    bounds = family.bounds
    if family.type != "histogram" and bounds:
        return "bounds on a family that is not a histogram"
    if family.type == "histogram" and not all(
        math.isfinite(b) and a < b for a, b in zip((-math.inf, *bounds), bounds, strict=False)
    ):
        return "bounds not finite and increasing"
    width = len(bounds) + 2 if family.type == "histogram" else 1
    if any(len(s.values) != width or len(s.labels) != len(own.labels) for s in family.series):
        return "a series of another shape"
    return ""


def _merge_family(own: Family, group: list[tuple[str, Family]]) -> Family:
    if rule(own) == "per_worker":
        per_worker = {
            (*s.labels, worker): s.values for worker, family in group for s in family.series
        }
        series = [Series(list(k), v) for k, v in per_worker.items()]
        return Family(own.name, own.type, own.help, (*own.labels, WORKER_LABEL), series)
    bounds = own.bounds
    if own.type == "histogram" and any(f.bounds != bounds for _, f in group):
        bounds = tuple(sorted({b for _, f in group for b in f.bounds}))
        group = [(w, _rebucket(f, bounds)) for w, f in group]
    totals: dict[tuple[str, ...], list[float]] = {}
    for _, family in group:
        for s in family.series:
            key = tuple(s.labels)
            before = totals.get(key)
            if before is None:
                totals[key] = list(s.values)
            else:
                for i, value in enumerate(s.values):
                    before[i] += value
    series = [Series(list(k), v) for k, v in totals.items()]
    return Family(own.name, own.type, own.help, own.labels, series, bounds)


def _rebucket(family: Family, bounds: tuple[float, ...]) -> Family:
    """`family`'s histograms on other `bounds` (a superset of its own).

    A worker started under another `timeouts.max_request_s` has other duration bounds. At a
    bound it lacks, its cumulative count is the one at its next bound below, so the merged
    histogram stays cumulative and is exact at every bound the workers share (and at +Inf).
    """
    series = []
    for s in family.series:
        counts, at, running = [], 0, 0.0
        for bound in bounds:
            while at < len(family.bounds) and family.bounds[at] <= bound:
                running = s.values[at]
                at += 1
            counts.append(running)
        series.append(Series(s.labels, [*counts, *s.values[-2:]]))
    return Family(family.name, family.type, family.help, family.labels, series, bounds)


def _gauge(name: str, doc: str, value: float) -> Family:
    return Family(name, "gauge", doc, (), [Series([], [float(value)])])
