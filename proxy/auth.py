"""Gateway keys: where a client may put one, and checking it in constant time."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

import msgspec

from proxy.errors import AuthenticationFailed

# Headers that carry a gateway credential; they are never forwarded upstream.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key"})


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the position of their key in the configured list (never the key)."""

    key_id: str


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


def presented_keys(headers: Mapping[str, str], query_key: str | None = None) -> set[str]:
    """Every distinct key the request carries, in any of the accepted forms."""
    keys: set[str] = set()
    auth = headers.get("Authorization")
    if auth:
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
        header = headers.get(name)
        if header is not None and header.strip():
            keys.add(header.strip())
    if query_key:
        keys.add(query_key)
    return keys


def authenticate(
    headers: Mapping[str, str], keys: KeySet, query_key: str | None = None
) -> Principal:
    """The caller's principal, or `AuthenticationFailed`; with no keys configured, anyone."""
    if not keys:
        return ANONYMOUS
    presented = presented_keys(headers, query_key)
    if not presented:
        raise AuthenticationFailed(
            "missing API key: send 'Authorization: Bearer <key>' (or x-api-key)"
        )
    if len(presented) > 1:
        raise AuthenticationFailed("the request carries two different API keys; send one")
    principal = keys.match(presented.pop())
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
