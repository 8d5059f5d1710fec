"""What a managed key is, how a secret is made and hashed, and the times the CLI takes. [pure]"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Literal

import msgspec

SECRET_PREFIX = "ipk_"  # noqa: S105  (a prefix, not a secret): a managed key's first characters: recognisable in a leak scanner
SECRET_BYTES = 32  # 256 random bits: no guess or dictionary can reach one
SHOWN_CHARS = 6  # of the secret after the prefix that `keys list` shows to tell keys apart
# The HMAC key when no `auth.hash_key_env` is set: fixed, so a store is usable by any gateway
# with the same config; it separates these digests from any other use of SHA-256.
DEFAULT_HASH_KEY = b"inference-proxy managed key v1"
ALL_MODELS: Literal["*"] = "*"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Models = Literal["*"] | tuple[str, ...]


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One managed key as stored: never the secret, only its keyed hash (hex)."""

    name: str
    prefix: str  # `ipk_` and the secret's first few characters, to recognise it in a list
    hash: str  # HMAC-SHA256 of the secret, hex
    models: Models = ALL_MODELS
    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None
    created: float  # Unix time
    expires: float | None = None  # Unix time; None: never
    last_used: float | None = None  # Unix time, to within a few seconds (written in batches)
    revoked: float | None = None  # Unix time it was revoked; None: in force


class UsageRow(msgspec.Struct, frozen=True, array_like=True):
    """Requests and tokens of one key for one model in the minute starting at `minute`."""

    key: str  # the key's name (`key-0`... for static keys)
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    minute: int  # Unix time of the minute's start (a multiple of 60)


# The stores' method `list` shadows the builtin in their class bodies: these names do not.
Records = list[KeyRecord]
Rows = list[UsageRow]


def new_secret() -> str:
    """A new key: the prefix and 32 random bytes, URL-safe base64 without padding."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=")
    return SECRET_PREFIX + raw.decode("ascii")


def shown_prefix(secret: str) -> str:
    """What lists show of a key: enough to tell keys apart, far too little to guess one."""
    return secret[: len(SECRET_PREFIX) + SHOWN_CHARS]


class Hasher:
    """HMAC-SHA256 under one key: what a secret is stored and looked up as.

    The key is set up once and the keyed state copied per digest (the standard library's
    `hmac` with OpenSSL's HMAC): less than half the CPU of `hmac.digest`, which sets the key
    up on every call.
    """

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes = DEFAULT_HASH_KEY) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def digest(self, secret: str) -> bytes:
        mac = self._keyed.copy()
        mac.update(secret.encode("utf-8", "surrogateescape"))
        return mac.digest()

    def hexdigest(self, secret: str) -> str:
        return self.digest(secret).hex()


_RESERVED = re.compile(r"key-\d+|anonymous|admin")  # the static keys' and the gateway's own
MIN_HASH_KEY_CHARS = 16


def valid_name(name: str) -> bool:
    """Names are letters, digits, `.`, `_` and `-` (64 at most): safe in logs and URLs; the
    static keys' names (`key-0`...) and `anonymous`/`admin` are taken."""
    return NAME.fullmatch(name) is not None and _RESERVED.fullmatch(name) is None


def hasher_for(hash_key_env: str | None, environ: Mapping[str, str]) -> Hasher:
    """The hasher `auth.hash_key_env` asks for; ValueError when it names a variable that is
    unset or too short (every stored key would fail to match, or be easy to forge)."""
    if hash_key_env is None:
        return Hasher()
    secret = environ.get(hash_key_env, "")
    if len(secret) < MIN_HASH_KEY_CHARS:
        state = "is not set" if not secret else f"is shorter than {MIN_HASH_KEY_CHARS} characters"
        raise ValueError(f"auth.hash_key_env: ${hash_key_env} {state}")
    return Hasher(secret.encode("utf-8", "surrogateescape"))


def new_key(
    name: str,
    hasher: Hasher,
    now: float,
    *,
    models: Models = ALL_MODELS,
    expires: float | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_in_flight: int | None = None,
) -> tuple[str, KeyRecord]:
    """A new secret and the record that stores it; ValueError naming the first bad value."""
    if not valid_name(name):
        raise ValueError(
            f"name '{name[:64]}': use 1-64 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit); 'key-N', 'anonymous' and 'admin' are taken"
        )
    if models != ALL_MODELS and (not models or any(not m for m in models)):
        raise ValueError("models: list at least one model name, or '*' for every model")
    if expires is not None and expires <= now:
        raise ValueError("expires: the time is already past")
    for field, value in (("rpm", rpm), ("tpm", tpm), ("max_in_flight", max_in_flight)):
        if value is not None and value < 1:
            raise ValueError(f"{field}: must be at least 1 (leave it out for no limit)")
    secret = new_secret()
    record = KeyRecord(
        name=name,
        prefix=shown_prefix(secret),
        hash=hasher.hexdigest(secret),
        models=models,
        rpm=rpm,
        tpm=tpm,
        max_in_flight=max_in_flight,
        created=now,
        expires=expires,
    )
    return secret, record


def in_force(record: KeyRecord, now: float) -> Literal["ok", "revoked", "expired"]:
    """Whether a record lets its holder in at `now` (Unix time)."""
    if record.revoked is not None:
        return "revoked"
    if record.expires is not None and now >= record.expires:
        return "expired"
    return "ok"


def allows(models: Models, model: str) -> bool:
    """Whether a key scoped to `models` may be used for `model`."""
    return models == ALL_MODELS or model in models


def parse_models(text: str) -> Models:
    """`--models`: `*` (or nothing) for every model, else names separated by commas."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names or names == (ALL_MODELS,):
        return ALL_MODELS
    if ALL_MODELS in names:
        raise ValueError("'*' means every model; list it alone")
    return names


_DURATION = re.compile(r"(\d{1,9})([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """`90s`, `15m`, `12h`, `30d`, `2w` as seconds; ValueError for anything else."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or int(m.group(1)) == 0:
        raise ValueError(f"'{text[:50]}' is not a duration like 90s, 15m, 12h, 30d or 2w")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def parse_time(text: str, now: float, *, future: bool) -> float:
    """A point in time: a duration from `now` (ahead when `future`, else back), or an ISO
    date or date-time (UTC unless it says otherwise). ValueError for anything else."""
    text = text.strip()
    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        return now + seconds if future else now - seconds
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            when = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"'{text[:50]}' is neither a duration (30d, 12h) nor a date (2026-12-01)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def iso(when: float | None) -> str | None:
    """A Unix time as an ISO 8601 UTC string, to the second."""
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def public(record: KeyRecord) -> dict[str, object]:
    """What lists and answers show of a key: everything but its hash."""
    return {
        "name": record.name,
        "prefix": record.prefix,
        "models": record.models if record.models == ALL_MODELS else list(record.models),
        "rpm": record.rpm,
        "tpm": record.tpm,
        "max_in_flight": record.max_in_flight,
        "created": iso(record.created),
        "expires": iso(record.expires),
        "last_used": iso(record.last_used),
        "revoked": iso(record.revoked),
    }
