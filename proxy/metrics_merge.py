"""One set of metric families from the snapshots of a gateway's workers (pure).

Each worker tallies its own requests. A scrape lands on one worker, which asks its peers for
their snapshots (`proxy/workermetrics.py`) and merges them here with its own:

- counters and histograms are summed per label set, exactly;
- `proxy_in_flight_requests` and `proxy_queue_depth` are summed: each request is in one worker;
- every other gauge (`proxy_backend_up`: each worker probes the backends on its own) and every
  `process_*` family gets a `worker` label instead, because a sum of them means nothing;
- `proxy_workers` and `proxy_workers_answered` say how many workers there are and how many
  answered this scrape, so a missing worker shows instead of silently lowering the totals.

A snapshot is the families a worker's registry collects, encoded with msgpack; a peer's is
decoded into the Structs below, which check names and types, so garbage is refused whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample as PromSample

MetricName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")]
LabelName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]
FamilyType = Literal["counter", "gauge", "histogram", "summary", "unknown"]

# Gauges whose sum over workers is the gateway's figure (a request is in one worker only).
SUMMED_GAUGES = frozenset({"proxy_in_flight_requests", "proxy_queue_depth"})
WORKER_LABEL = "worker"


class Sample(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One sample line: its full name (`_total`, `_bucket`...), labels and value."""

    name: MetricName
    labels: dict[LabelName, str]
    value: float


class Family(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One metric family as prometheus_client names it (a counter without `_total`)."""

    name: MetricName
    type: FamilyType
    help: str
    samples: list[Sample]


class Snapshot(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a worker answers on its metrics socket."""

    version: Literal[1]
    families: list[Family]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def families_of(collector: Collector) -> list[Family]:
    """The families `collector` (a registry) yields now, in the snapshot's form."""
    out = []
    for metric in collector.collect():
        if metric.type not in ("counter", "gauge", "histogram", "summary", "unknown"):
            continue  # info, stateset: none of ours
        samples = [Sample(s.name, s.labels, float(s.value)) for s in metric.samples]
        out.append(Family(metric.name, metric.type, metric.documentation, samples))  # type: ignore[arg-type]  # checked just above
    return out


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


def merge(snapshots: Sequence[tuple[str, Sequence[Family]]], expected: int) -> Merged:
    """Merge `(worker label, families)` pairs, the scraping worker's own first.

    The first snapshot decides which families exist and their types: a peer's family that it
    lacks, or that has another type or sample names that do not belong to it, is left out (so
    no snapshot can make the exposition invalid). `expected` is the number of workers.
    """
    left_out: list[str] = []
    types = {f.name: f.type for f in snapshots[0][1]} if snapshots else {}
    parts: dict[str, list[tuple[str, Family]]] = {name: [] for name in types}
    for worker, families in snapshots:
        for family in families:
            kind = types.get(family.name)
            if kind is None:
                left_out.append(f"worker {worker}: {family.name}: not a family of this worker")
            elif kind != family.type:
                left_out.append(f"worker {worker}: {family.name}: {family.type}, not {kind}")
            elif not _names_belong(family):
                left_out.append(f"worker {worker}: {family.name}: a sample of another name")
            else:
                parts[family.name].append((worker, family))
    merged = [_merge_family(name, group) for name, group in parts.items() if group]
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


def render(families: Iterable[Family]) -> bytes:
    """The text exposition format, written by prometheus_client as for one worker."""
    return generate_latest(_Families(families))


def rule(family: Family) -> Literal["sum", "per_worker"]:
    """How a family's samples from several workers combine."""
    if family.name.startswith("process_"):
        return "per_worker"
    if family.type in ("counter", "histogram") or family.name in SUMMED_GAUGES:
        return "sum"
    return "per_worker"


_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "unknown": ("",),
}


