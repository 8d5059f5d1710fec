"""A configured backend and sending a request to it on its keep-alive pool."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from proxy.config import BackendConfig, Config
from proxy.errors import BackendUnreachable
from proxy.tls import client_context
from proxy.upstream.connection import ConnectionClosed
from proxy.upstream.pool import Pool
from proxy.upstream.response import Response


class Backend:
    """A configured backend: its base URL, credentials and keep-alive pool (with its one TLS
    context for an https URL; a `ca_file` that does not load is a ConfigError here)."""

    def __init__(self, name: str, config: BackendConfig, api_key: str | None, connect_s: float):
        self.name = name
        self.config = config
        self.base_path = _base_path(config.url)
        self.api_key = api_key
        self.in_flight = 0
        tls = None
        if urlsplit(config.url).scheme == "https":
            tls = client_context(config.ca_file, f"backends.{name}.ca_file")
        self.pool = Pool(config.url, config.keepalive_s, connect_s, config.max_connections, tls)
        # Header lines every request to this backend carries.
        fixed = [b"Host: " + self.pool.host_header + b"\r\n"]
        if api_key:
            fixed.append(b"Authorization: Bearer " + api_key.encode("latin-1") + b"\r\n")
        self.fixed_headers = b"".join(fixed)

    def target(self, path: str, query: str = "") -> bytes:
        """The request target for a client path (already mapped) and raw query string."""
        full = self.base_path + path
        return (full + "?" + query if query else full).encode("latin-1")

    def close(self) -> None:
        self.pool.close()


def _base_path(url: str) -> str:
    """The path part of a backend URL, without a trailing slash ('' for none)."""
    after_scheme = url.split("://", 1)[-1]
    slash = after_scheme.find("/")
    return after_scheme[slash:].rstrip("/") if slash >= 0 else ""


def open_backends(config: Config, environ: Mapping[str, str]) -> dict[str, Backend]:
    """One `Backend` per configured backend, with its API key read from the environment."""
    return {
        name: Backend(
            name,
            b,
            environ.get(b.api_key_env) if b.api_key_env else None,
            config.timeouts.connect_s,
        )
        for name, b in config.backends.items()
    }


async def send(
    backend: Backend, method: str, target: bytes, headers: bytes, body: bytes | None
) -> Response:
    """Send the request and wait for the response head; the caller owns the response.

    `headers` are serialized header lines (each ending in CRLF) other than Host, the
    backend's key and Content-Length, which are added here. A pooled connection that
    closes before any byte of the answer is the stale keep-alive race (the backend closed
    the idle socket as the request went out): that one case is retried, once, on a new
    connection. A new connection that fails is never retried.
    """
    head = [
        method.encode("latin-1"),
        b" ",
        target,
        b" HTTP/1.1\r\n",
        backend.fixed_headers,
        headers,
    ]
    if body is not None:
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        head.append(body)
    else:
        head.append(b"\r\n")
    for retry in (True, False):
        conn = await backend.pool.acquire(fresh=not retry)
        try:
            return await conn.send(head, head_only=method == "HEAD")
        except ConnectionClosed as exc:
            if retry and exc.stale:
                continue
            raise BackendUnreachable(
                f"backend '{backend.name}' closed the connection before answering"
            ) from exc
        except BaseException:
            conn.abort()  # cancelled or failed while waiting: the backend must see the close
            raise
    raise AssertionError("unreachable")  # the loop either returns or raises


async def fetch(backend: Backend, path: str, limit: int = 16 * 1024 * 1024) -> tuple[int, bytes]:
    """GET a small control resource (health, model list): status and whole body."""
    response = await send(backend, "GET", backend.target(path), b"Accept: */*\r\n", None)
    try:
        body = await response.read(limit)
    except BaseException:
        response.close()
        raise
    response.release()
    return response.status, body
