"""Keep-alive connections to one backend: idle ones reused newest first, a cap on open ones."""

from __future__ import annotations

import asyncio
import collections
import errno
import ssl
import time
from urllib.parse import urlsplit

from proxy.errors import BackendUnreachable, Overloaded
from proxy.upstream.connection import Connection


class Pool:
    """Idle keep-alive connections to one backend, newest first, expiring after `keepalive_s`.

    At most `limit` connections are open or being opened. A request that finds none free
    waits in line: a connection put back goes straight to the first in line, and a closed
    one lets the first in line open a new one.
    """

    def __init__(
        self,
        url: str,
        keepalive_s: float,
        connect_s: float,
        limit: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: the context for an https `url` (made once per backend, see proxy/tls.py)."""
        parts = urlsplit(url)
        self.loop = asyncio.get_running_loop()
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        if (parts.scheme == "https") != (tls is not None):
            raise ValueError("an https url needs a TLS context, and only an https url takes one")
        self.ssl = tls
        default_port = (parts.scheme == "https" and self.port == 443) or self.port == 80
        self.host_header = parts.netloc.encode() if not default_port else self.host.encode()
        self.keepalive_s = keepalive_s
        self.connect_s = connect_s
        self.limit = limit
        self.idle: collections.deque[tuple[Connection, float]] = collections.deque()
        self.open: set[Connection] = set()
        self.connecting = 0
        # Each waiter gets a connection handed over, or None: a slot is free, try again.
        self.waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self.closing = False

    async def acquire(self, *, fresh: bool = False) -> Connection:
        """A pooled connection still within its keep-alive (unless `fresh`), else a new one
        within `limit`, else the next one freed."""
        while True:
            if self.closing:
                raise BackendUnreachable("the gateway is closing its backend connections")
            if not fresh and (conn := self._pop_idle()) is not None:
                return conn
            if len(self.open) + self.connecting < self.limit:
                return await self._connect()
            if fresh and self.idle:
                self.idle.popleft()[0].abort()  # make room: the oldest idle one goes
                continue
            handed = await self._wait()
            if handed is not None:
                if not fresh:
                    return handed
                handed.abort()  # its slot, not the connection, is what a retry wants

    def _pop_idle(self) -> Connection | None:
        now = time.monotonic()
        while self.idle:
            conn, since = self.idle.pop()
            if not conn.closed and now - since < self.keepalive_s:
                return conn
            conn.abort()
        return None

    async def _wait(self) -> Connection | None:
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection (or a slot) just as it was cancelled: pass it on.
                handed = waiter.result()
                if handed is not None:
                    self.put(handed)
                else:
                    self._wake_one(None)
            raise
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    async def _connect(self) -> Connection:
        """A new connection, within `connect_s`; it holds a slot while it is being opened."""
        self.connecting += 1
        try:
            conn = await self._open()
        except BaseException:
            self.connecting -= 1
            self._wake_one(None)  # the slot is free again
            raise
        self.connecting -= 1
        if conn.closed:  # the backend wrote or closed before any request
            self._wake_one(None)
            raise BackendUnreachable(f"backend {self.host}:{self.port} closed the connection")
        self.open.add(conn)
        if self.closing:
            conn.abort()
            raise BackendUnreachable("the gateway is closing its backend connections")
        return conn

    async def _open(self) -> Connection:
        """Connect, and for https finish the TLS handshake, all within `connect_s`."""
        try:
            async with asyncio.timeout(self.connect_s):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self, self.loop),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError as exc:
            raise BackendUnreachable(
                f"connecting to {self.host}:{self.port} took over {self.connect_s} s"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise BackendUnreachable(
                f"TLS verification of backend {self.host}:{self.port} failed: "
                f"{exc.verify_message} (the gateway trusts the system's CAs, or only the "
                "backend's ca_file when it is set, and checks the host name)"
            ) from exc
        except ssl.SSLError as exc:
            raise BackendUnreachable(
                f"TLS handshake with backend {self.host}:{self.port} failed: "
                f"{exc.reason or exc} (does it serve https on that port?)"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # the gateway's own limit: not the
                raise Overloaded(  # backend's fault, so nothing counts against its health
                    "the gateway has no file descriptor left for a backend connection (its "
                    "open-files limit); raise the limit (LimitNOFILE) or lower "
                    "server.max_connections"
                ) from exc
            raise BackendUnreachable(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        return conn

    # The connection's Owner
    def put(self, conn: Connection) -> None:
        """A connection free for another request: to the first waiter, else idle."""
        if self.closing or conn.closed:
            conn.abort()
            return
        if not self._wake_one(conn):
            self.idle.append((conn, time.monotonic()))

    def forget(self, conn: Connection) -> None:
        if conn in self.open:
            self.open.discard(conn)
            self._wake_one(None)

    def _wake_one(self, handed: Connection | None) -> bool:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(handed)
                return True
        return False

    def sweep(self) -> None:
        """Close idle connections past their keep-alive."""
        now = time.monotonic()
        keep: collections.deque[tuple[Connection, float]] = collections.deque()
        for conn, since in self.idle:
            if not conn.closed and now - since < self.keepalive_s:
                keep.append((conn, since))
            else:
                conn.abort()
        self.idle = keep

    def close(self) -> None:
        """Close every connection, idle or busy; every waiter and reader is woken with
        BackendUnreachable."""
        self.closing = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    BackendUnreachable("the gateway is closing its backend connections")
                )
        for conn in list(self.open):
            conn.abort()
        self.idle.clear()
