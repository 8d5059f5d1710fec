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
        "event_gap",
        "events",
        "first_byte_at",
        "limit_headers",
        "model_label",
        "open_event",
        "principal",
        "request_id",
        "route",
        "sse",
        "started",
        "status",
        "stream_complete",
        "stream_error",
        "strip_usage",
        "tries",
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
        self.strip_usage = False  # the gateway asked this stream's backend for usage itself
        self.client_gone = False
        self.error_type: str | None = None
        self.stream_error: str | None = None  # the error type a begun response ended with
        self.stream_complete = False  # its protocol's last event reached the client
        self.open_event = False  # the bytes relayed so far end inside an SSE event
        self.event_gap: float | None = None  # mean seconds between a stream's events
        self.tries: list[str] = []  # each backend tried, with why it was left when it was
        self.limit_headers: dict[str, str] | None = None  # x-ratelimit-*, for the answer's head


def disconnect_phase(ex: Exchange) -> str:
    """Where the request was when its client went away (a `DISCONNECT_PHASES` value)."""
    if ex.backend == NO_BACKEND:
        return "request"
    if ex.status == 0:
        return "upstream_head"
    if ex.first_byte_at is None:
        return "first_event"
    return "mid_stream"


class ClientGone(Exception):
    """The client went away (mid-body or mid-response); nobody is left to answer."""
