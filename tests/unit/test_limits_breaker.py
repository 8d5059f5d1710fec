"""The store's circuit breaker (proxy.breaker): a state machine over a clock passed in."""

from __future__ import annotations

import pytest

from proxy.breaker import Breaker


def test_opens_after_consecutive_failures_only() -> None:
    """Two failures, a success, two failures: still closed; the third in a row opens it."""
    b = Breaker(threshold=3, probe_s=0.5)
    assert [False, False] == [b.failed(0.0), b.failed(0.1)]
    b.succeeded()
    assert [False, False, True] == [b.failed(1.0), b.failed(1.1), b.failed(1.2)]
    assert "open" == b.state
    assert not b.failed(1.3)  # already open: no second transition


def test_open_probes_every_interval_until_one_succeeds() -> None:
    """Open, a probe is due every probe_s; a failed probe waits another interval; a good one
    closes the breaker (the one transition the caller logs)."""
    b = Breaker(threshold=1, probe_s=0.5)
    assert b.failed(10.0)
    assert [False, True] == [b.probe_due(10.4), b.probe_due(10.5)]
    assert not b.probed(False, 10.5)
    assert [False, True] == [b.probe_due(10.9), b.probe_due(11.0)]
    assert b.probed(True, 11.0)
    assert b.closed
    assert not b.probe_due(20.0)
    assert not b.probed(True, 20.0)  # closed: a late probe changes nothing


def test_successes_while_open_do_not_close_it() -> None:
    """Only a probe closes an open breaker (a stray success of an old call does not)."""
    b = Breaker(threshold=1)
    b.failed(0.0)
    b.succeeded()
    assert "open" == b.state


def test_closing_starts_a_fresh_count() -> None:
    """After it closes, it takes `threshold` new failures in a row to open again."""
    b = Breaker(threshold=2, probe_s=0.1)
    b.failed(0.0)
    b.failed(0.0)
    b.probed(True, 1.0)
    assert [False, True] == [b.failed(2.0), b.failed(2.0)]


def test_open_at_start() -> None:
    """A store that does not answer at start opens the breaker at once."""
    b = Breaker()
    b.open(5.0)
    assert (False, True) == (b.closed, b.probe_due(5.25))


@pytest.mark.parametrize(("threshold", "probe_s"), [(0, 1.0), (1, 0.0)])
def test_bad_settings_are_refused(threshold: int, probe_s: float) -> None:
    """A breaker that could never open, or would probe in a busy loop, is a programming error."""
    with pytest.raises(ValueError):
        Breaker(threshold, probe_s)
