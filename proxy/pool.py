"""Keep-alive connections to one backend: idle ones reused newest first, a cap on open ones."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from urllib.parse import urlsplit

from proxy.errors import BackendUnreachable
from proxy.h1 import Connection


class Pool:
    """Idle keep-alive connections to one backend, newest first, expiring after `keepalive_s`."""

    def __init__(self, url: str, keepalive_s: float, connect_s: float, limit: int) -> None:
        parts = urlsplit(url)
        self.loop = asyncio.get_running_loop()
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        default_port = (parts.scheme == "https" and self.port == 443) or self.port == 80
        self.host_header = parts.netloc.encode() if not default_port else self.host.encode()
        self.keepalive_s = keepalive_s
        self.connect_s = connect_s
        self.limit = limit
        self.idle: collections.deque[Connection] = collections.deque()
        self.open: set[Connection] = set()
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closing = False

    async def acquire(self) -> Connection:
        """A pooled connection still within its keep-alive, else a new one (within `limit`)."""
        while True:
            now = time.monotonic()
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed and now - conn.idle_since < self.keepalive_s:
                    return conn
                conn.abort()
            if len(self.open) < self.limit:
                return await self.connect()
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter  # a connection was put back or closed
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)

    async def connect(self) -> Connection:
        """A new connection, within `connect_s`."""
        try:
            async with asyncio.timeout(self.connect_s):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError as exc:
            raise BackendUnreachable(
                f"connecting to {self.host}:{self.port} took over {self.connect_s} s"
            ) from exc
        except OSError as exc:
            raise BackendUnreachable(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self.open.add(conn)
        return conn

    def put(self, conn: Connection) -> None:
        if self.closing:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        self._wake_one()

    def forget(self, conn: Connection) -> None:
        if conn in self.open:
            self.open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def sweep(self) -> None:
        """Close idle connections past their keep-alive."""
        now = time.monotonic()
        keep = [c for c in self.idle if not c.closed and now - c.idle_since < self.keepalive_s]
        for conn in self.idle:
            if conn not in keep:
                conn.abort()
        self.idle = collections.deque(keep)

    def close(self) -> None:
        """Close every connection, idle or busy."""
        self.closing = True
        for conn in list(self.open):
            conn.abort()
        self.idle.clear()
