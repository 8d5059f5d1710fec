"""A circuit breaker for a shared store, over a clock passed in. [pure]

Closed, every call goes to the store; `threshold` failures in a row (timeouts, refused
connections, errors) open it. Open, no request waits on the store: callers serve without it,
and one prober asks it every `probe_s` whether it answers again; the first probe that succeeds
closes it (after the caller has resynchronised what it did meanwhile). Each method that changes
the state says so, so the caller logs one line per transition, not one per request.
"""

from __future__ import annotations

from typing import Literal

State = Literal["closed", "open"]


class Breaker:
    """Whether the store is worth asking, learnt from how the last calls went."""

    __slots__ = ("failures", "next_probe", "opened_at", "probe_s", "state", "threshold")

    def __init__(self, threshold: int = 3, probe_s: float = 0.25) -> None:
        if threshold < 1 or probe_s <= 0:
            raise ValueError("a breaker needs threshold >= 1 and probe_s > 0")
        self.threshold = threshold
        self.probe_s = probe_s
        self.state: State = "closed"
        self.failures = 0  # in a row, while closed
        self.opened_at = 0.0
        self.next_probe = 0.0

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def succeeded(self) -> None:
        """A call answered in time: the run of failures is over."""
        if self.state == "closed":
            self.failures = 0

    def failed(self, now: float) -> bool:
        """A call failed or ran out of time; True when this failure opened the breaker."""
        if self.state == "open":
            return False
        self.failures += 1
        if self.failures < self.threshold:
            return False
        self.open(now)
        return True

    def open(self, now: float) -> None:
        """Stop asking the store (at start, when it does not answer at all)."""
        self.state = "open"
        self.opened_at = now
        self.next_probe = now + self.probe_s
        self.failures = 0

    def probe_due(self, now: float) -> bool:
        """Whether the prober should ask the store now."""
        return self.state == "open" and now >= self.next_probe

    def probed(self, ok: bool, now: float) -> bool:
        """A probe's outcome; True when it closed the breaker."""
        if self.state != "open":
            return False
        if not ok:
            self.next_probe = now + self.probe_s
            return False
        self.state = "closed"
        self.failures = 0
        return True
