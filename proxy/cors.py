"""CORS: which browser origins may call the gateway, and what their answers say. [pure]

The protocol is the Fetch standard's (https://fetch.spec.whatwg.org/#http-cors-protocol).
Before a cross-origin request with a key (`Authorization`, `x-api-key`) or a JSON body, a
browser sends a preflight, `OPTIONS` with `Origin` and `Access-Control-Request-Method` (and
`Access-Control-Request-Headers`), never with credentials; only a 2xx answer that allows
the origin, the method and every header lets the real request go. An answer's body is
given to the page only when it carries `Access-Control-Allow-Origin` for that origin, and
of its headers only the CORS-safelisted ones and those named in
`Access-Control-Expose-Headers`. `Access-Control-Allow-Headers: *` does not cover
`Authorization` (Fetch, "CORS non-wildcard request-header name"), so a policy that allows any
header names the requested ones back instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from proxy.errors import InvalidRequest, PermissionDenied

ANY = "*"
MAX_AGE_LIMIT_S = 86400  # Firefox's cap; Chromium caps at 7200
# The headers the gateway reads from a client, besides the CORS-safelisted ones.
DEFAULT_ALLOW_HEADERS = (
    "authorization",
    "content-type",
    "x-api-key",
    "x-goog-api-key",
    "x-request-id",
    "oicm-request-timeout",
)
# The gateway's own answer headers a page may read (Retry-After is not safelisted either).
EXPOSE_HEADERS = ", ".join(
    (
        "x-request-id",
        "retry-after",
        *(
            f"x-ratelimit-{part}-{kind}"
            for kind in ("requests", "tokens")
            for part in ("limit", "remaining", "reset")
        ),
    )
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CorsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`server.cors`: browser apps on these origins may call the gateway (README: CORS)."""

    allow_origins: tuple[str, ...]  # https://app.example.com, or "*" for any origin
    allow_headers: tuple[str, ...] = DEFAULT_ALLOW_HEADERS  # or "*": whatever is asked
    max_age_s: int = 600  # how long a browser may reuse a preflight's answer


def check_cors(cors: CorsConfig) -> list[str]:
    """Every problem of a `server.cors` section, each with its key path."""
    path = "server.cors"
    errors: list[str] = []
    if not cors.allow_origins:
        errors.append(f"{path}.allow_origins: list at least one origin, or leave server.cors out")
    if ANY in cors.allow_origins and len(cors.allow_origins) > 1:
        errors.append(f"{path}.allow_origins: '*' (any origin) cannot be listed with origins")
    errors.extend(
        f"{path}.allow_origins[{i}]: {problem}"
        for i, origin in enumerate(cors.allow_origins)
        if origin != ANY and (problem := _origin_problem(origin))
    )
    if ANY in cors.allow_headers and len(cors.allow_headers) > 1:
        errors.append(f"{path}.allow_headers: '*' (any header) cannot be listed with names")
    errors.extend(
        f"{path}.allow_headers[{i}]: '{name[:100]}' is not a header name"
        for i, name in enumerate(cors.allow_headers)
        if name != ANY and not _TOKEN.fullmatch(name)
    )
    if not 0 <= cors.max_age_s <= MAX_AGE_LIMIT_S:
        errors.append(f"{path}.max_age_s: must be 0 to {MAX_AGE_LIMIT_S} seconds")
    return errors


def _origin_problem(origin: str) -> str | None:
    """Why `origin` is not written as a browser sends `Origin`, or None when it is."""
    shown = origin[:200]
    if origin == "null":
        return (
            "'null' is the origin of sandboxed and file: pages, which any site can make; "
            "it cannot be allowed"
        )
    if "*" in origin:
        return f"'{shown}': an origin has no wildcards; list each origin, or '*' alone"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError as exc:
        return f"'{shown}' is not an origin ({exc})"
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return f"'{shown}' is not an origin: write scheme://host[:port], as https://app.example.com"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    written = f"{parts.scheme}://{host}" + (
        f":{port}" if port is not None and port != _DEFAULT_PORTS[parts.scheme] else ""
    )
    if origin != written:
        return (
            f"'{shown}' is not an origin as browsers send it (no path, no default port, "
            f"lower case): write '{written}'"
        )
    return None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """A checked `server.cors`, in the form each answer reads (built once at start)."""

    origins: frozenset[str]  # empty: any origin
    headers: frozenset[str]  # lower case; empty with `any_header`
    any_header: bool
    max_age: str

    @classmethod
    def of(cls, cors: CorsConfig) -> CorsPolicy:
        any_header = ANY in cors.allow_headers
        return cls(
            origins=frozenset() if ANY in cors.allow_origins else frozenset(cors.allow_origins),
            headers=frozenset() if any_header else frozenset(h.lower() for h in cors.allow_headers),
            any_header=any_header,
            max_age=str(cors.max_age_s),
        )


def is_preflight(headers: Mapping[str, str]) -> bool:
    """Whether an `OPTIONS` request's headers make it a CORS preflight."""
    return "Origin" in headers and "Access-Control-Request-Method" in headers


def answer_headers(policy: CorsPolicy, origin: str | None) -> tuple[dict[str, str], bool]:
    """The CORS headers of any answer to a request from `origin`, and whether it needs
    `Vary: Origin` (it does whenever the answer depends on the origin: origins listed)."""
    if not policy.origins:
        return _allowing(ANY), False
    if origin is None or origin not in policy.origins:
        return {}, True
    return _allowing(origin), True


def _allowing(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSE_HEADERS}


def preflight_headers(
    policy: CorsPolicy, origin: str, method: str, requested: str, methods: frozenset[str]
) -> dict[str, str]:
    """The answer to a preflight from `origin` asking for `method` and the `requested`
    headers (Access-Control-Request-Headers) on a route that takes `methods` (`*`: any);
    PermissionDenied when the origin, method or a header is not allowed."""
    if policy.origins and origin not in policy.origins:
        raise PermissionDenied(
            f"origin '{origin[:200]}' may not call the gateway from a browser "
            "(server.cors.allow_origins)"
        )
    if not _TOKEN.fullmatch(method):
        raise InvalidRequest("Access-Control-Request-Method is not a method name")
    if ANY not in methods and method not in methods:
        raise PermissionDenied(
            f"method {method} is not served on this route (it takes {', '.join(sorted(methods))})"
        )
    names = [n for n in (part.strip().lower() for part in requested.split(",")) if n]
    if not all(_TOKEN.fullmatch(name) for name in names):
        raise InvalidRequest("Access-Control-Request-Headers is not a list of header names")
    refused = [] if policy.any_header else [n for n in names if n not in policy.headers]
    if refused:
        raise PermissionDenied(
            f"header '{refused[0][:100]}' may not be sent from a browser "
            "(server.cors.allow_headers)"
        )
    allowed = names if policy.any_header else sorted(policy.headers)
    out = {
        "Access-Control-Allow-Methods": method if ANY in methods else ", ".join(sorted(methods)),
        "Access-Control-Max-Age": policy.max_age,
    }
    if allowed:
        out["Access-Control-Allow-Headers"] = ", ".join(allowed)
    return out
