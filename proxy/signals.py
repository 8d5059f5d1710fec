"""The backends' own load signals, read from their `/metrics` (in the background, never on
a request's path) to refine `least_loaded`: how many requests each has queued, and how full
its KV cache is. Pure: `parse` takes the exposition text's bytes and returns a value.

| kind | queued requests | KV-cache use (0-1) |
| --- | --- | --- |
| vllm | `vllm:num_requests_waiting` | `vllm:kv_cache_usage_perc` (or `gpu_cache_usage_perc`) |
| sglang | `sglang:num_queue_reqs` | `sglang:token_usage` |
| tgi | `tgi_queue_size` | none |
| llamacpp | `llamacpp:requests_deferred` | `llamacpp:kv_cache_usage_ratio` |

Ollama and OpenAI-compatible services export none: the gateway's own in-flight count is the
only signal there. A signal older than `STALE_AFTER_INTERVALS` health intervals is ignored
(scraped gauges lag; a stale one must not steer traffic).
"""

from __future__ import annotations

import math
import re

import msgspec

STALE_AFTER_INTERVALS = 3
MAX_METRICS_BYTES = 4 * 1024 * 1024

_QUEUED: dict[str, tuple[bytes, ...]] = {
    "vllm": (b"vllm:num_requests_waiting",),
    "sglang": (b"sglang:num_queue_reqs",),
    "tgi": (b"tgi_queue_size",),
    "llamacpp": (b"llamacpp:requests_deferred",),
}
_KV: dict[str, tuple[bytes, ...]] = {
    "vllm": (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc"),
    "sglang": (b"sglang:token_usage",),
    "llamacpp": (b"llamacpp:kv_cache_usage_ratio",),
}
_SAMPLE = re.compile(rb"(?:\{[^}\n]*\})?[ \t]+([-+0-9.eEinfaINFA]+)")


class Signals(msgspec.Struct, frozen=True):
    """One scrape of a backend's own load: requests queued (summed over its series, such as
    one per model or engine) and KV-cache use (the highest of its series), or None."""

    queued: float | None
    kv: float | None
    at: float  # loop time of the scrape


def exports(kind: str) -> bool:
    """Whether a backend kind exports load signals the gateway reads."""
    return kind in _QUEUED


def parse(kind: str, text: bytes, at: float) -> Signals:
    """The load signals in a backend's Prometheus text, by its kind's metric names."""
    queued = [v for name in _QUEUED.get(kind, ()) for v in _values(text, name)]
    kv = [v for name in _KV.get(kind, ()) for v in _values(text, name)]
    return Signals(
        queued=sum(queued) if queued else None,
        kv=max(kv) if kv else None,
        at=at,
    )


def _values(text: bytes, name: str | bytes) -> list[float]:
    """Every sample value of the metric `name` (each line that starts with it), by bytes
    search: the text is never split into lines or decoded as a whole."""
    metric = name.encode() if isinstance(name, str) else name
    out: list[float] = []
    at = text.find(metric)
    while at >= 0:
        line_start = at == 0 or text[at - 1] == 0x0A
        match = _SAMPLE.match(text, at + len(metric)) if line_start else None
        if match is not None:
            try:
                value = float(match.group(1))
            except ValueError:
                value = math.nan
            if math.isfinite(value) and value >= 0:
                out.append(value)
        at = text.find(metric, at + len(metric))
    return out


def fresh(signals: Signals | None, now: float, interval_s: float) -> Signals | None:
    """The signals if they are recent enough to steer traffic, else None."""
    if signals is None or now - signals.at > STALE_AFTER_INTERVALS * interval_s:
        return None
    return signals
