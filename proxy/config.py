"""The configuration: typed, frozen, checked as a whole before the gateway starts."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from proxy.cors import CorsConfig, check_cors
from proxy.limits import Limits

BackendKind = Literal["vllm", "sglang", "tgi", "ollama", "llamacpp", "openai"]
# Routes that not every OpenAI-compatible server has.
OptionalApi = Literal[
    "embeddings", "responses", "messages", "chat_template", "tokenize", "detokenize"
]
_SERVES_BY_KIND: dict[str, tuple[OptionalApi, ...]] = {
    "vllm": ("embeddings", "responses", "messages", "chat_template", "tokenize", "detokenize"),
    "sglang": ("embeddings", "responses", "messages", "tokenize", "detokenize"),
    "ollama": ("embeddings", "responses", "messages"),
    "llamacpp": ("embeddings", "responses", "messages", "tokenize", "detokenize"),
    "tgi": ("tokenize",),
    "openai": ("embeddings",),
}


MAX_WORKERS = 256


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: immutable, unknown keys rejected."""


class TlsConfig(_Section, frozen=True):
    """HTTPS on the listening port (HTTP/1.1 only): PEM files, read at start and on reload."""

    cert_file: str  # the certificate chain, leaf first
    key_file: str


class ServerConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: int = msgspec.field(default=8000)
    workers: int = 1  # serving processes on the port (SO_REUSEPORT); 0 = one per core
    tls: TlsConfig | None = None
    max_body_mb: float = 32.0
    drain_s: float = 30.0
    drain_grace_s: float = 0.0  # on SIGTERM: serve on this long (/ready 503) before closing
    access_log: bool = True
    # What a client without a key can hold open (docs/security.md).
    header_timeout_s: float = 10.0  # a new connection's first request head must arrive by then
    body_timeout_s: float = 60.0  # the whole body, and never past the request's deadline
    keepalive_s: float = 30.0  # an idle kept-alive client connection is closed after this
    max_connections: int = 10000  # open client connections; see proxy/listener.py
    queue_timeout_s: float = 30.0  # longest wait for a free target when all are full -> 503
    max_queue: int = 4096  # requests waiting at once; one more is a 503 at once
    cors: CorsConfig | None = None  # browser apps on other origins (README: CORS); off if unset


class TimeoutsConfig(_Section, frozen=True):
    request_s: float = 120.0
    max_request_s: float = 3600.0
    connect_s: float = 5.0
    idle_s: float = 60.0
    head_s: float | None = None  # longest wait for an answer's head; then the next target


class AuthConfig(_Section, frozen=True):
    keys_env: str = "API_KEYS"
    open_paths: tuple[str, ...] = ("/health", "/ready", "/metrics")
    default_limits: Limits | None = None  # rpm, tpm, max_in_flight of keys that set none
    redis_timeout_s: float = 0.05  # longest wait for Redis on a request's path
    hosts: int = 1  # gateways sharing auth.store's Redis: each takes 1/hosts while it is away
    store: str | None = None  # managed keys: a SQLite file path, or redis://host:port/db
    admin_key_env: str | None = None  # the admin API (/admin/keys) is on when this var is set
    hash_key_env: str | None = None  # a secret mixed into the stored keys' HMAC (docs/security.md)


class HealthConfig(_Section, frozen=True):
    interval_s: float = 5.0
    timeout_s: float = 2.0
    healthy_threshold: int = 1  # consecutive passing probes that bring a backend up
    unhealthy_threshold: int = 2  # consecutive failing probes that take it down


class OutlierConfig(_Section, frozen=True):
    """Passive checks: a backend whose requests keep failing is ejected for a while."""

    consecutive_failures: int = 5  # connect failures, resets before a byte, 5xx answers
    base_ejection_s: float = 10.0  # the first ejection; each one after it doubles
    max_ejection_s: float = 300.0


KeyPlacement = Literal["auto", "sticky", "agreed"]


