"""The configuration: defaults, unknown keys, type errors and cross-checks, and `--check`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.__main__ import main
from proxy.config import (
    AuthConfig,
    BackendConfig,
    Config,
    ConfigError,
    HealthConfig,
    ModelConfig,
    ServerConfig,
    TargetConfig,
    TimeoutsConfig,
    backend_only_config,
    health_path,
    load_config,
    with_listen,
)

REPO = Path(__file__).resolve().parents[2]
ONE_BACKEND = "backends:\n  gpu-a: {url: 'http://10.0.0.5:8000', kind: vllm}\n"


def errors_of(text: str) -> list[str]:
    """The errors `load_config` reports for `text` (the test fails if it reports none)."""
    with pytest.raises(ConfigError) as caught:
        load_config(text)
    assert caught.value.errors, "ConfigError without errors"
    assert "\n".join(caught.value.errors) == str(caught.value)
    return caught.value.errors


def paths_of(errors: list[str]) -> list[str]:
    """The dotted key path each error starts with."""
    return [e.split(": ", 1)[0] for e in errors]


# --- defaults ----------------------------------------------------------------------------


def test_server_defaults() -> None:
    """With no server section the gateway listens on 127.0.0.1:8000, one worker, 32 MiB, 30 s."""
    expected = ServerConfig(host="127.0.0.1", port=8000, workers=1, max_body_mb=32.0, drain_s=30.0)
    assert expected == load_config(ONE_BACKEND).server


def test_timeouts_defaults() -> None:
    """Default timeouts are those DESIGN.md documents: 120 s, at most 3600 s, 5 s, 60 s idle."""
    expected = TimeoutsConfig(request_s=120.0, max_request_s=3600.0, connect_s=5.0, idle_s=60.0)
    assert expected == load_config(ONE_BACKEND).timeouts


def test_auth_defaults() -> None:
    """Keys come from API_KEYS and only /health, /ready and /metrics are open by default."""
    expected = AuthConfig(keys_env="API_KEYS", open_paths=("/health", "/ready", "/metrics"))
    assert expected == load_config(ONE_BACKEND).auth


def test_health_defaults() -> None:
    """Backends are probed every 5 s with a 2 s timeout by default."""
    assert HealthConfig(interval_s=5.0, timeout_s=2.0) == load_config(ONE_BACKEND).health


def test_backend_defaults() -> None:
    """A backend given only a URL is an OpenAI-compatible one with no key and no in-flight cap."""
    expected = BackendConfig(
        url="http://h:1",
        kind="openai",
        api_key_env=None,
        max_in_flight=None,
        keepalive_s=4.0,
        max_connections=16384,
        health_path=None,
    )
    assert {"b": expected} == load_config("backends: {b: {url: 'http://h:1'}}").backends


def test_model_and_target_defaults() -> None:
    """A target's weight defaults to 1 and its model to None; a model has no fallbacks."""
    config = load_config(ONE_BACKEND + "models:\n  qwen:\n    targets: [{backend: gpu-a}]\n")
    expected = ModelConfig(
        targets=(TargetConfig(backend="gpu-a", model=None, weight=1.0),), fallbacks=()
    )
    assert {"qwen": expected} == config.models


def test_no_models_section_is_an_empty_mapping() -> None:
    """Without a models section the config has no models (the pass-through mode)."""
    assert {} == load_config(ONE_BACKEND).models


def test_conf_proxy_yaml_loads() -> None:
    """The shipped conf/proxy.yaml is valid: one vLLM backend and the sim-model entry."""
    config = load_config((REPO / "conf" / "proxy.yaml").read_bytes())
    assert {"gpu-a": BackendConfig(url="http://127.0.0.1:8001", kind="vllm")} == config.backends
    assert {"sim-model": ModelConfig(targets=(TargetConfig(backend="gpu-a", weight=1.0),))} == (
        config.models
    )


def test_conf_proxy_yaml_shows_the_defaults() -> None:
    """conf/proxy.yaml says it lists every key with its default: its sections equal the defaults."""
    config = load_config((REPO / "conf" / "proxy.yaml").read_bytes())
    assert ServerConfig() == config.server
    assert TimeoutsConfig() == config.timeouts
    assert AuthConfig() == config.auth
    assert HealthConfig() == config.health


# --- unknown keys ------------------------------------------------------------------------


