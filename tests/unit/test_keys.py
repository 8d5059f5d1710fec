"""Managed keys as values: secrets, hashes, records, times, scope, and authenticating with them."""

from __future__ import annotations

import base64
import hmac
import re
from datetime import UTC, datetime

import pytest
from multidict import CIMultiDict

from proxy.auth import KeySet, Principal, authenticate, check_scope, principal_of
from proxy.config import ConfigError, load_config
from proxy.errors import AuthenticationFailed, PermissionDenied
from proxy.keys import (
    ALL_MODELS,
    Hasher,
    KeyRecord,
    ManagedKeys,
    allows,
    hasher_for,
    in_force,
    new_key,
    new_secret,
    parse_duration,
    parse_models,
    parse_time,
    public,
    shown_prefix,
    valid_name,
)

NOW = 1_800_000_000.0
HASHER = Hasher()


def managed_with(*records: KeyRecord, hasher: Hasher = HASHER) -> ManagedKeys:
    """A cache holding `records`, as a refresh would leave it (no store needed)."""
    managed = ManagedKeys("unused.db", hasher)
    managed.replace(1, list(records))
    return managed


def refused(managed: ManagedKeys, headers: dict[str, str], now: float = NOW) -> str:
    with pytest.raises(AuthenticationFailed) as caught:
        authenticate(CIMultiDict(headers), KeySet([]), None, managed, now)
    return caught.value.message


def test_secret_shape() -> None:
    """A secret is ipk_ and 43 URL-safe base64 characters (32 random bytes); each is new."""
    secrets = {new_secret() for _ in range(100)}
    assert 100 == len(secrets)
    for secret in secrets:
        assert re.fullmatch(r"ipk_[A-Za-z0-9_-]{43}", secret)
        assert 32 == len(base64.urlsafe_b64decode(secret[4:] + "="))
        assert secret.startswith(shown_prefix(secret))
        assert 10 == len(shown_prefix(secret))


@pytest.mark.parametrize(
    "key", [b"", b"k", b"inference-proxy managed key v1", b"x" * 64, b"y" * 200]
)
def test_hasher_is_hmac_sha256(key: bytes) -> None:
    """The precomputed HMAC is RFC 2104's, as the standard library computes it."""
    for secret in (new_secret(), "", "é\udcff", "a" * 1000):
        expected = hmac.digest(key, secret.encode("utf-8", "surrogateescape"), "sha256")
        assert expected == Hasher(key).digest(secret)


def test_record_holds_only_the_keyed_hash() -> None:
    """The record holds the secret's HMAC-SHA256 (hex), never the secret; its prefix is short."""
    secret, record = new_key("team-a", HASHER, NOW)
    assert secret not in repr(record)
    assert HASHER.hexdigest(secret) == record.hash
    assert 64 == len(record.hash)
    assert Hasher(b"another pepper of sixteen").hexdigest(secret) != record.hash
    assert "hash" not in public(record)
    assert secret not in repr(public(record))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "name 'bad name'"),
        ({"name": "key-0"}, "taken"),
        ({"name": "admin"}, "taken"),
        ({"name": "x" * 65}, "name"),
        ({"name": "ok", "models": ()}, "models"),
        ({"name": "ok", "expires": NOW - 1}, "already past"),
        ({"name": "ok", "rpm": 0}, "rpm"),
        ({"name": "ok", "tpm": -5}, "tpm"),
        ({"name": "ok", "max_in_flight": 0}, "max_in_flight"),
    ],
)
def test_new_key_refuses_bad_values(kwargs: dict, message: str) -> None:
    """Bad names, empty scopes, past expiries and limits below 1 are refused, naming the field."""
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=re.escape(message)):
        new_key(name, HASHER, NOW, **kwargs)


def test_names() -> None:
    """Names are what logs and URLs can carry safely."""
    assert [True, True, False, False, False, False] == [
        valid_name(n) for n in ("team-a", "App.v2_prod", "-x", "a b", "é", "key-12")
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600)],
)
def test_durations(text: str, seconds: int) -> None:
    """Durations in s, m, h, d and w."""
    assert seconds == parse_duration(text)


