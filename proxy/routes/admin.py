"""The admin API: managed keys over HTTP, under `/admin/keys`, guarded by the admin key.

Off unless `auth.admin_key_env` names a set variable: then every `/admin` path answers as an
unknown route does (a client's key is checked first, then 404). On, a request needs
`Authorization: Bearer <admin key>`, compared in constant time; no client key is ever one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Mapping

import msgspec
from aiohttp import web

from proxy.auth import KeySet, Principal
from proxy.chain import json_response
from proxy.config import AuthConfig, ConfigError
from proxy.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound
from proxy.keys import (
    ALL_MODELS,
    KeyExists,
    ManagedKeys,
    NoSuchKey,
    Store,
    hasher_for,
    new_key,
    parse_time,
    public,
)
from proxy.keys.report import usage_report
from proxy.middleware import EXCHANGE
from proxy.state import STATE

logger = logging.getLogger("proxy")

ADMIN = Principal(key_id="admin")
MIN_ADMIN_KEY_CHARS = 24
MAX_BODY = 64 * 1024


class CreateKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """POST /admin/keys: what `keys create` takes on the command line."""

    name: str
    models: list[str] | str = ALL_MODELS  # "*", or model names
    expires: str | None = None  # 30d, 12h, or a date (2026-12-01)
    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None


_create_decoder = msgspec.json.Decoder(CreateKey)


def managed_keys(auth: AuthConfig, environ: Mapping[str, str]) -> ManagedKeys:
    """The cache for `auth.store` (opened at start); ConfigError for a bad hash key."""
    assert auth.store is not None
    try:
        hasher = hasher_for(auth.hash_key_env, environ)
        return ManagedKeys(auth.store, hasher, timeout_s=auth.redis_timeout_s)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


def admin_digest(auth: AuthConfig, keys: KeySet, environ: Mapping[str, str]) -> bytes | None:
    """The admin key's SHA-256, or None (the admin API off): when `auth.admin_key_env` is
    unset, names an unset variable, or holds a short key or a client's key (logged)."""
    if auth.admin_key_env is None:
        return None
    secret = environ.get(auth.admin_key_env, "")
    if not secret:
        logger.warning("admin API off: $%s is not set", auth.admin_key_env)
        return None
    if len(secret) < MIN_ADMIN_KEY_CHARS:
        logger.error(
            "admin API off: $%s is shorter than %d characters",
            auth.admin_key_env,
            MIN_ADMIN_KEY_CHARS,
        )
        return None
    if keys.match(secret) is not None:
        logger.error(
            "admin API off: $%s is also a client key in $%s", auth.admin_key_env, auth.keys_env
        )
        return None
    logger.info("admin API on at /admin/keys (the key in $%s)", auth.admin_key_env)
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def _store(request: web.Request) -> Store:
    """The key store, once the caller has shown the admin key (404 when the API is off)."""
    state = request[STATE]
    if state.admin is None or state.managed is None or state.managed.store is None:
        raise NotFound("no such route")
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    presented = hashlib.sha256(value.strip().encode("utf-8", "surrogateescape")).digest()
    ok = hmac.compare_digest(presented, state.admin)  # before the scheme test: one timing
    if not (ok and scheme.lower() == "bearer") or len(request.headers.getall("Authorization")) > 1:
        raise AuthenticationFailed("the admin API needs 'Authorization: Bearer <admin key>'")
    request[EXCHANGE].principal = ADMIN
    return state.managed.store


async def list_keys(request: web.Request) -> web.Response:
    """GET /admin/keys: every key (never its secret or hash)."""
    store = _store(request)
    return json_response({"keys": [public(r) for r in await store.list()]})


async def create_key(request: web.Request) -> web.Response:
    """POST /admin/keys: a new key, whose secret this answer holds once."""
    store = _store(request)
    if (request.content_length or 0) > MAX_BODY:
        raise InvalidRequest(f"the body is over {MAX_BODY} bytes")
    try:
        spec = _create_decoder.decode(await request.read())
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"invalid body: {exc}") from None
    now = time.time()
    try:
        if isinstance(spec.models, str) and spec.models != ALL_MODELS:
            raise ValueError("models: a list of model names, or '*' for every model")
        models = ALL_MODELS if isinstance(spec.models, str) else tuple(dict.fromkeys(spec.models))
        expires = None if spec.expires is None else parse_time(spec.expires, now, future=True)
        managed = request[STATE].managed
        assert managed is not None
        secret, record = new_key(
            spec.name,
            managed.hasher,
            now,
            models=models,
            expires=expires,
            rpm=spec.rpm,
            tpm=spec.tpm,
            max_in_flight=spec.max_in_flight,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    try:
        await store.create(record)
    except KeyExists as exc:
        raise Conflict(str(exc)) from None
    return json_response({"key": secret, **public(record)}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    """DELETE /admin/keys/{name}: the key is refused everywhere within a second."""
    store = _store(request)
    try:
        record = await store.revoke(request.match_info["name"], time.time())
    except NoSuchKey as exc:
        raise NotFound(str(exc)) from None
    return json_response(public(record))


async def key_usage(request: web.Request) -> web.Response:
    """GET /admin/keys/usage?since=1h: requests and tokens per key and model."""
    store = _store(request)
    now = time.time()
    try:
        since = parse_time(request.query.get("since", "24h"), now, future=False)
    except ValueError as exc:
        raise InvalidRequest(f"since: {exc}") from None
    return json_response(usage_report(await store.usage(since), since))


async def unknown(request: web.Request) -> web.Response:
    """Any other /admin path: the admin key first, then 404."""
    _store(request)
    raise NotFound("no such route")


def add_admin_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/keys", list_keys)
    router.add_post("/admin/keys", create_key)
    router.add_get("/admin/keys/usage", key_usage)
    router.add_delete("/admin/keys/{name}", revoke_key)
    router.add_route("*", "/admin/{path:.*}", unknown)
