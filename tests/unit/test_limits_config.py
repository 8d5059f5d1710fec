"""The rate-limit keys of the config: decoded, defaulted and checked with their paths."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, load_config
from proxy.limits import Limits

BACKEND = "backends:\n  gpu: {url: 'http://127.0.0.1:9'}\n"


def test_defaults() -> None:
    """No limits unless configured; Redis waits 50 ms at most; one host."""
    config = load_config(BACKEND)
    assert (None, 0.05, 1) == (
        config.auth.default_limits,
        config.auth.redis_timeout_s,
        config.auth.hosts,
    )


def test_limits_decode_for_keys_and_models() -> None:
    """auth.default_limits and models.NAME.limits take rpm, tpm and max_in_flight."""
    config = load_config(
        BACKEND
        + "auth: {default_limits: {rpm: 60}, hosts: 3, redis_timeout_s: 0.02}\n"
        + "models:\n  m: {targets: [{backend: gpu}], limits: {tpm: 1000, max_in_flight: 4}}\n"
    )
    assert Limits(rpm=60) == config.auth.default_limits
    assert Limits(tpm=1000, max_in_flight=4) == config.models["m"].limits


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("auth: {default_limits: {rpm: 0}}", "auth.default_limits.rpm: must be at least 1"),
        (
            "auth: {default_limits: {rps: 5}}",
            "auth.default_limits.rps: unknown key",
        ),
        ("auth: {hosts: 0}", "auth.hosts: must be at least 1"),
        ("auth: {redis_timeout_s: 0}", "auth.redis_timeout_s: must be a positive number"),
        ("auth: {redis_timeout_s: 30}", "auth.redis_timeout_s: must be a positive number"),
        (
            "models:\n  m: {targets: [{backend: gpu}], limits: {tpm: -1}}",
            "models.m.limits.tpm: must be at least 1",
        ),
        ("auth: {default_limits: {rpm: 1.5}}", "auth.default_limits.rpm: expected `int | null`"),
    ],
)
def test_bad_values_name_their_key(extra: str, error: str) -> None:
    """Each bad value is reported with its dotted path."""
    with pytest.raises(ConfigError) as caught:
        load_config(BACKEND + extra + "\n")
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors
