"""The ledger of the workers' last counts: which answer wins, what is retired, and totals
that never go down when a worker is missing or restarted."""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.exposition import Family, Series, render
from proxy.metrics_ledger import Ledger, counted, decode, encode, reconcile
from proxy.metrics_merge import Snapshot, merge

START_A, START_B = 1_000, 2_000  # two processes of one worker, B started later


def answer(requests: float, up: float = 1, *, started: int = START_A, taken: int = 1) -> Snapshot:
    """A worker's snapshot: a counter, a histogram and a gauge."""
    families = [
        Family("proxy_requests", "counter", "h", ("model",), [Series(["m"], [requests])]),
        Family("proxy_d", "histogram", "h", (), [Series([], [requests, requests, 0.5])], (1.0,)),
        Family("proxy_backend_up", "gauge", "h", ("backend",), [Series(["g"], [up])]),
    ]
    return Snapshot(1, started, taken, families)


def totals(ledger: Ledger | None, answers: dict[str, Snapshot], expected: int = 2) -> dict:
    fresh = [(w, a.families) for w, a in answers.items()]
    parts = counted(ledger) if ledger else None
    text = render(merge(fresh, expected, parts).families).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


REQUESTS = ("proxy_requests_total", (("model", "m"),))


def test_the_ledger_keeps_only_what_counts() -> None:
    """Counters and histograms are kept per worker; gauges are not (they say what is now)."""
    ledger = reconcile(None, {"0": answer(7), "1": answer(5)})
    assert {"0", "1"} == set(ledger.workers)
    assert ["proxy_requests", "proxy_d"] == [f.name for f in ledger.workers["0"].families]
    assert [] == ledger.retired


def test_a_missing_worker_is_counted_at_its_last_counts() -> None:
    """Worker 1 answered 5 once; when it does not answer, the total still holds its 5."""
    ledger = reconcile(None, {"0": answer(7), "1": answer(5)})
    now = {"0": answer(9, taken=2)}
    got = totals(reconcile(ledger, now), now)
    assert 9 + 5 == got[REQUESTS]
    assert 9 + 5 == got["proxy_d_count", ()]
    assert 1 == got["proxy_workers_answered", ()]
    assert ("proxy_backend_up", (("backend", "g"), ("worker", "1"))) not in got


def test_a_restarted_worker_adds_its_predecessors_counts() -> None:
    """Worker 1 counted 5, died, and its successor counted 2: the total is 7 + 5 + 2, and stays
    so on every later scrape."""
    ledger = reconcile(None, {"0": answer(7), "1": answer(5)})
    now = {"0": answer(7, taken=2), "1": answer(2, started=START_B)}
    ledger = reconcile(ledger, now)
    assert 5 == ledger.retired[0].series[0].values[0]
    assert 14 == totals(ledger, now)[REQUESTS]
    later = {"0": answer(7, taken=3), "1": answer(3, started=START_B, taken=2)}
    assert 15 == totals(reconcile(ledger, later), later)[REQUESTS]


def test_an_older_answer_changes_nothing() -> None:
    """A concurrent scrape's older answer (earlier in the same process, or from the process
    that was since replaced) neither lowers a count nor retires the newer process."""
    ledger = reconcile(None, {"1": answer(5, started=START_B, taken=10)})
    for stale in (answer(4, started=START_B, taken=9), answer(50, started=START_A, taken=99)):
        assert ledger == reconcile(ledger, {"1": stale})


def test_retiring_twice_sums() -> None:
    """Each restart adds the last counts of the process it replaced."""
    ledger = reconcile(None, {"1": answer(5, started=1)})
    ledger = reconcile(ledger, {"1": answer(3, started=2)})
    ledger = reconcile(ledger, {"1": answer(1, started=3)})
    assert 5 + 3 + 1 == totals(ledger, {"0": answer(0), "1": answer(1, started=3)})[REQUESTS]


def test_fresh_gauges_counted_totals() -> None:
    """Gauges come from this scrape's answers, counters and histograms from the ledger."""
    answers = {"0": answer(7, up=1), "1": answer(5, up=0)}
    got = totals(reconcile(None, answers), answers)
    assert 12 == got[REQUESTS]
    assert 0 == got["proxy_backend_up", (("backend", "g"), ("worker", "1"))]


@pytest.mark.parametrize("data", [b"", b"\x93\x01", b"junk"])
def test_a_broken_ledger_is_refused(data: bytes) -> None:
    """Bytes that are not a ledger raise, and the caller starts a new one."""
    with pytest.raises(msgspec.DecodeError):
        decode(data)


def test_the_ledger_round_trips() -> None:
    """What one worker writes, the next reads back the same."""
    ledger = reconcile(None, {"0": answer(7), "1": answer(5)})
    assert ledger == decode(encode(ledger))
