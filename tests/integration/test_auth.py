"""Gateway keys: every accepted form lets a client in; anything else is a 401 before routing."""

from __future__ import annotations

import base64

import aiohttp
import pytest

from tests.conftest import one_backend

KEYS = {"API_KEYS": "k-alpha, k-beta"}
BODY = b'{"model": "m"}'


@pytest.fixture
async def keyed(gateway_factory, upstream):
    return await gateway_factory(one_backend(upstream.url), KEYS)


async def status_of(url: str, headers: dict[str, str], method: str = "POST") -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, data=BODY if method == "POST" else None, headers=headers) as r,
    ):
        return r.status, (await r.json()) if r.content_type == "application/json" else {}


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer k-alpha"},
        {"x-api-key": "k-beta"},
        {"x-goog-api-key": "k-alpha"},
        {"Authorization": "Basic " + base64.b64encode(b"token:k-beta").decode()},
        {"Authorization": "Bearer k-alpha", "x-api-key": "k-alpha"},
    ],
)
async def test_each_key_form_is_accepted(keyed, headers) -> None:
    """Bearer, x-api-key, x-goog-api-key and HTTP Basic (key as password) all work."""
    assert 200 == (await status_of(keyed.url + "/v1/chat/completions", headers))[0]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer k-alpha", "x-api-key": "k-beta"},
        {"Authorization": "Token k-alpha"},
        {"Authorization": "Basic !!!"},
    ],
)
async def test_bad_or_missing_keys_are_401(keyed, upstream, headers) -> None:
    """No key, a wrong key, two different keys or an odd scheme: 401 authentication_error."""
    status, payload = await status_of(keyed.url + "/v1/chat/completions", headers)
    assert (401, "authentication_error") == (status, payload["error"]["type"])
    assert [] == upstream.posts


async def test_unknown_route_without_key_is_401(keyed) -> None:
    """Authentication comes before routing: an unknown path without a key is a 401."""
    assert 401 == (await status_of(keyed.url + "/no/such/route", {}))[0]


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
async def test_open_paths_need_no_key(keyed, path) -> None:
    """/health, /ready and /metrics answer without a key."""
    status, _ = await status_of(keyed.url + path, {}, method="GET")
    assert status in (200, 503)  # /ready may be 503 before the first health check


async def test_models_list_needs_a_key(keyed) -> None:
    """/v1/models is not an open path."""
    assert 401 == (await status_of(keyed.url + "/v1/models", {}, method="GET"))[0]
    assert (
        200
        == (await status_of(keyed.url + "/v1/models", {"x-api-key": "k-alpha"}, method="GET"))[0]
    )


async def test_auth_off_without_keys(gateway) -> None:
    """With no keys configured, any client is let in."""
    assert 200 == (await status_of(gateway.url + "/v1/chat/completions", {}))[0]
