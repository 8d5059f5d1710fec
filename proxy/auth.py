"""Gateway keys: where a client may put one, checking it, and what it may use."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

import msgspec
from multidict import MultiMapping

from proxy.errors import AuthenticationFailed, PermissionDenied
from proxy.keys import ALL_MODELS, KeyRecord, ManagedKeys, in_force

# Headers that carry a gateway credential; they are never forwarded upstream.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key"})


class Principal(msgspec.Struct, frozen=True):
    """Who is calling (never the key): a static key's position in the list (`key-0`...) or a
    managed key's name, and what that key may do (None: no bound)."""

    key_id: str
    models: frozenset[str] | None = None  # the models it may use; None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None


def is_admin_path(path: str) -> bool:
    """Whether a path is the admin API's (guarded by the admin key, never a client's)."""
    return path == "/admin" or path.startswith("/admin/")


def principal_of(record: KeyRecord) -> Principal:
    """The principal a managed key's record makes."""
    return Principal(
        key_id=record.name,
        models=None if record.models == ALL_MODELS else frozenset(record.models),
        rpm=record.rpm,
        tpm=record.tpm,
        max_in_flight=record.max_in_flight,
    )


def check_scope(principal: Principal | None, model: str) -> None:
    """`PermissionDenied` when the caller's key may not use `model` (the name it sent)."""
    if principal is not None and principal.models is not None and model not in principal.models:
        raise PermissionDenied(
            f"this API key may not use model '{model[:200]}'; ask for a key scoped to it"
        )


ANONYMOUS = Principal(key_id="anonymous")


class KeySet:
    """The accepted keys, held as SHA-256 digests and compared in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def from_env(cls, value: str | None) -> KeySet:
        """Keys from a comma-separated environment variable; blanks are ignored."""
        return cls([k.strip() for k in (value or "").split(",") if k.strip()])

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, key: str) -> Principal | None:
        """The principal for `key`, comparing against every key so timing tells nothing."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for i, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known):
                found = Principal(key_id=f"key-{i}")
        return found


def presented_keys(headers: MultiMapping[str], query_key: str | None = None) -> set[str]:
    """Every distinct key the request carries, in any of the accepted forms (each header as
    often as it is repeated)."""
    keys: set[str] = set()
    for auth in headers.getall("Authorization", ()):
        if not auth:
            continue
        scheme, _, value = auth.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            keys.add(value)
        elif scheme.lower() == "basic" and value:
            keys.add(_basic_password(value))
        else:
            raise AuthenticationFailed(
                "Authorization header must be 'Bearer <key>' or HTTP Basic with the key as password"
            )
    for name in ("x-api-key", "x-goog-api-key"):
        for header in headers.getall(name, ()):
            if header.strip():
                keys.add(header.strip())
    if query_key:
        keys.add(query_key)
    return keys


def authenticate(
    headers: MultiMapping[str],
    keys: KeySet,
    query_key: str | None = None,
    managed: ManagedKeys | None = None,
    now: float | None = None,
) -> Principal:
    """The caller's principal, or `AuthenticationFailed`; with no static keys and no key
    store configured, anyone. `now` (Unix time, default the clock's) decides expiry."""
    if not keys and managed is None:
        return ANONYMOUS
    presented = presented_keys(headers, query_key)
    if not presented:
        raise AuthenticationFailed(
            "missing API key: send 'Authorization: Bearer <key>' (or x-api-key)"
        )
    if len(presented) > 1:
        raise AuthenticationFailed("the request carries two different API keys; send one")
    key = presented.pop()
    if managed is not None and (record := managed.find(key)) is not None:
        now = time.time() if now is None else now
        verdict = in_force(record, now)
        if verdict != "ok":  # only the key's holder can learn this (docs/security.md)
            raise AuthenticationFailed(f"{verdict} API key")
        managed.mark_used(record.name, now)
        return principal_of(record)
    principal = keys.match(key)
    if principal is None:
        raise AuthenticationFailed("invalid API key")
    return principal


def _basic_password(value: str) -> str:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        # ValueError: b64decode refuses a str with non-ASCII characters before decoding it.
        raise AuthenticationFailed("malformed HTTP Basic credentials") from exc
    _, sep, password = decoded.partition(":")
    if not sep or not password:
        raise AuthenticationFailed("HTTP Basic credentials must carry the key as the password")
    return password
