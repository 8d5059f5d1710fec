"""The record of one request as it moves through the chain, read once by accounting."""

from __future__ import annotations

from proxy.auth import Principal
from proxy.errors import Dialect
from proxy.usage import Usage

NO_BACKEND = "none"


class Exchange:
    """Mutable per-request facts: who, which model and backend, what went out, and when.

    Times (`started`, `first_byte_at`) are `time.perf_counter()` readings.
    """

    __slots__ = (
        "backend",
        "bytes_in",
        "bytes_out",
        "client_gone",
        "dialect",
        "error_type",
        "events",
        "first_byte_at",
        "model_label",
        "principal",
        "request_id",
        "route",
        "sse",
        "started",
        "status",
        "usage",
    )

    def __init__(self, request_id: str, route: str, started: float, dialect: Dialect) -> None:
        self.request_id = request_id
        self.route = route
        self.started = started
        self.dialect: Dialect = dialect
        self.principal: Principal | None = None
        self.model_label = "none"
        self.backend = NO_BACKEND
        self.status = 0
        self.sse = False
        self.first_byte_at: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.events = 0
        self.usage: Usage | None = None
        self.client_gone = False
        self.error_type: str | None = None


class ClientGone(Exception):
    """The client went away (mid-body or mid-response); nobody is left to answer."""