def test_every_unknown_key_is_reported_with_its_dotted_path() -> None:
    """Unknown keys at the top, in a section, a backend, a model and a target all show at once."""
    text = """
foo: 1
server: {prot: 8000}
timeouts: {idle: 5}
backends:
  gpu-a: {url: 'http://h:1', kind: vllm, api_key: secret}
models:
  qwen:
    targets: [{backend: gpu-a}, {backend: gpu-a, modle: x}]
    fallback: []
"""
    expected = [
        "foo: unknown key",
        "server.prot: unknown key",
        "timeouts.idle: unknown key",
        "backends.gpu-a.api_key: unknown key",
        "models.qwen.targets[1].modle: unknown key",
        "models.qwen.fallback: unknown key",
    ]
    assert sorted(expected) == sorted(errors_of(text))


# --- type errors -------------------------------------------------------------------------


def test_type_errors_carry_dotted_paths() -> None:
    """A wrong type in a section, a backend and a target each names its own key path."""
    text = """
server: {port: abc}
backends:
  a: {url: 'http://h:1', kind: vLLM}
models:
  q:
    targets: [{backend: a, weight: heavy}]
"""
    errors = errors_of(text)
    assert ["server.port", "backends.a.kind", "models.q.targets[0].weight"] == paths_of(errors)
    assert all(e.split(": ", 1)[1].strip() for e in errors)  # each says what is wrong


def test_type_errors_in_several_backends_are_all_reported() -> None:
    """Each backend is type-checked on its own, so a mistake in one hides none in another."""
    text = """
backends:
  a: {url: 'http://h:1', kind: cuda}
  b: {url: 'http://h:2', max_in_flight: many}
  c: {kind: tgi}
  d: {url: 'http://h:4', keepalive_s: [1]}
  e: 5
"""
    expected = [
        "backends.a.kind",
        "backends.b.max_in_flight",
        "backends.c",
        "backends.d.keepalive_s",
        "backends.e",
    ]
    errors = errors_of(text)
    assert expected == paths_of(errors)
    assert "url" in errors[2]


def test_a_boolean_is_not_a_port() -> None:
    """`port: true` is a type error, not port 1."""
    assert ["server.port"] == paths_of(errors_of(ONE_BACKEND + "server: {port: true}\n"))


def test_backends_must_be_a_mapping() -> None:
    """A list under `backends` is reported as such."""
    assert ["backends: expected a mapping of names to entries"] == errors_of(
        "backends: [http://h:1]\n"
    )


# --- value and cross-reference checks ----------------------------------------------------


def test_every_cross_check_is_reported_at_once() -> None:
    """Unknown backend and fallback, self-fallback, bad weights, bad URL and timeouts: all shown."""
    text = """
server: {port: 70000}
timeouts: {request_s: 600, max_request_s: 300}
backends:
  gpu-a: {url: 'http://10.0.0.5:8000', kind: vllm}
  gpu-b: {url: 'ftp://10.0.0.6', kind: tgi}
models:
  qwen:
    targets:
      - {backend: gpu-z}
      - {backend: gpu-a, weight: 0}
      - {backend: gpu-a, weight: -1}
    fallbacks: [qwen-small, qwen]
"""
    expected = [
        "server.port: 70000 is not a TCP port (0-65535)",
        "timeouts.request_s: must not exceed timeouts.max_request_s",
        "backends.gpu-b.url: 'ftp://10.0.0.6' is not an http(s) URL with a host",
        "models.qwen.targets[0].backend: unknown backend 'gpu-z'",
        "models.qwen.targets[1].weight: must be a positive number",
        "models.qwen.targets[2].weight: must be a positive number",
        "models.qwen.fallbacks[0]: unknown model 'qwen-small'",
        "models.qwen.fallbacks[1]: a model cannot fall back to itself",
    ]
    assert sorted(expected) == sorted(errors_of(text))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h:1", "'ftp://h:1' is not an http(s) URL with a host"),
        ("10.0.0.5:8000", "'10.0.0.5:8000' is not an http(s) URL with a host"),
        ("http://", "'http://' is not an http(s) URL with a host"),
        ("http://h:1/?x=1", "must not carry a query or fragment"),
        ("http://h:1/#top", "must not carry a query or fragment"),
    ],
)
def test_bad_backend_urls(url: str, message: str) -> None:
    """A backend URL must be http(s) with a host and no query or fragment."""
    assert [f"backends.a.url: {message}"] == errors_of(f"backends: {{a: {{url: '{url}'}}}}\n")


