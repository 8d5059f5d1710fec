"""Gateway-made errors: status, type, each dialect's envelope, the stream's last event, headers."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from proxy.errors import (
    AuthenticationFailed,
    BackendTimeout,
    BackendUnreachable,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProxyError,
    RateLimitExceeded,
    Unsupported,
    envelope,
    error_headers,
    sse_error,
)
from proxy.middleware import dialect_of, from_http_exception

# (class, status, openai type, anthropic type, google status): DESIGN.md's table for the first three
TABLE = [
    (InvalidRequest, 400, "invalid_request", "invalid_request_error", "INVALID_ARGUMENT"),
    (AuthenticationFailed, 401, "authentication_error", "authentication_error", "UNAUTHENTICATED"),
    (PermissionDenied, 403, "permission_denied", "permission_error", "PERMISSION_DENIED"),
    (NotFound, 404, "not_found", "not_found_error", "NOT_FOUND"),
    (MethodNotAllowed, 405, "invalid_request", "invalid_request_error", "INVALID_ARGUMENT"),
    (PayloadTooLarge, 413, "payload_too_large", "request_too_large", "INVALID_ARGUMENT"),
    (RateLimitExceeded, 429, "rate_limit_exceeded", "rate_limit_error", "RESOURCE_EXHAUSTED"),
    (Unsupported, 501, "unsupported", "invalid_request_error", "UNIMPLEMENTED"),
    (BackendUnreachable, 502, "backend_unreachable", "api_error", "UNAVAILABLE"),
    (Overloaded, 503, "overloaded", "overloaded_error", "UNAVAILABLE"),
    (BackendTimeout, 504, "backend_timeout", "timeout_error", "DEADLINE_EXCEEDED"),
    (ProxyError, 500, "internal_error", "api_error", "INTERNAL"),
]
IDS = [row[0].__name__ for row in TABLE]
MESSAGE = 'what happened, with "quotes" and caf\u00e9; what to do'


@pytest.mark.parametrize(("cls", "status", "kind", "_a", "_g"), TABLE, ids=IDS)
def test_status_and_type(cls: type[ProxyError], status: int, kind: str, _a: str, _g: str) -> None:
    """Each error class has the status and stable type name DESIGN.md lists."""
    err = cls("m")
    assert (status, kind) == (err.status, err.type)
    assert "m" == err.message == str(err)


@pytest.mark.parametrize(("cls", "_s", "kind", "_a", "_g"), TABLE, ids=IDS)
def test_openai_envelope(cls: type[ProxyError], _s: int, kind: str, _a: str, _g: str) -> None:
    """The OpenAI envelope is exactly {"error": {"type", "message"}}."""
    assert {"error": {"type": kind, "message": MESSAGE}} == json.loads(envelope(cls(MESSAGE)))


@pytest.mark.parametrize(("cls", "_s", "_k", "kind", "_g"), TABLE, ids=IDS)
def test_anthropic_envelope(cls: type[ProxyError], _s: int, _k: str, kind: str, _g: str) -> None:
    """The Anthropic envelope is {"type": "error", "error": {"type", "message"}}."""
    expected = {"type": "error", "error": {"type": kind, "message": MESSAGE}}
    assert expected == json.loads(envelope(cls(MESSAGE), "anthropic"))


@pytest.mark.parametrize(("cls", "status", "_k", "_a", "google"), TABLE, ids=IDS)
def test_gemini_envelope(cls: type[ProxyError], status: int, _k: str, _a: str, google: str) -> None:
    """The Gemini envelope is {"error": {"code", "message", "status"}} with the HTTP status code."""
    expected = {"error": {"code": status, "message": MESSAGE, "status": google}}
    assert expected == json.loads(envelope(cls(MESSAGE), "gemini"))


def test_envelope_is_compact_utf8() -> None:
    """The body is UTF-8 JSON bytes."""
    assert b'{"error":{"type":"not_found","message":"caf\xc3\xa9"}}' == envelope(
        NotFound("caf\u00e9")
    )


@pytest.mark.parametrize(
    ("dialect", "prefix"),
    [("openai", b"data: "), ("anthropic", b"event: error\ndata: "), ("gemini", b"data: ")],
)
def test_sse_error_framing(dialect: str, prefix: bytes) -> None:
    """A failed stream ends with one complete event holding the envelope, and no [DONE]."""
    err = BackendTimeout("the backend sent nothing for 60 s")
    event = sse_error(err, dialect)  # type: ignore[arg-type]
    assert prefix + envelope(err, dialect) + b"\n\n" == event  # type: ignore[arg-type]
    assert 1 == event.count(b"\n\n")
    assert b"[DONE]" not in event


def test_sse_error_openai_event() -> None:
    """The OpenAI-route stream's last event, byte for byte."""
    expected = b'data: {"error":{"type":"backend_unreachable","message":"cut"}}\n\n'
    assert expected == sse_error(BackendUnreachable("cut"))


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (RateLimitExceeded("slow down"), {"Retry-After": "1"}),
        (Overloaded("busy"), {"Retry-After": "1"}),
        (RateLimitExceeded("slow down", retry_after=30), {"Retry-After": "30"}),
        (Overloaded("busy", retry_after=0), {"Retry-After": "0"}),
        (InvalidRequest("bad"), {}),
        (AuthenticationFailed("who"), {}),
        (NotFound("where"), {}),
        (PayloadTooLarge("big"), {}),
        (BackendUnreachable("down"), {}),
        (BackendTimeout("late"), {}),
        (ProxyError("bug"), {}),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, ProxyError) else "",
)
def test_error_headers(err: ProxyError, expected: dict[str, str]) -> None:
    """Retry-After goes on 429 and 503 only (1 s unless the error says), never on the others."""
    assert expected == error_headers(err)


