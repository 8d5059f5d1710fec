"""Which headers cross the gateway, in each direction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

from proxy.auth import CREDENTIAL_HEADERS

# RFC 9110 section 7.6.1 hop-by-hop headers, plus those the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_UPSTREAM = HOP_BY_HOP | CREDENTIAL_HEADERS | {"host", "content-length", "expect"}
_NOT_DOWNSTREAM = HOP_BY_HOP | {"content-length"}
REQUEST_ID = "X-Request-ID"
EVENT_STREAM = "text/event-stream"


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    """Header names the sender listed in `Connection`, which are hop-by-hop too."""
    value = headers.get("Connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def upstream_headers(
    client: Iterable[tuple[str, str]],
    client_map: Mapping[str, str],
    *,
    request_id: str,
    backend_key: str | None,
) -> CIMultiDict[str]:
    """The client's end-to-end headers, without its gateway credentials, plus ours."""
    drop = _NOT_UPSTREAM | _connection_tokens(client_map) | {"x-request-id"}
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in client if name.lower() not in drop
    )
    out[REQUEST_ID] = request_id
    if backend_key:
        out["Authorization"] = f"Bearer {backend_key}"
    return out


def downstream_headers(
    upstream: Iterable[tuple[str, str]],
    upstream_map: Mapping[str, str],
    *,
    request_id: str,
) -> CIMultiDict[str]:
    """The backend's response headers minus hop-by-hop ones; event streams marked unbuffered."""
    drop = _NOT_DOWNSTREAM | _connection_tokens(upstream_map)
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in upstream if name.lower() not in drop
    )
    out[REQUEST_ID] = request_id
    if is_event_stream(upstream_map.get("Content-Type", "")):
        out.setdefault("Cache-Control", "no-cache")
        out["X-Accel-Buffering"] = "no"
    return out


def is_event_stream(content_type: str) -> bool:
    """Whether a Content-Type names an SSE stream."""
    return content_type.split(";", 1)[0].strip().lower() == EVENT_STREAM
