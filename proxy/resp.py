"""A pipelined Redis client for the limiter's few commands: one connection, RESP2. [I/O]

Why not redis-py here: every check of every request goes to Redis, and redis-py's asyncio
client spends about as much CPU on one command as the gateway spends on the rest of a request
(a connection checked out of a pool, a retry wrapper, an observability hook, a disconnect on
every timeout). This client writes each command on one shared connection and matches replies
to callers in order (Redis answers a connection's commands in the order it got them), so a
command is one write and one read callback; under load many checks share a read.

A caller that gives up (its timeout) leaves its place in the queue: the reply, when it comes,
is dropped, and the connection stays usable, so one slow reply does not fail every other call
on the connection. A lost connection fails every call waiting on it; the next call opens a new
one. The URL takes `redis://[[user]:password@]host[:port][/db]` and `rediss://` for TLS.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from typing import cast
from urllib.parse import unquote, urlsplit

Reply = bytes | int | list["Reply"] | None
Arg = str | bytes | int | float

MAX_WAITING = 100_000  # replies owed on one connection before it is given up as stalled


class RespError(Exception):
    """An error reply from Redis (`-ERR ...`, `-NOSCRIPT ...`)."""


class RespConnectionError(ConnectionError):
    """The connection to Redis closed (or never opened)."""


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = repr(arg).encode()  # repr: a float's exact digits
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def parse(buf: bytes | bytearray, pos: int) -> tuple[Reply | RespError, int] | None:
    """One reply from `buf` at `pos` and where the next begins; None when it is not all there."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RespError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return None
        return bytes(buf[after : after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items: list[Reply] = []
        for _ in range(count):
            got = parse(buf, after)
            if got is None:
                return None
            item, after = got
            if isinstance(item, RespError):
                raise item  # an error inside an array: no script of ours returns one
            items.append(item)
        return items, after
    raise RespConnectionError(f"not a RESP reply: {bytes(buf[pos : pos + 20])!r}")


class _Connection(asyncio.Protocol):
    """One connection: the replies owed, in order, and the bytes read so far."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Reply | RespError]] = deque()
        self.buf = bytearray()
        self.closed = False
        self.gone = asyncio.get_running_loop().create_future()  # set once the socket is closed
        self.out: list[bytes] = []  # commands of this loop iteration, written together

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        try:
            while self.waiting:
                got = parse(self.buf, pos)
                if got is None:
                    break
                reply, pos = got
                future = self.waiting.popleft()
                if not future.done():  # else its caller gave up: the reply is dropped
                    future.set_result(reply)
        except (RespError, RespConnectionError, ValueError) as exc:
            self._fail(RespConnectionError(f"Redis sent what cannot be read: {exc}"))
            return
        del self.buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RespConnectionError("the connection to Redis closed"))
        if not self.gone.done():
            self.gone.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)

    def send(self, data: bytes) -> asyncio.Future[Reply | RespError]:
        """Queue a command; the commands of one loop iteration go out in one write (a write
        is a system call, and costs more than a check)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply | RespError] = loop.create_future()
        self.waiting.append(future)
        if not self.out:
            loop.call_soon(self._flush)
        self.out.append(data)
        if len(self.waiting) > MAX_WAITING:
            self._fail(RespConnectionError("Redis owes too many replies: given up as stalled"))
        return future

    def _flush(self) -> None:
        data, self.out = b"".join(self.out), []
        if self.transport is not None and not self.closed:
            self.transport.write(data)


class Resp:
    """A client on one connection, opened on first use and again after it is lost."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "rediss" else None
        )
        self.hello: list[list[Arg]] = []  # sent first on every new connection
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            secret = unquote(parts.password)
            self.hello.append(["AUTH", user, secret] if user else ["AUTH", secret])
        db = parts.path.removeprefix("/")
        if db and db != "0":
            self.hello.append(["SELECT", db])
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._lock:  # one connect for every caller waiting on it
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
            try:
                replies = [conn.send(pack(command)) for command in self.hello]
                for reply in replies:
                    if isinstance(await reply, RespError):
                        raise RespConnectionError("Redis refused the URL's AUTH or SELECT")
            except BaseException:  # refused, or the caller gave up: no half-made connection
                conn._fail(RespConnectionError("closed before it was ready"))
                raise
            self._conn = conn
            return conn

    async def call(self, *args: Arg) -> Reply:
        """Send one command and wait for its reply (the caller bounds the wait)."""
        conn = await self._connection()
        reply = await conn.send(pack(args))
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def evalsha(
        self, sha: str, script: str, keys: Sequence[str], args: Sequence[Arg]
    ) -> Reply:
        """Run a script by its SHA1; one that Redis does not hold (NOSCRIPT: it restarted, or
        SCRIPT FLUSH) is sent whole once, which loads it again."""
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", script, len(keys), *keys, *args)

    async def close(self) -> None:
        """Close the connection and wait until its socket is (the loop may close next)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn._fail(RespConnectionError("closed"))
            if conn.transport is not None:
                await asyncio.wait_for(asyncio.shield(conn.gone), 1.0)
