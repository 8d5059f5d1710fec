"""One set of metric families from the snapshots of a gateway's workers (pure).

Each worker tallies its own requests. A scrape lands on one worker, which asks its peers for
their snapshots (`proxy/workermetrics.py`) and merges them here with its own:

- counters and histograms are summed per label set, exactly;
- `proxy_in_flight_requests` and `proxy_queue_depth` are summed: each request is in one worker;
- every other gauge (`proxy_backend_up`: each worker probes the backends on its own) and every
  `process_*` family get a `worker` label instead, because a sum of them means nothing;
- `proxy_workers` and `proxy_workers_answered` say how many workers there are and how many
  answered this scrape, so a missing worker shows;
- counters and histograms never go down while the gateway runs: a worker that does not answer
  is counted at its last counts, and one that restarted adds its predecessor's last counts
  (`proxy/metrics_ledger.py` keeps them), so Prometheus never reads a restart as a reset.

A snapshot is a worker's families (`proxy/exposition.py`) in msgpack; a peer's is decoded into
those Structs, which check names and types, so garbage is refused whole; a peer's family that
does not fit the scraping worker's own is left out with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from proxy.exposition import Family, Series

# Gauges whose sum over workers is the gateway's figure (a request is in one worker only).
SUMMED_GAUGES = frozenset({"proxy_in_flight_requests", "proxy_queue_depth"})
WORKER_LABEL = "worker"


class Snapshot(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a worker answers on its metrics socket: its families, and which process (by its
    wall-clock start) counted them when (a monotonic clock, compared within one process)."""

    version: Literal[1]
    started_ns: int
    taken_ns: int
    families: list[Family]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def encode(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


def decode(data: bytes) -> Snapshot:
    """A peer's snapshot; raises msgspec.DecodeError (ValidationError too) when it is not one."""
    return _decoder.decode(data)


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


def carried(family: Family) -> bool:
    """Whether a family counts since its worker started (summed counters and histograms), so
    a worker's last counts still belong in the totals once it has stopped answering."""
    return family.type in ("counter", "histogram") and rule(family) == "sum"


Part = tuple[str, Sequence[Family]]


def merge(fresh: Sequence[Part], expected: int, counted: Sequence[Part] | None = None) -> Merged:
    """Merge `(worker label, families)` pairs that answered this scrape, its own first.

    `counted`, when given, is where the carried families (counters and histograms) come from
    instead: every worker's latest counts and those of workers since restarted (the ledger).
    The first snapshot decides which families exist, their types and label names: another's
    family that it lacks or that differs, or whose series do not have the family's shape, is
    left out, so no snapshot can make the exposition invalid. `expected`: how many workers.
    """
    own = {f.name: f for f in fresh[0][1]} if fresh else {}
    left_out: list[str] = []
    parts: dict[str, list[tuple[str, Family]]] = {}

    def gather(snapshots: Sequence[Part], wanted: Callable[[Family], bool], note: bool) -> None:
        for worker, families in snapshots:
            for family in families:
                reference = own.get(family.name)
                if reference is None:
                    if note:
                        left_out.append(
                            f"worker {worker}: {family.name}: not a family of this worker"
                        )
                    continue
                if not wanted(reference):
                    continue
                reason = _misfit(family, reference)
                if reason:
                    left_out.append(f"worker {worker}: {family.name}: {reason}")
                else:
                    parts.setdefault(family.name, []).append((worker, family))

    if counted is None:
        gather(fresh, lambda _: True, note=True)
    else:
        gather(fresh, lambda f: not carried(f), note=True)
        gather(counted, carried, note=False)
    merged = [_merge_family(own[name], parts[name]) for name in own if name in parts]
    merged.append(_gauge("proxy_workers", "Serving processes the gateway runs.", expected))
    merged.append(
        _gauge(
            "proxy_workers_answered",
            "Workers that answered this scrape; below proxy_workers, the counters and "
            "histograms hold the missing one's last counts, and its gauges are absent.",
            len(fresh),
        )
    )
    return Merged(merged, left_out)


def sum_families(parts: Sequence[Sequence[Family]]) -> list[Family]:
    """Carried families summed per label set; the first of each name decides its shape, and
    any other that does not fit it is dropped."""
    first: dict[str, Family] = {}
    groups: dict[str, list[tuple[str, Family]]] = {}
    for families in parts:
        for family in families:
            reference = first.setdefault(family.name, family)
            if carried(family) and not _misfit(family, reference):
                groups.setdefault(family.name, []).append(("", family))
    return [_merge_family(first[name], group) for name, group in groups.items()]


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
