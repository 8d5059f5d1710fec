"""Whether each backend may get traffic: its health probes, and outlier ejection.

Pure: a `BackendHealth` per backend holds counters, and the functions below update it from
what happened, with the time passed in (`time.monotonic()` readings).

- Active checks: `health.healthy_threshold` probes passing in a row bring a backend up,
  `health.unhealthy_threshold` failing in a row take it down.
- Passive checks (outlier detection): `outlier_detection.consecutive_failures` requests in
  a row that fail on a backend (a connect failure, a reset before any byte, a 5xx answer)
  eject it for `base_ejection_s`; each further ejection without a success between doubles
  that, up to `max_ejection_s`. When the time is up the backend is back; the next request
  tells whether it has recovered.
"""

from __future__ import annotations

from proxy.config import HealthConfig, OutlierConfig


class BackendHealth:
    """What the gateway knows of one backend's health."""

    __slots__ = ("ejected_until", "ejections", "failures", "passes", "probe_fails", "probed_up")

    def __init__(self) -> None:
        self.probed_up = False  # until the first probe passes
        self.passes = self.probe_fails = 0  # consecutive probe results
        self.failures = 0  # consecutive failed requests
        self.ejections = 0  # consecutive ejections (no success between)
        self.ejected_until = 0.0

    def up(self, now: float) -> bool:
        """Probed up and not ejected."""
        return self.probed_up and now >= self.ejected_until


def probed(health: BackendHealth, passed: bool, config: HealthConfig) -> bool:
    """Record one probe; whether the backend's probed state flipped."""
    if passed:
        health.passes += 1
        health.probe_fails = 0
        flip = not health.probed_up and health.passes >= config.healthy_threshold
    else:
        health.probe_fails += 1
        health.passes = 0
        flip = health.probed_up and health.probe_fails >= config.unhealthy_threshold
    if flip:
        health.probed_up = not health.probed_up
    return flip


def request_failed(health: BackendHealth, config: OutlierConfig, now: float) -> bool:
    """Record a failed request; whether the backend is ejected by it."""
    health.failures += 1
    if health.failures < config.consecutive_failures or now < health.ejected_until:
        return False
    period = min(config.base_ejection_s * 2.0**health.ejections, config.max_ejection_s)
    health.ejections += 1
    health.failures = 0
    health.ejected_until = now + period
    return True


def request_succeeded(health: BackendHealth) -> None:
    """Record a request the backend answered (any status below 500)."""
    health.failures = 0
    health.ejections = 0