class RoutingConfig(_Section, frozen=True):
    """How the `affinity` policy keys requests and bounds each replica's share."""

    prefix_bytes: int = 2048  # of the prompt (messages, prompt or input) that make the key
    load_factor: float = 1.25  # a replica takes a key while its load is within this x average
    prefix_index_size: int = 10_000  # keys whose replica is remembered (LRU); 0: no index
    key_load_factor: float = 1.0  # a new key's replica holds at most this x its share of keys
    # sticky: where this gateway first placed a key; agreed: one matching of all the keys held,
    # alike in every gateway; auto: agreed when server.workers is not 1
    key_placement: KeyPlacement = "auto"


StreamUsage = Literal["auto", "always", "never"]


class UsageConfig(_Section, frozen=True):
    """Usage of streams whose client did not ask for it, and per-key usage (README: Usage)."""

    streams: StreamUsage = "auto"  # ask streams' backends for usage: auto = with a key store
    flush_s: float = 5.0  # per-key usage is written to auth.store this often


class TracingConfig(_Section, frozen=True):
    """OpenTelemetry traces over OTLP/HTTP (README: Tracing); off when the section is absent."""

    otlp_endpoint: str  # the collector's OTLP/HTTP traces URL; a URL with no path: /v1/traces
    service_name: str = "inference-proxy"
    sample_ratio: float = 1.0  # of traces the gateway starts; a client's sampled flag is kept
    max_queue: int = 2048  # spans held for export at once; one more is dropped and counted
    export_timeout_s: float = 5.0  # one export, retries included; also the drain at stop


class BackendConfig(_Section, frozen=True):
    url: str
    kind: BackendKind = "openai"
    api_key_env: str | None = None
    max_in_flight: int | None = None
    keepalive_s: float = 4.0
    max_connections: int = 16384
    health_path: str | None = None
    serves: tuple[OptionalApi, ...] | None = None
    ca_file: str | None = None  # PEM CA bundle for an https:// url (default: the system store)
    stream_usage: bool = True  # takes stream_options.include_usage (false: never added for it)


class TargetConfig(_Section, frozen=True):
    backend: str
    model: str | None = None
    weight: float = 1.0


EndpointType = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
Policy = Literal["least_loaded", "weighted", "affinity"]


class ModelConfig(_Section, frozen=True):
    targets: tuple[TargetConfig, ...]
    fallbacks: tuple[str, ...] = ()
    endpoint_type: EndpointType = "llm/v1/chat"
    vision: bool = False
    policy: Policy = "least_loaded"
    limits: Limits | None = None  # rpm, tpm, max_in_flight of the model, whoever calls it


