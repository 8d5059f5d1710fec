"""Metric families as plain values, and the Prometheus text format they render as (pure).

A family holds its label names once and one `Series` per label set: a counter's or gauge's
value, or a histogram's cumulative bucket counts (one per bound, then +Inf) and its sum. That
is what the gateway tallies, what a worker sends its peers (`proxy/metrics_merge.py`), and a
tenth of the values of the sample lines it renders as, so building, sending and merging it is
cheap. The text is written as prometheus_client's `generate_latest` writes it, byte for byte
(the tests compare the two): labels sorted by name, values as Go prints floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Literal

import msgspec
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

MetricName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")]
LabelName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]
FamilyType = Literal["counter", "gauge", "histogram"]

# How Go (and so Prometheus) prints a float: `+Inf`, `NaN`, `1.2e+07`, `0.25`.
_number: Callable[[float], str] = floatToGoString


class Series(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One label set: its values in the family's label order, and its numbers (a counter's or
    gauge's one value; a histogram's cumulative count per bound, at +Inf, then its sum)."""

    labels: list[str]
    values: list[float]


class Family(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One metric family; a counter's name is without `_total`, as prometheus_client has it."""

    name: MetricName
    type: FamilyType
    help: str
    labels: tuple[LabelName, ...]
    series: list[Series]
    bounds: tuple[float, ...] = ()  # a histogram's finite upper bounds, in order


def render(families: Iterable[Family]) -> bytes:
    """The text exposition format (version 0.0.4)."""
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        doc = family.help.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
        if family.type == "histogram":
            _histogram_lines(family, out)
            continue
        order = sorted(range(len(family.labels)), key=family.labels.__getitem__)
        for series in family.series:
            labels = _labels(family.labels, series.labels, order)
            out.append(f"{name}{labels} {_number(series.values[0])}\n")
    return "".join(out).encode()


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(names: tuple[str, ...], values: list[str], order: list[int]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{names[i]}="{_escape(values[i])}"' for i in order) + "}"


def _histogram_lines(family: Family, out: list[str]) -> None:
    """Each series' `_bucket` lines (with `le` among the labels in name order), `_count`, `_sum`."""
    names = (*family.labels, "le")
    order = sorted(range(len(names)), key=names.__getitem__)
    at = order.index(len(family.labels))  # where `le` goes
    les = [*(repr(float(b)) for b in family.bounds), "+Inf"]
    bucket, count, total = (family.name + s for s in ("_bucket", "_count", "_sum"))
    plain = order[:at] + order[at + 1 :]
    counts = _Spelled()  # bucket counts repeat (0, 1, 2...): each is spelled once
    for series in family.series:
        before = "".join(f'{names[i]}="{_escape(series.labels[i])}",' for i in order[:at])
        after = "".join(f',{names[i]}="{_escape(series.labels[i])}"' for i in order[at + 1 :])
        for le, value in zip(les, series.values, strict=False):
            out.append(f'{bucket}{{{before}le="{le}"{after}}} {counts[value]}\n')
        labels = _labels(family.labels, series.labels, plain)
        out.append(f"{count}{labels} {_number(series.values[-2])}\n")
        out.append(f"{total}{labels} {_number(series.values[-1])}\n")


class _Spelled(dict[float, str]):
    """Numbers as Go spells them, each worked out once (counts only: never -0.0 or NaN)."""

    def __missing__(self, value: float) -> str:
        spelled = self[value] = _number(value)
        return spelled


def from_prometheus(metrics: Iterable[Metric]) -> Iterator[Family]:
    """prometheus_client's counter and gauge families (the process collector's) as Families."""
    for metric in metrics:
        if metric.type not in ("counter", "gauge"):
            continue
        wanted = metric.name + "_total" if metric.type == "counter" else metric.name
        samples = [s for s in metric.samples if s.name == wanted]
        names = tuple(sorted(samples[0].labels)) if samples else ()
        series = [Series([s.labels[n] for n in names], [float(s.value)]) for s in samples]
        yield Family(metric.name, metric.type, metric.documentation, names, series)  # type: ignore[arg-type]  # checked above
