"""The gateway's own errors and the one place that renders them.

Code anywhere raises a `ProxyError` subclass; the error middleware (or the relay, for a
stream already under way) turns it into bytes with the functions below. Each protocol the
gateway speaks has its own envelope: OpenAI's (the default), Anthropic's and Google's.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import orjson

Dialect = Literal["openai", "anthropic", "gemini"]


class ProxyError(Exception):
    """An error the gateway answers itself, with a status and a stable type name."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    anthropic_type: ClassVar[str] = "api_error"
    google_status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request"
    anthropic_type = "invalid_request_error"
    google_status = "INVALID_ARGUMENT"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "authentication_error"
    anthropic_type = "authentication_error"
    google_status = "UNAUTHENTICATED"


class PermissionDenied(ProxyError):
    status = 403
    type = "permission_denied"
    anthropic_type = "permission_error"
    google_status = "PERMISSION_DENIED"


class NotFound(ProxyError):
    status = 404
    type = "not_found"
    anthropic_type = "not_found_error"
    google_status = "NOT_FOUND"


class Conflict(ProxyError):
    status = 409
    type = "conflict"
    anthropic_type = "invalid_request_error"
    google_status = "ALREADY_EXISTS"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request"
    anthropic_type = "invalid_request_error"
    google_status = "INVALID_ARGUMENT"


class RequestTimeout(ProxyError):
    status = 408
    type = "request_timeout"
    anthropic_type = "invalid_request_error"
    google_status = "DEADLINE_EXCEEDED"


class ExpectationFailed(ProxyError):
    status = 417
    type = "invalid_request"
    anthropic_type = "invalid_request_error"
    google_status = "INVALID_ARGUMENT"


class VersionNotSupported(ProxyError):
    status = 505
    type = "invalid_request"
    anthropic_type = "invalid_request_error"
    google_status = "INVALID_ARGUMENT"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "payload_too_large"
    anthropic_type = "request_too_large"
    google_status = "INVALID_ARGUMENT"


class RateLimitExceeded(ProxyError):
    status = 429
    type = "rate_limit_exceeded"
    anthropic_type = "rate_limit_error"
    google_status = "RESOURCE_EXHAUSTED"


class Unsupported(ProxyError):
    status = 501
    type = "unsupported"
    anthropic_type = "invalid_request_error"
    google_status = "UNIMPLEMENTED"


class BackendUnreachable(ProxyError):
    status = 502
    type = "backend_unreachable"
    anthropic_type = "api_error"
    google_status = "UNAVAILABLE"


class Overloaded(ProxyError):
    status = 503
    type = "overloaded"
    anthropic_type = "overloaded_error"
    google_status = "UNAVAILABLE"


class BackendTimeout(ProxyError):
    status = 504
    type = "backend_timeout"
    anthropic_type = "timeout_error"
    google_status = "DEADLINE_EXCEEDED"


def envelope(err: ProxyError, dialect: Dialect = "openai") -> bytes:
    """The JSON body of an error response, in the shape the route's clients read."""
    if dialect == "anthropic":
        return orjson.dumps(
            {"type": "error", "error": {"type": err.anthropic_type, "message": err.message}}
        )
    if dialect == "gemini":
        return orjson.dumps(
            {"error": {"code": err.status, "message": err.message, "status": err.google_status}}
        )
    return orjson.dumps({"error": {"type": err.type, "message": err.message}})


def sse_error(err: ProxyError, dialect: Dialect = "openai") -> bytes:
    """The last event of a stream that failed after it began (no `[DONE]` follows it)."""
    if dialect == "anthropic":
        return b"event: error\ndata: " + envelope(err, dialect) + b"\n\n"
    return b"data: " + envelope(err, dialect) + b"\n\n"


def error_headers(err: ProxyError) -> dict[str, str]:
    """Headers an error response carries besides Content-Type: `Retry-After` on 429 and 503."""
    if err.retry_after is not None:
        return {"Retry-After": str(err.retry_after)}
    if err.status in (429, 503):
        return {"Retry-After": "1"}
    return {}