def test_backend_url_with_a_path_prefix_is_fine() -> None:
    """https and a path prefix are accepted."""
    config = load_config("backends: {a: {url: 'https://h.example/prefix'}}\n")
    assert "https://h.example/prefix" == config.backends["a"].url


def test_backend_value_checks() -> None:
    """Non-positive in-flight, keep-alive and pool sizes and a relative health path are errors."""
    text = """
backends:
  a: {url: 'http://h:1', max_in_flight: 0, keepalive_s: 0, max_connections: 0, health_path: up}
"""
    expected = [
        "backends.a.max_in_flight: must be at least 1",
        "backends.a.keepalive_s: must be positive",
        "backends.a.health_path: must start with '/'",
        "backends.a.max_connections: must be at least 1",
    ]
    assert sorted(expected) == sorted(errors_of(text))


def test_server_and_timeout_value_checks() -> None:
    """Negative workers, zero body size and timeouts, and a negative drain, are each reported."""
    text = ONE_BACKEND + (
        "server: {workers: -1, max_body_mb: 0, drain_s: -1}\n"
        "timeouts: {request_s: 0, max_request_s: 0, connect_s: 0, idle_s: 0}\n"
        "health: {interval_s: 0}\n"
    )
    expected = [
        "health: interval_s and timeout_s must be positive",
        "server.drain_s: must be a number, 0 or more",
        "server.max_body_mb: must be a positive number",
        "timeouts.connect_s: must be a positive number",
        "timeouts.idle_s: must be a positive number",
        "timeouts.max_request_s: must be a positive number",
        "timeouts.request_s: must be a positive number",
    ]
    errors = sorted(errors_of(text))
    assert ["server.workers: must be 0 (one per core) to 256"] == [
        e for e in errors if e.startswith("server.w")
    ]
    assert expected == [e for e in errors if not e.startswith("server.workers")]


def test_a_model_needs_a_target() -> None:
    """An empty target list is an error."""
    assert ["models.q.targets: at least one target is needed"] == errors_of(
        ONE_BACKEND + "models: {q: {targets: []}}\n"
    )


def test_a_config_needs_a_backend() -> None:
    """An empty file is valid YAML but configures no backend."""
    assert ["backends: no backend configured"] == errors_of("")


@pytest.mark.parametrize("weight", [".nan", ".inf"])
def test_a_weight_must_be_a_finite_number(weight: str) -> None:
    """A target weight of NaN or infinity is reported by --check, not found at request time."""
    text = ONE_BACKEND + f"models: {{q: {{targets: [{{backend: gpu-a, weight: {weight}}}]}}}}\n"
    assert ["models.q.targets[0].weight"] == paths_of(errors_of(text))


def test_a_nan_timeout_is_an_error() -> None:
    """`timeouts.request_s: .nan` is reported instead of becoming every request's deadline."""
    assert ["timeouts.request_s"] == paths_of(
        errors_of(ONE_BACKEND + "timeouts: {request_s: .nan}\n")
    )


# --- not a config at all -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["server: [", "a: b: c", "backends:\n  - a\n b: 1"])
def test_unparsable_yaml_is_a_config_error(text: str) -> None:
    """YAML that does not parse is one ConfigError saying so."""
    errors = errors_of(text)
    assert 1 == len(errors)
    assert errors[0].startswith("invalid YAML: ")


