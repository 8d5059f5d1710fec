"""Gateway keys: every form a client may send one in, and every way a request fails auth."""

from __future__ import annotations

import base64

import pytest
from multidict import CIMultiDict

from proxy.auth import ANONYMOUS, KeySet, Principal, authenticate, presented_keys
from proxy.errors import AuthenticationFailed

KEYS = KeySet(["sk-alpha", "sk-beta", "sk-gamma"])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def refused(headers: CIMultiDict[str], query_key: str | None = None) -> str:
    """The message of the 401 `authenticate` raises (the test fails if it lets the request in)."""
    with pytest.raises(AuthenticationFailed) as caught:
        authenticate(headers, KEYS, query_key)
    assert 401 == caught.value.status
    assert "authentication_error" == caught.value.type
    return caught.value.message


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sk-beta"},
        {"authorization": "bearer sk-beta"},
        {"AUTHORIZATION": "BEARER   sk-beta  "},
        {"x-api-key": "sk-beta"},
        {"X-Api-Key": " sk-beta "},
        {"x-goog-api-key": "sk-beta"},
        {"Authorization": basic("token", "sk-beta")},
        {"Authorization": basic("", "sk-beta")},
    ],
    ids=[
        "bearer",
        "bearer-lowercase",
        "bearer-spaces",
        "x-api-key",
        "x-api-key-spaces",
        "x-goog-api-key",
        "basic",
        "basic-no-user",
    ],
)
def test_each_key_form_is_accepted(headers: dict[str, str]) -> None:
    """Bearer, x-api-key, x-goog-api-key and Basic-with-the-key-as-password all identify key-1."""
    assert Principal(key_id="key-1") == authenticate(CIMultiDict(headers), KEYS)


def test_query_key_is_accepted() -> None:
    """`?key=KEY` (passed in by the Gemini routes) identifies the key."""
    assert Principal(key_id="key-2") == authenticate(CIMultiDict(), KEYS, query_key="sk-gamma")


def test_basic_password_may_contain_colons() -> None:
    """Only the first colon of Basic credentials separates user from password."""
    keys = KeySet(["sk:with:colons"])
    headers = CIMultiDict({"Authorization": basic("u", "sk:with:colons")})
    assert Principal(key_id="key-0") == authenticate(headers, keys)


def test_key_ids_are_positions() -> None:
    """A key's id is its position in the configured list, never the key."""
    assert [Principal("key-0"), Principal("key-1"), Principal("key-2"), None] == [
        KEYS.match(k) for k in ("sk-alpha", "sk-beta", "sk-gamma", "sk-delta")
    ]


def test_wrong_key_is_401() -> None:
    """A key that is not configured is refused."""
    assert "invalid API key" == refused(CIMultiDict({"Authorization": "Bearer sk-wrong"}))


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-api-key": ""}, {"x-api-key": "   "}, {"x-goog-api-key": ""}, {"Authorization": ""}],
    ids=["none", "empty-x-api-key", "blank-x-api-key", "empty-goog", "empty-authorization"],
)
def test_missing_key_is_401(headers: dict[str, str]) -> None:
    """No key at all (or only blank ones) is refused, saying how to send one."""
    assert "missing API key" in refused(CIMultiDict(headers))


def test_a_key_that_is_a_prefix_is_401() -> None:
    """Only the whole key matches."""
    refused(CIMultiDict({"x-api-key": "sk-alph"}))


@pytest.mark.parametrize(
    ("headers", "query_key"),
    [
        ({"Authorization": "Bearer sk-alpha", "x-api-key": "sk-beta"}, None),
        ({"x-api-key": "sk-alpha", "x-goog-api-key": "sk-beta"}, None),
        ({"Authorization": basic("t", "sk-alpha"), "x-goog-api-key": "sk-beta"}, None),
        ({"x-goog-api-key": "sk-alpha"}, "sk-beta"),
        ({"Authorization": "Bearer sk-alpha", "x-api-key": "sk-wrong"}, None),
    ],
)
def test_two_different_keys_are_401(headers: dict[str, str], query_key: str | None) -> None:
    """A request carrying two different keys is refused, even when both are valid."""
    assert "two different API keys" in refused(CIMultiDict(headers), query_key)


@pytest.mark.parametrize(
    ("headers", "query_key"),
    [
        ({"Authorization": "Bearer sk-alpha", "x-api-key": "sk-alpha"}, None),
        ({"Authorization": basic("t", "sk-alpha"), "x-goog-api-key": "sk-alpha"}, None),
        ({"x-goog-api-key": "sk-alpha"}, "sk-alpha"),
    ],
)
def test_same_key_in_two_forms_is_accepted(headers: dict[str, str], query_key: str | None) -> None:
    """The same key sent twice (SDKs sometimes set two headers) is one key."""
    assert Principal(key_id="key-0") == authenticate(CIMultiDict(headers), KEYS, query_key)


@pytest.mark.parametrize(
    ("authorization", "message_part"),
    [
        ("Basic !!!not-base64!!!", "malformed HTTP Basic credentials"),
        ("Basic " + base64.b64encode(b"\xff\xfe:\xfd").decode(), "malformed HTTP Basic"),
        ("Basic " + base64.b64encode(b"sk-alpha").decode(), "key as the password"),
        (basic("sk-alpha", ""), "key as the password"),
        ("Token sk-alpha", "must be 'Bearer <key>' or HTTP Basic"),
        ("Digest username=x", "must be 'Bearer <key>' or HTTP Basic"),
        ("Bearer", "must be 'Bearer <key>' or HTTP Basic"),
        ("sk-alpha", "must be 'Bearer <key>' or HTTP Basic"),
    ],
)
def test_malformed_authorization_is_401(authorization: str, message_part: str) -> None:
    """Malformed Basic credentials and unsupported schemes are refused with a reason."""
    assert message_part in refused(CIMultiDict({"Authorization": authorization}))


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer anything"}, {"Authorization": "Token junk"}],
)
def test_no_keys_configured_means_auth_is_off(headers: dict[str, str]) -> None:
    """With an empty KeySet every request is the anonymous principal."""
    assert ANONYMOUS == authenticate(CIMultiDict(headers), KeySet([]))


def test_presented_keys_collects_every_form() -> None:
    """Each header form and the query key contribute to the set of presented keys."""
    headers = CIMultiDict({"Authorization": "Bearer k1", "x-api-key": "k2", "x-goog-api-key": "k3"})
    assert {"k1", "k2", "k3", "k4"} == presented_keys(headers, "k4")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 0),
        ("", 0),
        (" , ,", 0),
        ("sk-a", 1),
        (" sk-a , sk-b ,, ", 2),
        ("sk-a,sk-b,sk-c", 3),
    ],
)
def test_keyset_from_env_counts(value: str | None, expected: int) -> None:
    """Keys are comma-separated; spaces around them and empty items are ignored."""
    keys = KeySet.from_env(value)
    assert expected == len(keys)
    assert (expected > 0) == bool(keys)


def test_keyset_from_env_strips_and_keeps_order() -> None:
    """Keys from the environment are stripped and keep their positions (blanks take none)."""
    keys = KeySet.from_env(" sk-a , ,sk-b,")
    assert [Principal("key-0"), Principal("key-1"), None] == [
        keys.match(k) for k in ("sk-a", "sk-b", " sk-a ")
    ]


def test_non_ascii_key_matches() -> None:
    """A key with non-ASCII characters is compared as UTF-8."""
    keys = KeySet(["clé-ünïcode"])
    assert Principal("key-0") == keys.match("clé-ünïcode")
