"""Health from probes (thresholds) and from requests (outlier ejection), with a clock passed in."""

from __future__ import annotations

from proxy.config import HealthConfig, OutlierConfig
from proxy.fleet import BackendHealth, probed, request_failed, request_succeeded

HEALTH = HealthConfig(healthy_threshold=2, unhealthy_threshold=3)
OUTLIER = OutlierConfig(consecutive_failures=3, base_ejection_s=10, max_ejection_s=25)


def test_probes_flip_only_after_their_threshold() -> None:
    """Up after 2 passing probes in a row, down after 3 failing ones; a mixed run flips nothing."""
    h = BackendHealth()
    assert [False, True] == [probed(h, True, HEALTH) for _ in range(2)]
    assert h.up(0.0)
    assert [False, False] == [probed(h, False, HEALTH) for _ in range(2)]
    assert not probed(h, True, HEALTH)  # the run of failures is broken
    assert [False, False, True] == [probed(h, False, HEALTH) for _ in range(3)]
    assert not h.up(0.0)


def test_consecutive_failures_eject_with_a_doubling_backoff() -> None:
    """3 failures in a row eject for 10 s, then 20 s, then 25 s (the cap); back when time is up."""
    h = BackendHealth()
    probed(h, True, HEALTH)
    probed(h, True, HEALTH)
    assert [False, False, True] == [request_failed(h, OUTLIER, 100.0) for _ in range(3)]
    assert not h.up(105.0)
    assert h.up(110.0)
    assert [False, False, True] == [request_failed(h, OUTLIER, 110.0) for _ in range(3)]
    assert 130.0 == h.ejected_until
    assert [False, False, True] == [request_failed(h, OUTLIER, 130.0) for _ in range(3)]
    assert 155.0 == h.ejected_until


def test_a_success_resets_the_count_and_the_backoff() -> None:
    """A request the backend answered breaks the run, and the next ejection is the short one."""
    h = BackendHealth()
    request_failed(h, OUTLIER, 0.0)
    request_failed(h, OUTLIER, 0.0)
    request_succeeded(h)
    assert not request_failed(h, OUTLIER, 0.0)
    for _ in range(2):
        request_failed(h, OUTLIER, 0.0)
    assert 10.0 == h.ejected_until
    request_succeeded(h)
    for _ in range(3):
        request_failed(h, OUTLIER, 20.0)
    assert 30.0 == h.ejected_until


def test_failures_while_ejected_do_not_extend_it() -> None:
    """Requests that were already under way when it was ejected do not eject it again."""
    h = BackendHealth()
    for _ in range(3):
        request_failed(h, OUTLIER, 0.0)
    assert not any(request_failed(h, OUTLIER, 5.0) for _ in range(6))
    assert 10.0 == h.ejected_until
