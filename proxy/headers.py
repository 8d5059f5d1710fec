"""Which headers cross the gateway, in each direction (raw bytes in, as the wire has them)."""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

from proxy.auth import CREDENTIAL_HEADERS

RawHeaders = Iterable[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1 hop-by-hop headers, plus those the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_UPSTREAM = (
    HOP_BY_HOP
    | {h.encode() for h in CREDENTIAL_HEADERS}
    | {b"host", b"content-length", b"expect", b"x-request-id"}
)
_TRACE_CONTEXT = frozenset({b"traceparent", b"tracestate"})  # replaced when tracing is on
_NOT_DOWNSTREAM = HOP_BY_HOP | {b"content-length", b"x-request-id"}
REQUEST_ID = "X-Request-ID"
EVENT_STREAM = "text/event-stream"


def _connection_tokens(values: list[bytes]) -> set[bytes]:
    """Header names the sender listed in its `Connection` headers, which are hop-by-hop too."""
    return {
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    }


def _end_to_end(headers: RawHeaders, drop: frozenset[bytes]) -> list[tuple[bytes, bytes, bytes]]:
    """The headers not in `drop` nor named by a `Connection` header, as (lower-cased name,
    name, value): one pass, and a second over what is kept only when `Connection` came."""
    kept: list[tuple[bytes, bytes, bytes]] = []
    listed: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                listed.append(value)
        else:
            kept.append((lower, name, value))
    if listed:
        tokens = _connection_tokens(listed)
        return [h for h in kept if h[0] not in tokens]
    return kept


def upstream_headers(client: RawHeaders, *, request_id: str, trace: bytes = b"") -> bytes:
    """The client's end-to-end header lines, without its gateway credentials, plus the id.

    `trace`, the gateway's own trace context lines (tracing on), replaces the client's
    `traceparent` and `tracestate`; without it they pass as they came.
    Host, Content-Length and the backend's own key are added by the upstream leg.
    """
    drop = _NOT_UPSTREAM | _TRACE_CONTEXT if trace else _NOT_UPSTREAM
    lines = [name + b": " + value + b"\r\n" for _, name, value in _end_to_end(client, drop)]
    lines.append(b"X-Request-ID: " + request_id.encode("latin-1") + b"\r\n" + trace)
    return b"".join(lines)


def downstream_headers(upstream: RawHeaders, *, request_id: str) -> CIMultiDict[str]:
    """The backend's response headers minus hop-by-hop ones; event streams marked unbuffered."""
    out: CIMultiDict[str] = CIMultiDict(
        (name.decode("latin-1"), value.decode("latin-1"))
        for _, name, value in _end_to_end(upstream, _NOT_DOWNSTREAM)
    )
    out[REQUEST_ID] = request_id
    if is_event_stream(out.get("Content-Type", "")):
        out.setdefault("Cache-Control", "no-cache")
        out["X-Accel-Buffering"] = "no"
    return out


def is_event_stream(content_type: str) -> bool:
    """Whether a Content-Type names an SSE stream."""
    return content_type.split(";", 1)[0].strip().lower() == EVENT_STREAM
