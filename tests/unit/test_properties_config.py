"""Properties of config loading: any YAML text, and any tree of the real sections and keys with
values of every YAML type, gives a `Config` or a `ConfigError`, never another exception."""

from __future__ import annotations

import datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from proxy.config import Config, ConfigError, load_config
from tests.unit.test_properties_json import FAST, mutated

# Values of every type YAML's safe loader makes, dates and odd floats included.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.dates()
    | st.datetimes(max_value=datetime.datetime(9999, 1, 1))
    | st.sampled_from(["http://h:1", "https://[::1]:8000/p", "http://[", "http://h:99999", "/x"])
    | st.sampled_from(["vllm", "tgi", "ollama", "embeddings", "messages", "llm/v1/chat"])
)
JUNK: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(SCALARS, kids, max_size=3),
    max_leaves=8,
)


def section(**keys: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping of a section's real keys with plausible values (`mutated` spoils some)."""
    return st.fixed_dictionaries({}, optional=keys)


NUMBER = st.integers(-1, 70000) | st.floats(-1, 1e6) | st.sampled_from([0, float("inf")])
NAME = st.sampled_from(["a", "b", "gpu-a"])
URLS = ["http://10.0.0.5:8000", "https://h/v1", "http://[::1]:8000", "ftp://x", "http://[::1"]
BACKEND = st.fixed_dictionaries(
    {"url": st.sampled_from([*URLS, "http://h:abc", "http://h:99999", "http://h:1?x"])},
    optional={},
) | section(
    url=st.sampled_from(URLS),
    kind=st.sampled_from(["vllm", "sglang", "tgi", "ollama", "llamacpp", "openai", "cuda"]),
    api_key_env=st.text(max_size=5),
    max_in_flight=NUMBER,
    keepalive_s=NUMBER,
    max_connections=NUMBER,
    health_path=st.sampled_from(["/health", "up"]),
    serves=st.lists(st.sampled_from(["embeddings", "responses", "messages", "x"]), max_size=2),
)
TARGET = section(backend=NAME, model=st.text(max_size=5), weight=NUMBER)
MODEL = section(
    targets=st.lists(TARGET, max_size=2),
    fallbacks=st.lists(NAME, max_size=2),
    endpoint_type=st.sampled_from(["llm/v1/chat", "llm/v1/completions", "x"]),
    vision=st.booleans(),
)
VALID_CONFIG = section(
    server=section(
        host=st.text(max_size=5),
        port=NUMBER,
        workers=NUMBER,
        max_body_mb=NUMBER,
        drain_s=NUMBER,
        access_log=st.booleans(),
        header_timeout_s=NUMBER,
        body_timeout_s=NUMBER,
        keepalive_s=NUMBER,
        max_connections=NUMBER,
    ),
    timeouts=section(request_s=NUMBER, max_request_s=NUMBER, connect_s=NUMBER, idle_s=NUMBER),
    auth=section(keys_env=st.text(max_size=5), open_paths=st.lists(st.text(max_size=5))),
    health=section(interval_s=NUMBER, timeout_s=NUMBER),
    backends=st.dictionaries(NAME, BACKEND, max_size=2),
    models=st.dictionaries(NAME, MODEL, max_size=2),
)
CONFIG = mutated(VALID_CONFIG, JUNK)


def load(text: str | bytes) -> Config | None:
    """The Config, or None after a ConfigError with at least one message."""
    try:
        return load_config(text)
    except ConfigError as err:
        assert err.errors
        return None


@FAST
@given(CONFIG)
def test_trees_of_real_keys_give_a_config_or_config_error(tree: dict[str, Any]) -> None:
    """YAML dumps of the real sections and keys with junk values: a Config or a ConfigError."""
    config = load(yaml.safe_dump(tree, allow_unicode=True))
    if config is not None:  # what the gateway then reads of it works
        for backend in config.backends.values():
            assert isinstance(urlsplit(backend.url).port, int | None)


YAML_TOKENS = st.sampled_from(
    [
        "server:", "backends:", "models:", " a:", "  url: http://h:1", "\n", "  ", "- ", "[",
        "]", "{", "}", ",", ": ", "&x ", "*x", "<<: ", "!!str ", "!!binary ", "!!python/tuple ",
        "? ", "|", ">", "'", '"', "#", "---", "...", "%YAML 1.1\n", "~", "1e400", "0x1F",
        "2024-01-01", ".inf", ".nan", "targets:", "backend: a", "\t", "\x00",
    ]
)  # fmt: skip
YAML_TEXT = st.lists(YAML_TOKENS, max_size=25).map("".join)
# Past the limits of the parser's recursion and of int()'s digits.
SIZES = st.sampled_from([10, 100, 1000, 3000, 6000])  # a few sizes: a failure shrinks at once
LIMITS = SIZES.map(lambda n: "x: " + "[" * n + "]" * n) | SIZES.map(
    lambda n: "server: {port: " + "9" * n + "}"
)


# A deep-nesting failure takes a second a try, so this one does not shrink: the minimal inputs
# are the regression cases below.
@settings(FAST, phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)
@given(YAML_TEXT | LIMITS | st.text(max_size=40) | st.binary(max_size=40))
def test_any_text_gives_a_config_or_config_error(text: str | bytes) -> None:
    """Any YAML-ish text or bytes: a Config or a ConfigError."""
    load(text)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("backends: {a: {url: 'http://[::1'}}", "backends.a.url"),  # urlsplit's ValueError
        ("backends: {a: {url: 'http://h:abc'}}", "backends.a.url"),  # the pool's ValueError later
        ("backends: {a: {url: 'http://h:99999'}}", "backends.a.url"),  # the pool's ValueError later
        ("server: {port: " + "9" * 5000 + "}", "invalid YAML"),  # PyYAML's int(): ValueError
        ("x: " + "[" * 5000 + "]" * 5000, ""),  # PyYAML's RecursionError
        ("server: " + "{a: " * 3000 + "1" + "}" * 3000, ""),  # PyYAML's RecursionError
    ],
)
def test_config_crashes_the_fuzzers_found_are_config_errors(text: str, path: str) -> None:
    """Each of these raised ValueError or RecursionError (or loaded, and crashed the pool later)."""
    with pytest.raises(ConfigError) as caught:
        load_config(text)
    assert any(e.startswith(path) for e in caught.value.errors)