@pytest.mark.parametrize("text", ["", "30", "0d", "1y", "-1d", "1.5h", "d", "1 d"])
def test_bad_durations(text: str) -> None:
    """Anything else is refused."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_times() -> None:
    """A time is a duration from now (ahead or back) or an ISO date, UTC unless it says."""
    assert NOW + 86400 == parse_time("1d", NOW, future=True)
    assert NOW - 3600 == parse_time("1h", NOW, future=False)
    assert datetime(2026, 12, 1, tzinfo=UTC).timestamp() == parse_time(
        "2026-12-01", NOW, future=True
    )
    assert datetime(2026, 12, 1, 1, tzinfo=UTC).timestamp() == parse_time(
        "2026-12-01T02:00:00+01:00", NOW, future=True
    )
    with pytest.raises(ValueError, match="neither"):
        parse_time("tomorrow", NOW, future=True)


def test_models() -> None:
    """`--models`: names (deduplicated, in order) or * alone."""
    assert ("a", "b") == parse_models("a, b,a")
    assert ALL_MODELS == parse_models("*")
    assert ALL_MODELS == parse_models("")
    with pytest.raises(ValueError, match="alone"):
        parse_models("a,*")


def test_in_force_at_a_time() -> None:
    """A key is in force until its expiry (exclusive); a revoked key never again."""
    _, record = new_key("k", HASHER, NOW, expires=NOW + 10)
    assert ["ok", "expired", "expired"] == [
        in_force(record, t) for t in (NOW + 9.9, NOW + 10, NOW + 1e6)
    ]
    revoked = KeyRecord(**{**_fields(record), "revoked": NOW + 1})
    assert "revoked" == in_force(revoked, NOW)


def _fields(record: KeyRecord) -> dict:
    return {f: getattr(record, f) for f in record.__struct_fields__}


def test_scope() -> None:
    """A scoped key allows its models only; * allows every model."""
    assert [True, False, True] == [allows(("a",), "a"), allows(("a",), "b"), allows("*", "z")]
    _, record = new_key("k", HASHER, NOW, models=("qwen",), rpm=5, tpm=6, max_in_flight=7)
    principal = principal_of(record)
    assert Principal("k", frozenset({"qwen"}), 5, 6, 7) == principal
    check_scope(principal, "qwen")
    check_scope(Principal("key-0"), "anything")  # static keys: every model
    with pytest.raises(PermissionDenied) as caught:
        check_scope(principal, "llama")
    assert (403, "permission_denied") == (caught.value.status, caught.value.type)


def test_managed_key_authenticates_as_its_name() -> None:
    """A managed key's principal is its name, scope and limits; its use is noted for last_used."""
    secret, record = new_key("team-a", HASHER, NOW, models=("qwen",), rpm=60)
    managed = managed_with(record)
    principal = authenticate(CIMultiDict({"x-api-key": secret}), KeySet([]), None, managed, NOW)
    assert principal_of(record) == principal
    assert {"team-a": NOW} == managed.used


def test_static_keys_work_beside_managed_ones() -> None:
    """The static list keeps working, with its positional ids and no scope."""
    _, record = new_key("team-a", HASHER, NOW)
    principal = authenticate(
        CIMultiDict({"Authorization": "Bearer sk-static"}),
        KeySet(["sk-static"]),
        None,
        managed_with(record),
        NOW,
    )
    assert Principal("key-0") == principal


def test_with_a_store_and_no_keys_auth_is_still_on() -> None:
    """A store with no keys in it lets no one in (auth is never off because a store is empty)."""
    assert "missing API key" in refused(managed_with(), {})
    assert "invalid API key" == refused(managed_with(), {"x-api-key": new_secret()})


def test_expired_and_revoked_keys_are_401() -> None:
    """Expired and revoked keys are refused, saying which (only their holder can ask)."""
    secret, record = new_key("k", HASHER, NOW, expires=NOW + 60)
    managed = managed_with(record)
    assert "expired API key" == refused(managed, {"x-api-key": secret}, now=NOW + 60)
    revoked = KeyRecord(**{**_fields(record), "revoked": NOW})
    assert "revoked API key" == refused(managed_with(revoked), {"x-api-key": secret})
    assert {} == managed.used


def test_a_key_under_another_pepper_is_invalid() -> None:
    """A store read with another hash key matches none of its keys."""
    secret, record = new_key("k", HASHER, NOW)
    assert "invalid API key" == refused(
        managed_with(record, hasher=Hasher(b"0123456789abcdef")), {"x-api-key": secret}
    )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s[:-1],
        lambda s: s + "A",
        lambda s: s[:20],
        lambda s: s.upper(),
        lambda s: s[:-1] + "é",
        lambda s: s[:-1] + "\udcff",
        lambda s: s * 50,
        lambda s: "ipk_",
    ],
    ids=["short", "long", "truncated", "case", "non-ascii", "undecodable", "huge", "bare-prefix"],
)
def test_near_misses_are_invalid(mutate) -> None:
    """A key of the wrong length, case or alphabet is simply invalid, never a crash."""
    secret, record = new_key("k", HASHER, NOW)
    assert "invalid API key" == refused(managed_with(record), {"x-api-key": mutate(secret)})


