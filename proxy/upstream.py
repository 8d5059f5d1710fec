"""The upstream leg: one keep-alive pool per backend, and sending a request on it.

Foreign exceptions (aiohttp's, the OS's) are mapped to `ProxyError`s here, once.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import weakref
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import BackendConfig, Config
from proxy.errors import BackendTimeout, BackendUnreachable


class _Attempt:
    """Whether the current send went out on a connection taken from the pool."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "proxy_upstream_attempt", default=None
)


class _ReuseAwareConnector(aiohttp.TCPConnector):
    """A TCP connector that tells the sender whether its connection had carried requests before."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109  (aiohttp's signature)
    ) -> Any:
        conn = await super().connect(req, traces, timeout)
        proto = conn.protocol
        if proto is not None:
            attempt = _ATTEMPT.get()
            if attempt is not None:
                attempt.reused = proto in self._seen
            self._seen.add(proto)
        return conn


class Backend:
    """A configured backend: its base URL, credentials and keep-alive pool."""

    def __init__(self, name: str, config: BackendConfig, api_key: str | None, connect_s: float):
        self.name = name
        self.config = config
        self.base = config.url.rstrip("/")
        self.api_key = api_key
        self.in_flight = 0
        connector = _ReuseAwareConnector(
            limit=config.max_connections,
            keepalive_timeout=config.keepalive_s,
            enable_cleanup_closed=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            # A stream may run for as long as its deadline allows: no total timer here.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    def url(self, path: str, query: str) -> URL:
        """The upstream URL for a client path (already mapped) and raw query string."""
        return URL(f"{self.base}{path}?{query}" if query else f"{self.base}{path}", encoded=True)

    async def close(self) -> None:
        await self.session.close()


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


_STALE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


async def send(
    backend: Backend,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: bytes | None,
) -> aiohttp.ClientResponse:
    """Send the request and wait for the response head; the caller owns the response.

    A pooled connection that fails before any byte of the answer is the stale keep-alive
    race (the backend closed the idle socket as the request went out): that one case is
    retried, once, on a new connection. A new connection that fails is never retried.
    """
    for retry in (True, False):
        attempt = _Attempt()
        token = _ATTEMPT.set(attempt)
        try:
            return await backend.session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        except aiohttp.ClientConnectorError as exc:
            raise BackendUnreachable(
                f"cannot connect to backend '{backend.name}': {exc.strerror or exc}"
            ) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            stale = attempt.reused and (
                isinstance(exc, aiohttp.ServerDisconnectedError) or exc.errno in _STALE_ERRNOS
            )
            if retry and stale:
                continue
            raise BackendUnreachable(
                f"backend '{backend.name}' closed the connection before answering"
            ) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise BackendTimeout(f"backend '{backend.name}' did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnreachable(f"backend '{backend.name}' failed: {exc}") from exc
        finally:
            _ATTEMPT.reset(token)
    raise AssertionError("unreachable")  # the loop either returns or raises


async def read_chunk(response: aiohttp.ClientResponse, backend: str) -> bytes:
    """The next piece of the body as it arrived (b"" at its end), errors mapped."""
    try:
        return await response.content.readany()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise BackendUnreachable(f"backend '{backend}' cut the response short") from exc
    except asyncio.IncompleteReadError as exc:
        raise BackendUnreachable(f"backend '{backend}' cut the response short") from exc
