"""How long a request may take: the client's `OICM-Request-Timeout` within the config's bounds."""

from __future__ import annotations

import math
import re

from proxy.config import TimeoutsConfig
from proxy.errors import InvalidRequest

TIMEOUT_HEADER = "OICM-Request-Timeout"
# ASCII digits between optional spaces and tabs (HTTP's OWS): `\d` and `\s` without re.ASCII
# would also take other scripts' digits and separators such as "\x1f", which float() refuses.
_DECIMAL = re.compile(r"[ \t]*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*")


def request_budget(header: str | None, timeouts: TimeoutsConfig) -> float:
    """Seconds the request may take in all: the header's value clamped, else the default."""
    if header is None:
        return timeouts.request_s
    if not _DECIMAL.fullmatch(header):
        raise InvalidRequest(
            f"{TIMEOUT_HEADER} must be a positive number of seconds, got {header[:40]!r}"
        )
    seconds = float(header)  # a huge decimal becomes inf, which the clamp below handles
    if math.isnan(seconds) or seconds <= 0:
        raise InvalidRequest(
            f"{TIMEOUT_HEADER} must be a positive number of seconds, got {header[:40]!r}"
        )
    return min(seconds, timeouts.max_request_s)