def _names_belong(family: Family) -> bool:
    names = {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return all(s.name in names for s in family.samples)


LabelKey = tuple[tuple[str, str], ...]


def _key(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


def _merge_family(name: str, group: list[tuple[str, Family]]) -> Family:
    reference = group[0][1]
    if rule(reference) == "per_worker":
        per_worker: dict[tuple[str, LabelKey], float] = {}
        for worker, family in group:
            for s in family.samples:
                labels = {**s.labels, WORKER_LABEL: worker}
                per_worker[s.name, _key(labels)] = s.value
        samples = [Sample(n, dict(k), v) for (n, k), v in per_worker.items()]
    elif reference.type == "histogram":
        samples = _merge_histograms(name, [f.samples for _, f in group])
    else:
        samples = [Sample(n, dict(k), v) for (n, k), v in _sums(f.samples for _, f in group)]
    return Family(name, reference.type, reference.help, samples)


def _sums(parts: Iterable[Iterable[Sample]]) -> Iterator[tuple[tuple[str, LabelKey], float]]:
    """Each (name, labels) summed over the parts; `_created` timestamps take the earliest."""
    totals: dict[tuple[str, LabelKey], float] = {}
    for samples in parts:
        for s in samples:
            key = (s.name, _key(s.labels))
            before = totals.get(key)
            if before is None:
                totals[key] = s.value
            elif s.name.endswith("_created"):
                totals[key] = min(before, s.value)
            else:
                totals[key] = before + s.value
    return iter(totals.items())


def _bound(le: str | None) -> float | None:
    if le is None:
        return None
    try:
        return float(le)
    except ValueError:
        return None


def _merge_histograms(name: str, parts: list[list[Sample]]) -> list[Sample]:
    """Bucket counts summed per label set (so `_count` is the `+Inf` bucket's sum).

    Workers normally share their bounds, and then each bucket is the exact sum. One started
    under another `timeouts.max_request_s` has other duration bounds: at a bound it lacks, its
    cumulative count is taken at its next bound below, so the merged histogram stays cumulative
    and exact at every bound the workers share (always at +Inf).
    """
    bucket_name = name + "_bucket"
    series: dict[LabelKey, _Series] = {}
    spelling: dict[float, str] = {}  # how the first worker wrote each bound
    for samples in parts:
        buckets: dict[LabelKey, list[tuple[float, float]]] = {}
        for s in samples:
            if s.name == bucket_name:
                le = s.labels.get("le")
                bound = _bound(le)
                if le is None or bound is None:
                    continue
                spelling.setdefault(bound, le)
                key = _key({k: v for k, v in s.labels.items() if k != "le"})
                buckets.setdefault(key, []).append((bound, s.value))
            else:
                one = series.setdefault(_key(s.labels), _Series())
                one.add(s.name, s.value)
        for key, counts in buckets.items():
            series.setdefault(key, _Series()).buckets.append(sorted(counts))
    out: list[Sample] = []
    for key, one in series.items():
        labels = dict(key)
        for bound, total in one.summed_buckets():
            out.append(Sample(bucket_name, {**labels, "le": spelling[bound]}, total))
        out.extend(Sample(n, labels, v) for n, v in one.others.items())
    return out


class _Series:
    """One histogram series across workers: their buckets, and `_count`, `_sum`..."""

    __slots__ = ("buckets", "others")

    def __init__(self) -> None:
        self.buckets: list[list[tuple[float, float]]] = []  # per worker, sorted by bound
        self.others: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        before = self.others.get(name)
        if before is None:
            self.others[name] = value
        elif name.endswith("_created"):
            self.others[name] = min(before, value)
        else:
            self.others[name] = before + value

    def summed_buckets(self) -> list[tuple[float, float]]:
        if len(self.buckets) == 1:
            return self.buckets[0]
        bounds = sorted({bound for counts in self.buckets for bound, _ in counts})
        totals = [0.0] * len(bounds)
        for counts in self.buckets:
            at, running = 0, 0.0
            for i, bound in enumerate(bounds):
                while at < len(counts) and counts[at][0] <= bound:
                    running = counts[at][1]
                    at += 1
                totals[i] += running
        return list(zip(bounds, totals, strict=True))


def _gauge(name: str, doc: str, value: float) -> Family:
    return Family(name, "gauge", doc, [Sample(name, {}, float(value))])


class _Families:
    """The merged families as a collector, for prometheus_client's text writer."""

    def __init__(self, families: Iterable[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            metric = Metric(family.name, family.help, family.type)
            metric.samples = [PromSample(s.name, s.labels, s.value) for s in family.samples]
            yield metric
