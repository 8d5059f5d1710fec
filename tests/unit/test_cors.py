"""server.cors as values: what --check says of a bad section, and what each answer carries."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, load_config
from proxy.cors import (
    DEFAULT_ALLOW_HEADERS,
    EXPOSE_HEADERS,
    CorsConfig,
    CorsPolicy,
    answer_headers,
    preflight_headers,
)
from proxy.errors import InvalidRequest, PermissionDenied
from proxy.reload import changes
from proxy.supervisor import config_text

BACKEND = "backends:\n  gpu: {url: 'http://127.0.0.1:8001', kind: vllm}\n"


def errors_of(cors: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(f"server:\n  cors: {cors}\n{BACKEND}")
    return caught.value.errors


def test_defaults() -> None:
    """Only allow_origins is required; the headers default to the gateway's own, 600 s."""
    config = load_config(f"server:\n  cors: {{allow_origins: [https://a.example]}}\n{BACKEND}")
    assert CorsConfig(allow_origins=("https://a.example",)) == config.server.cors
    assert (DEFAULT_ALLOW_HEADERS, 600) == (
        config.server.cors.allow_headers,
        config.server.cors.max_age_s,
    )
    assert None is load_config(BACKEND).server.cors  # off unless configured


@pytest.mark.parametrize(
    ("cors", "error"),
    [
        ("{}", "server.cors: object missing required field `allow_origins`"),
        (
            "{allow_origins: []}",
            "server.cors.allow_origins: list at least one origin, or leave server.cors out",
        ),
        (
            "{allow_origins: ['*', 'https://a.example']}",
            "server.cors.allow_origins: '*' (any origin) cannot be listed with origins",
        ),
        (
            "{allow_origins: ['https://App.example.com/']}",
            "server.cors.allow_origins[0]: 'https://App.example.com/' is not an origin as "
            "browsers send it (no path, no default port, lower case): write "
            "'https://app.example.com'",
        ),
        (
            "{allow_origins: ['https://a.example:443']}",
            "server.cors.allow_origins[0]: 'https://a.example:443' is not an origin as "
            "browsers send it (no path, no default port, lower case): write 'https://a.example'",
        ),
        (
            "{allow_origins: [app.example.com]}",
            "server.cors.allow_origins[0]: 'app.example.com' is not an origin: write "
            "scheme://host[:port], as https://app.example.com",
        ),
        (
            "{allow_origins: ['https://*.example.com']}",
            "server.cors.allow_origins[0]: 'https://*.example.com': an origin has no "
            "wildcards; list each origin, or '*' alone",
        ),
        (
            "{allow_origins: ['null']}",
            "server.cors.allow_origins[0]: 'null' is the origin of sandboxed and file: pages, "
            "which any site can make; it cannot be allowed",
        ),
        (
            "{allow_origins: ['http://a.example:99999']}",
            "server.cors.allow_origins[0]: 'http://a.example:99999' is not an origin "
            "(Port out of range 0-65535)",
        ),
        (
            "{allow_origins: ['*'], allow_headers: ['*', authorization]}",
            "server.cors.allow_headers: '*' (any header) cannot be listed with names",
        ),
        (
            "{allow_origins: ['*'], allow_headers: ['x api key']}",
            "server.cors.allow_headers[0]: 'x api key' is not a header name",
        ),
        (
            "{allow_origins: ['*'], max_age_s: 100000}",
            "server.cors.max_age_s: must be 0 to 86400 seconds",
        ),
        (
            "{allow_origins: ['*'], allow_credentials: true}",
            "server.cors.allow_credentials: unknown key",
        ),
    ],
)
def test_check_names_each_problem(cors: str, error: str) -> None:
    """Each mistake is reported with its dotted path and what to write instead."""
    assert [error] == errors_of(cors)


def test_ipv6_and_ports_are_accepted() -> None:
    """An IPv6 host in brackets and a port that is not the default are origins as written."""
    origins = "['http://[::1]:8080', 'http://127.0.0.1:5173', 'https://a.example:8443']"
    config = load_config(f"server:\n  cors: {{allow_origins: {origins}}}\n{BACKEND}")
    assert 3 == len(config.server.cors.allow_origins)


LISTED = CorsPolicy.of(CorsConfig(allow_origins=("https://a.example",)))
ANY = CorsPolicy.of(CorsConfig(allow_origins=("*",), allow_headers=("*",), max_age_s=0))


def test_answer_headers() -> None:
    """A listed origin gets itself back and Vary; another nothing but Vary; '*' gets '*'."""
    allowed = {"Access-Control-Allow-Origin": "https://a.example"}
    allowed["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    assert (allowed, True) == answer_headers(LISTED, "https://a.example")
    assert ({}, True) == answer_headers(LISTED, "https://b.example")
    assert ({}, True) == answer_headers(LISTED, None)
    star = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSE_HEADERS}
    assert (star, False) == answer_headers(ANY, "https://b.example")


def test_preflight_headers() -> None:
    """The route's methods and the configured headers; with '*', what was asked."""
    assert {
        "Access-Control-Allow-Methods": "GET, HEAD",
        "Access-Control-Max-Age": "600",
        "Access-Control-Allow-Headers": ", ".join(sorted(DEFAULT_ALLOW_HEADERS)),
    } == preflight_headers(
        LISTED, "https://a.example", "GET", "Authorization", frozenset({"GET", "HEAD"})
    )
    assert {
        "Access-Control-Allow-Methods": "PATCH",
        "Access-Control-Max-Age": "0",
        "Access-Control-Allow-Headers": "x-one, x-two",
    } == preflight_headers(ANY, "https://z.example", "PATCH", " X-One,x-two, ", frozenset({"*"}))
    assert "Access-Control-Allow-Headers" not in preflight_headers(
        ANY, "https://z.example", "POST", "", frozenset({"POST"})
    )


@pytest.mark.parametrize(
    ("origin", "method", "asked", "error"),
    [
        ("https://b.example", "POST", "", PermissionDenied),
        ("https://a.example", "PUT", "", PermissionDenied),
        ("https://a.example", "POST", "x-other", PermissionDenied),
        ("https://a.example", "PO ST", "", InvalidRequest),
        ("https://a.example", "POST", "x-ok, not a name", InvalidRequest),
    ],
)
def test_preflight_refusals(origin: str, method: str, asked: str, error: type) -> None:
    """Origin, method or header not allowed: 403; a method or header list that is not made
    of tokens: 400."""
    with pytest.raises(error):
        preflight_headers(LISTED, origin, method, asked, frozenset({"POST"}))


def test_a_reload_keeps_cors_for_the_restart() -> None:
    """server.cors is the server section's: a reload names it among the restart-only keys."""
    old = load_config(BACKEND)
    new = load_config(f"server:\n  cors: {{allow_origins: ['*']}}\n{BACKEND}")
    assert ("server.cors",) == changes(old, new).restart_only


def test_workers_read_the_cors_in_force() -> None:
    """The copy of the config that server.workers read back holds server.cors as it was."""
    config = load_config(
        "server:\n  workers: 2\n  cors: {allow_origins: ['https://a.example'],"
        " allow_headers: ['*'], max_age_s: 60}\n" + BACKEND
    )
    assert config == load_config(config_text(config))
