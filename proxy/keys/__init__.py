"""Managed keys: records, secrets and their hashes, the stores that keep them, the cache.

What the rest of the gateway uses is named here; the modules below are this package's own.
"""

from proxy.keys.cache import POLL_S, ManagedKeys
from proxy.keys.record import (
    ALL_MODELS,
    SECRET_PREFIX,
    Hasher,
    KeyRecord,
    Models,
    UsageRow,
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
from proxy.keys.store import KeyExists, NoSuchKey, Store, StoreError, open_store

__all__ = [
    "ALL_MODELS",
    "POLL_S",
    "SECRET_PREFIX",
    "Hasher",
    "KeyExists",
    "KeyRecord",
    "ManagedKeys",
    "Models",
    "NoSuchKey",
    "Store",
    "StoreError",
    "UsageRow",
    "allows",
    "hasher_for",
    "in_force",
    "new_key",
    "new_secret",
    "open_store",
    "parse_duration",
    "parse_models",
    "parse_time",
    "public",
    "shown_prefix",
    "valid_name",
]