class Config(_Section, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    outlier_detection: OutlierConfig = msgspec.field(default_factory=OutlierConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    tracing: TracingConfig | None = None
    backends: dict[str, BackendConfig] = msgspec.field(default_factory=dict)
    models: dict[str, ModelConfig] = msgspec.field(default_factory=dict)


class ConfigError(Exception):
    """The configuration is wrong; `errors` lists every problem with its dotted key path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def load_config(text: bytes | str) -> Config:
    """Parse YAML text into a checked `Config`, or raise `ConfigError` listing every problem.

    Every kind of error shows in one run: unknown keys, values of the wrong type, and the
    value and cross-reference checks, the last made on whatever did decode (a backend whose
    entry failed to decode still counts as defined, so it is not reported twice).
    """
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader, see below)
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"]) from exc
    except RecursionError:
        raise ConfigError(["invalid YAML: nested too deeply"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of sections"])
    info = msgspec.inspect.type_info(Config)
    errors = _unknown_keys(raw, info, "")
    config, broken = _convert(_known_keys(raw, info), errors)
    errors.extend(check(config, broken))
    if errors:
        raise ConfigError(errors)
    return config


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with a number too long for int() a YAML error at its place."""


def _int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    try:
        value: int = loader.construct_yaml_int(node)
    except ValueError:  # past Python's limit on digits in int()
        raise yaml.constructor.ConstructorError(
            None, None, "a number too long to read", node.start_mark
        ) from None
    return value


_Loader.add_constructor("tag:yaml.org,2002:int", _int)


def _convert(raw: dict[str, Any], errors: list[str]) -> tuple[Config, frozenset[str]]:
    """Type-check each section (and each backend and model) on its own, so every error shows.

    A section that fails keeps its defaults, and a backend or model entry that fails is left
    out; the names of those entries are returned, so cross-checks still know they exist.
    """
    sections: dict[str, Any] = {}
    broken: set[str] = set()
    singles: tuple[tuple[str, type[_Section]], ...] = (
        ("server", ServerConfig),
        ("timeouts", TimeoutsConfig),
        ("auth", AuthConfig),
        ("health", HealthConfig),
        ("outlier_detection", OutlierConfig),
        ("routing", RoutingConfig),
        ("usage", UsageConfig),
        ("tracing", TracingConfig),
    )
    for key, kind in singles:
        if key in raw and not (key == "tracing" and raw[key] is None):  # `tracing:` is off
            section = _convert_one(raw[key], kind, key, errors)
            if section is not None:
                sections[key] = section
    for key, kind in (("backends", BackendConfig), ("models", ModelConfig)):
        entries = raw.get(key) or {}
        if not isinstance(entries, dict):
            errors.append(f"{key}: expected a mapping of names to entries")
            broken.add(key)
            continue
        converted = {
            str(name): _convert_one(entry, kind, f"{key}.{name}", errors)
            for name, entry in entries.items()
        }
        sections[key] = {name: entry for name, entry in converted.items() if entry is not None}
        broken.update(f"{key}.{name}" for name, entry in converted.items() if entry is None)
    return Config(**sections), frozenset(broken)


def _convert_one(value: Any, kind: type[Any], path: str, errors: list[str]) -> Any:
    try:
        return msgspec.convert(value, kind, strict=False)
    except msgspec.ValidationError as exc:
        errors.append(_dotted(str(exc), path))
        return None


def backend_only_config(url: str, host: str | None = None, port: int | None = None) -> Config:
    """The no-file mode: one backend, every model it lists, bodies untouched."""
    config = Config(backends={"default": BackendConfig(url=url)})
    errors = check(config)
    if errors:
        raise ConfigError(errors)
    return with_listen(config, host, port)


def with_listen(config: Config, host: str | None, port: int | None) -> Config:
    """Apply the command line's --host/--port over the file's."""
    server = msgspec.structs.replace(
        config.server,
        host=config.server.host if host is None else host,
        port=config.server.port if port is None else port,
    )
    return msgspec.structs.replace(config, server=server)


def check(config: Config, broken: frozenset[str] = frozenset()) -> list[str]:
    """Every value and cross-reference problem of a decoded config, each with its key path.

    `broken` names entries (`backends.X`, `models.Y`) or whole sections (`backends`) that
    exist in the file but did not decode: references to them are not errors of their own.
    """
    errors: list[str] = []
    s, t = config.server, config.timeouts
    if not 0 <= s.port <= 65535:
        errors.append(f"server.port: {s.port} is not a TCP port (0-65535)")
    if not 0 <= s.workers <= MAX_WORKERS:
        errors.append(f"server.workers: must be 0 (one per core) to {MAX_WORKERS}")
    if not _positive(s.max_body_mb):
        errors.append("server.max_body_mb: must be a positive number")
    if not (math.isfinite(s.drain_s) and s.drain_s >= 0):
        errors.append("server.drain_s: must be a number, 0 or more")
    errors.extend(
        f"server.{name}: must be a positive number"
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_s")
        if not _positive(getattr(s, name))
    )
    if s.max_connections < 1:
        errors.append("server.max_connections: must be at least 1")
    if s.tls is not None:  # that the files load is proxy/tls.py's check, made at start
        errors.extend(
            f"server.tls.{name}: must name a PEM file"
            for name in ("cert_file", "key_file")
            if not getattr(s.tls, name)
        )
    if not (math.isfinite(s.drain_grace_s) and s.drain_grace_s >= 0):
        errors.append("server.drain_grace_s: must be a number, 0 or more")
    if s.cors is not None:
        errors.extend(check_cors(s.cors))
    errors.extend(
        f"timeouts.{name}: must be a positive number"
        for name in ("request_s", "max_request_s", "connect_s", "idle_s")
        if not _positive(getattr(t, name))
    )
    if not (_positive(config.health.interval_s) and _positive(config.health.timeout_s)):
        errors.append("health: interval_s and timeout_s must be positive")
    h, o, r = config.health, config.outlier_detection, config.routing
    errors.extend(
        f"{where}: must be at least 1"
        for where, value in (
            ("health.healthy_threshold", h.healthy_threshold),
            ("health.unhealthy_threshold", h.unhealthy_threshold),
            ("outlier_detection.consecutive_failures", o.consecutive_failures),
            ("routing.prefix_bytes", r.prefix_bytes),
            ("server.max_queue", s.max_queue),
        )
        if value < 1
    )
    if r.prefix_index_size < 0:
        errors.append("routing.prefix_index_size: must be 0 (no index) or more")
    errors.extend(
        f"{where}: must be a positive number"
        for where, value in (
            ("outlier_detection.base_ejection_s", o.base_ejection_s),
            ("outlier_detection.max_ejection_s", o.max_ejection_s),
            ("server.queue_timeout_s", s.queue_timeout_s),
        )
        if not _positive(value)
    )
    if o.max_ejection_s < o.base_ejection_s:
        errors.append("outlier_detection.max_ejection_s: must not be below base_ejection_s")
    if not (math.isfinite(r.load_factor) and r.load_factor > 1):
        errors.append("routing.load_factor: must be a number above 1")
    if not (math.isfinite(r.key_load_factor) and r.key_load_factor >= 1):
        errors.append("routing.key_load_factor: must be a number of 1 or more")
    if not _positive(config.usage.flush_s):
        errors.append("usage.flush_s: must be a positive number")
    if t.head_s is not None and not _positive(t.head_s):
        errors.append("timeouts.head_s: must be a positive number")
    if t.request_s > t.max_request_s:
        errors.append("timeouts.request_s: must not exceed timeouts.max_request_s")
    if config.tracing is not None:
        errors.extend(_check_tracing(config.tracing))
    errors.extend(_check_auth(config.auth))
    errors.extend(_check_limits(config))
    for name, backend in config.backends.items():
        errors.extend(_check_backend(f"backends.{name}", backend))
    if not config.backends and not _mentions(broken, "backends"):
        errors.append("backends: no backend configured")
    for name, model in config.models.items():
        errors.extend(_check_model(config, name, model, broken))
    errors.extend(_fallback_cycles(config))
    return errors


def _fallback_cycles(config: Config) -> list[str]:
    """A model whose fallbacks lead back to it (a -> b -> a), named once per cycle."""
    errors: list[str] = []
    reported: set[frozenset[str]] = set()
    for start in config.models:
        path = [start]
        stack = [(start, iter(config.models[start].fallbacks))]
        while stack:
            _, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                continue
            if child == start and len(path) > 1:
                cycle = frozenset(path)
                if cycle not in reported:
                    reported.add(cycle)
                    errors.append(
                        f"models.{start}.fallbacks: a cycle ({' -> '.join([*path, start])}); "
                        "a model may fall back to another only once"
                    )
            elif child in config.models and child not in path:
                path.append(child)
                stack.append((child, iter(config.models[child].fallbacks)))
    return errors


def _mentions(broken: frozenset[str], section: str, name: str | None = None) -> bool:
    """Whether `section` (or, with `name`, its entry `name`) exists but did not decode."""
    if section in broken:
        return True
    if name is None:
        return any(b.startswith(section + ".") for b in broken)
    return f"{section}.{name}" in broken


def serves(backend: BackendConfig, api: OptionalApi) -> bool:
    """Whether a backend serves one of the optional routes (by its kind, or as configured)."""
    served = backend.serves if backend.serves is not None else _SERVES_BY_KIND[backend.kind]
    return api in served


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def health_path(backend: BackendConfig) -> str:
    """Where a backend of this kind says it is alive."""
    if backend.health_path is not None:
        return backend.health_path
    return {"ollama": "/", "openai": "/v1/models"}.get(backend.kind, "/health")


def _check_model(
    config: Config, name: str, model: ModelConfig, broken: frozenset[str]
) -> list[str]:
    errors: list[str] = []
    path = f"models.{name}"
    if not model.targets:
        errors.append(f"{path}.targets: at least one target is needed")
    for i, target in enumerate(model.targets):
        if target.backend not in config.backends and not _mentions(
            broken, "backends", target.backend
        ):
            errors.append(f"{path}.targets[{i}].backend: unknown backend '{target.backend}'")
        if not _positive(target.weight):
            errors.append(f"{path}.targets[{i}].weight: must be a positive number")
    for i, fallback in enumerate(model.fallbacks):
        if fallback not in config.models and not _mentions(broken, "models", fallback):
            errors.append(f"{path}.fallbacks[{i}]: unknown model '{fallback}'")
        elif fallback == name:
            errors.append(f"{path}.fallbacks[{i}]: a model cannot fall back to itself")
    return errors


def store_kind(store: str) -> Literal["sqlite", "redis"] | None:
    """What `auth.store` names: a redis:// URL, a SQLite file path, or (None) neither."""
    if store.startswith(("redis://", "rediss://")):
        return "redis"
    if not store or "://" in store or "\x00" in store:
        return None
    return "sqlite"


def _check_auth(auth: AuthConfig) -> list[str]:
    errors: list[str] = []
    if auth.store is not None:
        kind = store_kind(auth.store)
        if kind is None:
            errors.append(
                f"auth.store: '{auth.store[:200]}' is neither a SQLite file path nor a "
                "redis://host:port/db URL"
            )
        elif kind == "redis":
            errors.extend(f"auth.store: {problem}" for problem in _redis_url_problems(auth.store))
    if auth.admin_key_env is not None and auth.store is None:
        errors.append("auth.admin_key_env: the admin API manages auth.store's keys; set auth.store")
    if auth.hash_key_env is not None and auth.store is None:
        errors.append("auth.hash_key_env: only managed keys (auth.store) are hashed with it")
    errors.extend(
        f"auth.{name}: must name an environment variable"
        for name in ("admin_key_env", "hash_key_env")
        if getattr(auth, name) == ""
    )
    errors.extend(
        f"auth.open_paths: {path} is the admin API's; it always needs the admin key"
        for path in auth.open_paths
        if path == "/admin" or path.startswith("/admin/")
    )
    return errors


def _redis_url_problems(url: str) -> list[str]:
    """What is wrong with a redis:// URL: host, port and database number (an integer)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (reading it checks it: a bad port raises ValueError)
    except ValueError as exc:
        return [f"'{url[:200]}' is not a valid URL ({exc})"]
    problems: list[str] = []
    if not parts.hostname:
        problems.append("a redis:// URL needs a host (redis://127.0.0.1:6379/0)")
    db = parts.path.removeprefix("/")
    if db and not (db.isascii() and db.isdigit()):
        problems.append(f"the database after the host must be a number, not '{db[:50]}'")
    if parts.query or parts.fragment:
        problems.append("a redis:// URL takes no query or fragment")
    return problems


def _check_limits(config: Config) -> list[str]:
    """Rate limits: whole numbers of at least 1; Redis's timeout short but positive."""
    a = config.auth
    errors: list[str] = []
    if not (_positive(a.redis_timeout_s) and a.redis_timeout_s <= 5):
        errors.append("auth.redis_timeout_s: must be a positive number of seconds, at most 5")
    if a.hosts < 1:
        errors.append("auth.hosts: must be at least 1")
    places = [("auth.default_limits", a.default_limits)]
    places += [(f"models.{name}.limits", m.limits) for name, m in config.models.items()]
    for where, limits in places:
        if limits is None:
            continue
        errors.extend(
            f"{where}.{field}: must be at least 1 (leave it out for no limit)"
            for field in ("rpm", "tpm", "max_in_flight")
            if (value := getattr(limits, field)) is not None and value < 1
        )
    return errors


def _check_tracing(tracing: TracingConfig) -> list[str]:
    errors: list[str] = []
    try:
        parts = urlsplit(tracing.otlp_endpoint)
        parts.port  # noqa: B018  (reading it checks it: a bad port raises ValueError)
    except ValueError as exc:
        errors.append(f"tracing.otlp_endpoint: not a valid URL ({exc})")
    else:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            errors.append(
                f"tracing.otlp_endpoint: '{tracing.otlp_endpoint[:200]}' is not an http(s) URL "
                "with a host (OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces)"
            )
    if not tracing.service_name:
        errors.append("tracing.service_name: must not be empty")
    if not (math.isfinite(tracing.sample_ratio) and 0 <= tracing.sample_ratio <= 1):
        errors.append("tracing.sample_ratio: must be a number from 0 to 1")
    if tracing.max_queue < 1:
        errors.append("tracing.max_queue: must be at least 1")
    if not _positive(tracing.export_timeout_s):
        errors.append("tracing.export_timeout_s: must be a positive number")
    return errors


def _check_backend(path: str, backend: BackendConfig) -> list[str]:
    errors: list[str] = []
    try:
        parts = urlsplit(backend.url)
        parts.port  # noqa: B018  (reading it checks it: a bad port raises ValueError)
    except ValueError as exc:
        errors.append(f"{path}.url: '{backend.url[:200]}' is not a valid URL ({exc})")
    else:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            errors.append(f"{path}.url: '{backend.url[:200]}' is not an http(s) URL with a host")
        elif parts.query or parts.fragment:
            errors.append(f"{path}.url: must not carry a query or fragment")
        if backend.ca_file is not None and parts.scheme == "http":
            errors.append(f"{path}.ca_file: only an https:// url is verified with a CA file")
    if backend.ca_file == "":
        errors.append(f"{path}.ca_file: must name a PEM file")
    if backend.max_in_flight is not None and backend.max_in_flight < 1:
        errors.append(f"{path}.max_in_flight: must be at least 1")
    if not _positive(backend.keepalive_s):
        errors.append(f"{path}.keepalive_s: must be positive")
    if backend.health_path is not None and not backend.health_path.startswith("/"):
        errors.append(f"{path}.health_path: must start with '/'")
    if backend.max_connections < 1:
        errors.append(f"{path}.max_connections: must be at least 1")
    return errors


def _unknown_keys(value: Any, info: msgspec.inspect.Type, path: str) -> list[str]:
    """Walk the raw YAML against the schema and name every key the schema does not know."""
    if isinstance(info, msgspec.inspect.StructType) and isinstance(value, Mapping):
        fields = {f.encode_name: f.type for f in info.fields}
        errors: list[str] = []
        for key, sub in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in fields:
                errors.append(f"{where}: unknown key")
            else:
                errors.extend(_unknown_keys(sub, fields[key], where))
        return errors
    if isinstance(info, msgspec.inspect.DictType) and isinstance(value, Mapping):
        return [
            e for k, v in value.items() for e in _unknown_keys(v, info.value_type, f"{path}.{k}")
        ]
    if isinstance(info, msgspec.inspect.VarTupleType | msgspec.inspect.ListType) and isinstance(
        value, list
    ):
        return [
            e for i, v in enumerate(value) for e in _unknown_keys(v, info.item_type, f"{path}[{i}]")
        ]
    if isinstance(info, msgspec.inspect.UnionType):
        return [e for t in info.types for e in _unknown_keys(value, t, path)]
    return []


def _known_keys(value: Any, info: msgspec.inspect.Type) -> Any:
    """The raw YAML without the keys `_unknown_keys` reports, so the rest can still decode."""
    if isinstance(info, msgspec.inspect.StructType) and isinstance(value, Mapping):
        fields = {f.encode_name: f.type for f in info.fields}
        return {k: _known_keys(v, fields[k]) for k, v in value.items() if k in fields}
    if isinstance(info, msgspec.inspect.DictType) and isinstance(value, Mapping):
        return {k: _known_keys(v, info.value_type) for k, v in value.items()}
    if isinstance(info, msgspec.inspect.VarTupleType | msgspec.inspect.ListType) and isinstance(
        value, list
    ):
        return [_known_keys(v, info.item_type) for v in value]
    if isinstance(info, msgspec.inspect.UnionType):
        structs = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
        if len(structs) == 1:
            return _known_keys(value, structs[0])
    return value


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _dotted(message: str, base: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.port`" as "server.port: expected ..."."""
    m = _AT.match(message)
    if m is None:
        return f"{base}: {message}"
    path = base + (m.group("path") or "")
    msg = m.group("msg")
    return f"{path}: {msg[:1].lower()}{msg[1:]}"