def test_keys_in_several_headers() -> None:
    """The same key in several headers is one key; two different ones are a 401, also when
    one header is repeated (two Authorization lines) or one of them is a static key."""
    secret, record = new_key("k", HASHER, NOW)
    other, record2 = new_key("k2", HASHER, NOW)
    managed = managed_with(record, record2)
    same = CIMultiDict(
        [("Authorization", f"Bearer {secret}"), ("x-api-key", secret), ("x-goog-api-key", secret)]
    )
    assert "k" == authenticate(same, KeySet([]), None, managed, NOW).key_id
    for headers in (
        [("Authorization", f"Bearer {secret}"), ("Authorization", f"Bearer {other}")],
        [("x-api-key", secret), ("x-api-key", other)],
        [("x-api-key", secret), ("x-goog-api-key", "sk-static")],
    ):
        with pytest.raises(AuthenticationFailed, match="two different"):
            authenticate(CIMultiDict(headers), KeySet(["sk-static"]), None, managed, NOW)


def test_hash_key_from_the_environment() -> None:
    """auth.hash_key_env: unset means the built-in key; a named variable must be set and long."""
    secret, record = new_key("k", HASHER, NOW)
    assert record.hash == hasher_for(None, {}).hexdigest(secret)
    assert record.hash != hasher_for("PEPPER", {"PEPPER": "x" * 16}).hexdigest(secret)
    with pytest.raises(ValueError, match=r"\$PEPPER is not set"):
        hasher_for("PEPPER", {})
    with pytest.raises(ValueError, match="shorter than 16"):
        hasher_for("PEPPER", {"PEPPER": "short"})


def test_a_version_going_back_replaces_the_keys(caplog: pytest.LogCaptureFixture) -> None:
    """A store whose version went back (emptied, restored) is believed, and the log says so."""
    _, record = new_key("k", HASHER, NOW)
    managed = managed_with(record)
    managed.replace(5, [record])
    managed.replace(0, [])
    assert ({}, 0) == (managed.by_digest, managed.version)
    assert "went back from 5 to 0" in caplog.text


BACKEND = "backends: {gpu: {url: 'http://127.0.0.1:9'}}\n"


@pytest.mark.parametrize(
    ("auth", "error"),
    [
        (
            "{store: ''}",
            "auth.store: '' is neither a SQLite file path nor a redis://host:port/db URL",
        ),
        ("{store: 'http://x/y'}", "auth.store: 'http://x/y' is neither"),
        ("{store: 'redis://'}", "auth.store: a redis:// URL needs a host"),
        ("{store: 'redis://h:99999/0'}", "auth.store: 'redis://h:99999/0' is not a valid URL"),
        (
            "{store: 'redis://h:6379/zero'}",
            "auth.store: the database after the host must be a number",
        ),
        ("{store: 'redis://h/0?x=1'}", "auth.store: a redis:// URL takes no query"),
        ("{admin_key_env: ADMIN}", "auth.admin_key_env: the admin API manages auth.store's keys"),
        ("{hash_key_env: PEPPER}", "auth.hash_key_env: only managed keys"),
        (
            "{store: k.db, admin_key_env: ''}",
            "auth.admin_key_env: must name an environment variable",
        ),
        ("{open_paths: [/health, /admin/keys]}", "auth.open_paths: /admin/keys is the admin API's"),
    ],
)
def test_auth_config_errors(auth: str, error: str) -> None:
    """Every bad auth value is a config error naming its key."""
    with pytest.raises(ConfigError) as caught:
        load_config(BACKEND + f"auth: {auth}\n")
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


@pytest.mark.parametrize(
    "store",
    [
        "/var/lib/inference-proxy/keys.db",
        "keys.db",
        "redis://127.0.0.1:6379/0",
        "redis://:pw@h:1/2",
        "rediss://h",
    ],
)
def test_auth_store_forms(store: str) -> None:
    """A SQLite path (absolute or relative) or a redis:// or rediss:// URL."""
    assert store == load_config(BACKEND + f"auth: {{store: '{store}'}}\n").auth.store
