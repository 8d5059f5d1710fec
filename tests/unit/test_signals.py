"""Backends' own load signals read from their Prometheus text, by kind, and when they count."""

from __future__ import annotations

import random

import pytest

from proxy.balance import Load, order
from proxy.routing import Target
from proxy.signals import Signals, exports, fresh, parse

VLLM = b"""# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
"""


@pytest.mark.parametrize(
    ("kind", "text", "queued", "kv"),
    [
        ("vllm", VLLM, 7.0, 0.42),
        ("vllm", b"vllm:gpu_cache_usage_perc 0.9\nvllm:num_requests_waiting 1\n", 1.0, 0.9),
        ("sglang", b"sglang:num_queue_reqs{tp=\"0\"} 4\nsglang:token_usage 0.5\n", 4.0, 0.5),
        ("tgi", b"# TYPE tgi_queue_size gauge\ntgi_queue_size 12\n", 12.0, None),
        ("llamacpp", b"llamacpp:requests_deferred 2\nllamacpp:kv_cache_usage_ratio 0.25\n", 2.0, 0.25),
        ("vllm", b"", None, None),
        ("vllm", b"vllm:num_requests_waiting NaN\nvllm:num_requests_waiting -3\n", None, None),
        ("vllm", b"xvllm:num_requests_waiting 5\n", None, None),  # not at a line's start
    ],
)  # fmt: skip
def test_parse(kind: str, text: bytes, queued: float | None, kv: float | None) -> None:
    """Each kind's metric names, summed over series (queued) or the highest (KV); a name
    that only begins like one, a comment, NaN or a negative value is not a sample."""
    assert Signals(queued=queued, kv=kv, at=1.0) == parse(kind, text, 1.0)


def test_which_kinds_export_signals() -> None:
    """Ollama and OpenAI-compatible services export none."""
    assert [True, True, True, True, False, False] == [
        exports(k) for k in ("vllm", "sglang", "tgi", "llamacpp", "ollama", "openai")
    ]


def test_stale_signals_do_not_count() -> None:
    """A scrape older than three health intervals is ignored."""
    signals = Signals(queued=5.0, kv=None, at=100.0)
    assert signals == fresh(signals, 114.0, 5.0)
    assert fresh(signals, 116.0, 5.0) is None
    assert fresh(None, 0.0, 5.0) is None


def test_least_loaded_counts_what_the_backend_queues() -> None:
    """Two backends with the same in-flight count: the one whose own queue is longer loses
    every pair it is drawn in against the other; one with a full KV cache comes last."""
    a, b, c = Target("a", None), Target("b", None), Target("c", None)
    loads = {
        "a": Load(1, None, True, queued=9.0),
        "b": Load(1, None, True, queued=0.0),
        "c": Load(0, None, True, kv=0.99),
    }
    leads = []
    for seed in range(60):
        ranked, _ = order("least_loaded", [a, b, c], loads, random.Random(seed))
        assert c == ranked[-1]
        leads.append(ranked[0].backend)
    assert leads.count("b") > leads.count("a") > 0  # a leads only when drawn beside c