@pytest.mark.parametrize("text", ["[1, 2]", "just a string", "42"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    """A list, a string or a number at the top level is a ConfigError."""
    assert ["(top level): expected a mapping of sections"] == errors_of(text)


# --- the no-file mode and the command-line overrides ------------------------------------


def test_backend_only_config() -> None:
    """`--backend URL` gives one default OpenAI-compatible backend and no models."""
    config = backend_only_config("http://127.0.0.1:8001")
    assert {"default": BackendConfig(url="http://127.0.0.1:8001")} == config.backends
    assert {} == config.models
    assert ServerConfig() == config.server


def test_backend_only_config_applies_host_and_port() -> None:
    """`--backend` with `--host` and `--port` listens where asked."""
    server = backend_only_config("http://127.0.0.1:8001", "10.1.2.3", 9000).server
    assert ("10.1.2.3", 9000) == (server.host, server.port)


def test_backend_only_config_rejects_a_bad_url() -> None:
    """A bad `--backend` URL is a ConfigError naming the backend's url key."""
    with pytest.raises(ConfigError) as caught:
        backend_only_config("127.0.0.1:8001")
    assert ["backends.default.url"] == paths_of(caught.value.errors)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        (None, None, ("127.0.0.1", 8000)),
        ("::1", None, ("::1", 8000)),
        (None, 9001, ("127.0.0.1", 9001)),
        ("10.1.1.1", 0, ("10.1.1.1", 0)),
    ],
)
def test_with_listen(host: str | None, port: int | None, expected: tuple[str, int]) -> None:
    """--host and --port replace the file's values only when given, and touch nothing else."""
    config = load_config(ONE_BACKEND)
    changed = with_listen(config, host, port)
    assert expected == (changed.server.host, changed.server.port)
    assert config.backends == changed.backends
    assert config.server.max_body_mb == changed.server.max_body_mb


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("vllm", "/health"),
        ("sglang", "/health"),
        ("tgi", "/health"),
        ("llamacpp", "/health"),
        ("ollama", "/"),
        ("openai", "/v1/models"),
    ],
)
def test_health_path_by_kind(kind: str, expected: str) -> None:
    """Each backend kind is probed where it says it is alive."""
    config = load_config(f"backends: {{a: {{url: 'http://h:1', kind: {kind}}}}}\n")
    assert expected == health_path(config.backends["a"])


def test_health_path_from_config_wins() -> None:
    """An explicit health_path overrides the kind's default."""
    config = load_config("backends: {a: {url: 'http://h:1', kind: ollama, health_path: /ping}}\n")
    assert "/ping" == health_path(config.backends["a"])


def test_config_is_frozen() -> None:
    """A loaded config cannot be changed in place (reloads build a new one)."""
    config = load_config(ONE_BACKEND)
    with pytest.raises(AttributeError):
        config.server = ServerConfig()  # type: ignore[misc]
    assert isinstance(config, Config)


# --- inference-proxy --config FILE --check -----------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`main` configures logging for the process; put the loggers back after the test."""
    root, access = logging.getLogger(), logging.getLogger("proxy.access")
    saved = (root.handlers[:], root.level, access.handlers[:], access.propagate)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    access.handlers[:], access.propagate = saved[2], saved[3]


@pytest.mark.usefixtures("restore_logging")
def test_check_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` on a valid file exits 0 and says so."""
    path = tmp_path / "proxy.yaml"
    path.write_text(ONE_BACKEND)
    assert 0 == main(["--config", str(path), "--check"])
    captured = capsys.readouterr()
    assert "config ok\n" == captured.out
    assert "" == captured.err


@pytest.mark.usefixtures("restore_logging")
def test_check_accepts_the_shipped_example(capsys: pytest.CaptureFixture[str]) -> None:
    """`--check conf/proxy.yaml` exits 0."""
    assert 0 == main(["--config", str(REPO / "conf" / "proxy.yaml"), "--check"])
    assert "config ok\n" == capsys.readouterr().out


@pytest.mark.usefixtures("restore_logging")
def test_check_prints_every_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--check` on a bad file exits 2 and prints each error with its path on stderr."""
    path = tmp_path / "proxy.yaml"
    path.write_text(
        ONE_BACKEND
        + "models:\n  qwen:\n    targets: [{backend: gpu-z}]\n    fallbacks: [qwen-small]\n"
    )
    assert 2 == main(["--config", str(path), "--check"])
    captured = capsys.readouterr()
    expected = [
        "config error: models.qwen.targets[0].backend: unknown backend 'gpu-z'",
        "config error: models.qwen.fallbacks[0]: unknown model 'qwen-small'",
    ]
    assert expected == captured.err.splitlines()
    assert "" == captured.out


@pytest.mark.usefixtures("restore_logging")
def test_check_reports_unknown_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` names a misspelt key as `server.prot: unknown key`."""
    path = tmp_path / "proxy.yaml"
    path.write_text(ONE_BACKEND + "server: {prot: 8000}\n")
    assert 2 == main(["--config", str(path), "--check"])
    assert ["config error: server.prot: unknown key"] == capsys.readouterr().err.splitlines()