# --- middleware helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/anthropic/v1/messages", "anthropic"),
        ("/gateway/anthropic/v1/messages", "anthropic"),
        ("/gemini/v1beta/models/qwen:generateContent", "gemini"),
        ("/gateway/gemini/v1/models/qwen:streamGenerateContent", "gemini"),
        ("/v1/chat/completions", "openai"),
        ("/gateway/mlflow/v1/chat/completions", "openai"),
        ("/gateway/qwen/invocations", "openai"),
        ("/models/qwen/proxy/v1/chat/completions", "openai"),
        ("/anthropic", "openai"),
        ("/nope", "openai"),
    ],
)
def test_dialect_of(path: str, expected: str) -> None:
    """Anthropic and Gemini routes get their own error shape; everything else OpenAI's."""
    assert expected == dialect_of(path)


def test_from_http_exception_body_too_large() -> None:
    """aiohttp's 413 becomes payload_too_large, keeping aiohttp's size explanation."""
    err = from_http_exception(web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20))
    assert (PayloadTooLarge, 413) == (type(err), err.status)
    assert "request body is over the gateway's limit (" in err.message
    assert "10" in err.message


def test_from_http_exception_method_not_allowed() -> None:
    """aiohttp's 405 becomes a 405 invalid_request naming the method."""
    err = from_http_exception(web.HTTPMethodNotAllowed("PUT", ["GET", "POST"]))
    assert (MethodNotAllowed, 405, "invalid_request", "method PUT is not allowed here") == (
        type(err),
        err.status,
        err.type,
        err.message,
    )


def test_from_http_exception_not_found() -> None:
    """aiohttp's 404 (no route) becomes not_found."""
    err = from_http_exception(web.HTTPNotFound())
    assert (NotFound, "no such route") == (type(err), err.message)


def test_from_http_exception_anything_else_is_invalid_request() -> None:
    """Any other aiohttp refusal is a 400 invalid_request with aiohttp's reason."""
    err = from_http_exception(web.HTTPBadRequest(reason="bad chunk size"))
    assert (InvalidRequest, 400, "bad chunk size") == (type(err), err.status, err.message)
