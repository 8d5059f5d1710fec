"""Request paths the gateway forwards under a prefix: as the client encoded them, made safe.

OICM's `/models/{endpoint}/proxy/{path}` hands `{path}` to a backend. aiohttp's match info
is percent-decoded, so forwarding it would write a client's `%0d`, `%20` or `%3F` into the
upstream request line as the bytes themselves. The path goes on as the client encoded it
instead, with only what must be encoded re-encoded; control characters are refused, and so
are dot segments, which would climb out of a backend URL's base path.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from proxy.errors import InvalidRequest

# Characters a path may carry as they are (RFC 3986 pchar and '/'); '%' keeps the client's
# own escapes as they came.
_SAFE = "/%:@!$&'()*+,;=-._~"


def subpath(raw_path: str, depth: int) -> str:
    """The part of a raw request path after its first `depth` segments, with its leading '/',
    encoded for a request line; `InvalidRequest` for control characters or dot segments.

    `subpath("/models/ep/proxy/v1/rerank?x=1", 3)` is `"/v1/rerank"`.
    """
    path = raw_path.partition("?")[0]
    parts = path.split("/", depth + 1)
    rest = "/" + (parts[depth + 1] if len(parts) > depth + 1 else "")
    decoded = unquote(rest, errors="replace") if "%" in rest else rest
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise InvalidRequest("the path holds a control character; encode or remove it")
    if any(segment in (".", "..") for segment in decoded.split("/")):
        raise InvalidRequest("the path holds a '.' or '..' segment; send the path it stands for")
    return quote(rest, safe=_SAFE)