@pytest.mark.usefixtures("restore_logging")
def test_check_of_unparsable_yaml_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--check` on a file that is not YAML exits 2."""
    path = tmp_path / "proxy.yaml"
    path.write_text("server: [\n")
    assert 2 == main(["--config", str(path), "--check"])
    assert capsys.readouterr().err.startswith("config error: invalid YAML: ")


@pytest.mark.usefixtures("restore_logging")
def test_check_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--check` on a file that does not exist exits 2 and names the file."""
    path = tmp_path / "absent.yaml"
    assert 2 == main(["--config", str(path), "--check"])
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {path}: ")
    assert "No such file" in err


def test_every_kind_of_error_in_one_run() -> None:
    """Unknown keys do not hide type, value or cross-reference errors elsewhere in the file."""
    errors = errors_of(
        "server: {prot: 1, port: -1}\n"
        "backends:\n"
        "  a: {url: 'http://h:1', colour: red}\n"
        "  b: {url: 'http://h:2', keepalive_s: soon}\n"
        "models:\n"
        "  q: {targets: [{backend: gpu-z}, {backend: b}, {backend: a}], fallbacks: [nope]}\n"
    )
    assert "server.prot: unknown key" in errors
    assert "backends.a.colour: unknown key" in errors
    assert "server.port: -1 is not a TCP port (0-65535)" in errors
    assert any(e.startswith("backends.b.keepalive_s: ") for e in errors)
    assert "models.q.targets[0].backend: unknown backend 'gpu-z'" in errors
    assert "models.q.fallbacks[0]: unknown model 'nope'" in errors
    assert 6 == len(errors)


def test_a_broken_section_does_not_report_its_references() -> None:
    """`backends` that is not a mapping is one error, not one more per target naming it."""
    errors = errors_of("backends: [x]\nmodels:\n  q: {targets: [{backend: x}]}\n")
    assert ["backends: expected a mapping of names to entries"] == errors


@pytest.mark.parametrize(
    ("server", "error"),
    [
        ("header_timeout_s: 0", "server.header_timeout_s: must be a positive number"),
        ("body_timeout_s: -1", "server.body_timeout_s: must be a positive number"),
        ("keepalive_s: .nan", "server.keepalive_s: must be a positive number"),
        ("max_connections: 0", "server.max_connections: must be at least 1"),
    ],
)
def test_client_limits_must_be_positive(server: str, error: str) -> None:
    """The limits on client connections are checked like every other value."""
    assert [error] == errors_of(f"server: {{{server}}}\nbackends: {{a: {{url: 'http://h:1'}}}}\n")


def test_client_limits_have_safe_defaults() -> None:
    """With no server section, every client limit is on."""
    server = load_config("backends: {a: {url: 'http://h:1'}}\n").server
    assert (10.0, 60.0, 30.0, 10000) == (
        server.header_timeout_s,
        server.body_timeout_s,
        server.keepalive_s,
        server.max_connections,
    )


def test_a_fallback_cycle_is_a_config_error() -> None:
    """Fallbacks that lead back to a model are refused, naming the cycle once."""
    errors = errors_of(
        "backends: {a: {url: 'http://h:1'}}\n"
        "models:\n"
        "  x: {targets: [{backend: a}], fallbacks: [y]}\n"
        "  y: {targets: [{backend: a}], fallbacks: [x]}\n"
    )
    assert [
        "models.x.fallbacks: a cycle (x -> y -> x); a model may fall back to another only once"
    ] == errors


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("health: {unhealthy_threshold: 0}", "health.unhealthy_threshold: must be at least 1"),
        ("outlier_detection: {base_ejection_s: 0}", "outlier_detection.base_ejection_s: must be a positive number"),
        ("outlier_detection: {base_ejection_s: 20, max_ejection_s: 10}", "outlier_detection.max_ejection_s: must not be below base_ejection_s"),
        ("routing: {load_factor: 1}", "routing.load_factor: must be a number above 1"),
        ("server: {queue_timeout_s: -1}", "server.queue_timeout_s: must be a positive number"),
        ("models: {m: {targets: [{backend: a}], policy: random}}", "models.m.policy: "),
    ],
)  # fmt: skip
def test_fleet_settings_are_checked(text: str, error: str) -> None:
    """The fleet's settings are checked like every other value."""
    errors = errors_of(f"backends: {{a: {{url: 'http://h:1'}}}}\n{text}\n")
    assert any(e.startswith(error) for e in errors), errors
