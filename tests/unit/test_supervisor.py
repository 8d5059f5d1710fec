"""The supervisor's pure parts: how many workers, how long to wait, what a worker said."""

from __future__ import annotations

from proxy.supervisor import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    HEALTHY_RUN_S,
    backoff_s,
    parse_notify,
    worker_count,
)


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
