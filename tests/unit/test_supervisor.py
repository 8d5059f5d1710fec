"""The supervisor's pure parts: how many workers, how long to wait, what a worker said."""

from __future__ import annotations

from pathlib import Path

from proxy.config import load_config
from proxy.supervisor import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    HEALTHY_RUN_S,
    backoff_s,
    config_text,
    parse_notify,
    worker_count,
)

ROOT = Path(__file__).resolve().parents[2]


def test_zero_workers_is_one_per_core() -> None:
    assert 8 == worker_count(0, 8)
    assert 1 == worker_count(0, None)
    assert 3 == worker_count(3, 8)


def test_backoff_doubles_while_workers_die_young_and_resets_after_a_good_run() -> None:
    waits = []
    wait = 0.0
    for _ in range(10):
        wait = backoff_s(wait, ran_s=1.0)
        waits.append(wait)
    assert BACKOFF_FIRST_S == waits[0]
    assert waits[1] == 2 * waits[0]
    assert BACKOFF_MAX_S == waits[-1]
    assert BACKOFF_FIRST_S == backoff_s(BACKOFF_MAX_S, ran_s=HEALTHY_RUN_S)


def test_parse_notify_reads_key_value_lines() -> None:
    assert {"READY": "1", "STATUS": "a=b c"} == parse_notify(b"READY=1\nSTATUS=a=b c\njunk\n")
    assert {} == parse_notify(b"\xff\xfe")


def test_the_config_in_force_reads_back_as_itself() -> None:
    """What workers read (the supervisor's copy) is the config in force, every key of the
    documented example and a config with TLS, limits, policies and fallbacks included."""
    example = load_config((ROOT / "conf" / "proxy.yaml").read_bytes())
    assert example == load_config(config_text(example))
    rich = load_config(
        "server: {workers: 2, drain_grace_s: 1}\n"
        "auth: {default_limits: {rpm: 60}}\n"
        "backends:\n"
        "  a: {url: 'http://127.0.0.1:9001', kind: llamacpp, serves: [embeddings]}\n"
        "  b: {url: 'http://127.0.0.1:9002', max_in_flight: 4, health_path: /h}\n"
        "models:\n"
        "  m: {targets: [{backend: a, model: up, weight: 2}, {backend: b}],"
        " policy: affinity, fallbacks: [n], limits: {tpm: 1000}}\n"
        "  n: {targets: [{backend: b}], endpoint_type: llm/v1/embeddings}\n"
    )
    assert rich == load_config(config_text(rich))
