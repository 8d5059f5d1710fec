"""A backend's answer as the connection parses it: the head, then the body as it arrives.

The body is handed over in the pieces it arrived in (de-chunked), with reading paused while
the client is slower than the backend. The response drives its connection only through the
small `Source` protocol, so this module imports nothing of the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from proxy.errors import BackendUnreachable

# Pause reading from the backend while this many body bytes wait for the client.
HIGH_WATER = 256 * 1024


class Source(Protocol):
    """What a response needs from the connection it arrives on."""

    loop: asyncio.AbstractEventLoop

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def finished(self, response: Response) -> None: ...
    def abort(self) -> None: ...


class Response:
    """A response head and its body as it arrives; read with `read_chunk()`."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_done",
        "_error",
        "_sink",
        "_source",
        "_waiter",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, source: Source) -> None:
        self._source = source
        self.status = 0  # set when the final head is in (interim 1xx heads never set it)
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], None] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call; b"" once the body is complete."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = self._source.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered > HIGH_WATER:
            self._source.resume()
        self._buffered = 0
        return data

    def divert(self, sink: Callable[[bytes], None]) -> bytes:
        """From now on hand the body to `sink` the moment it arrives: what each read brought,
        in one piece, in the protocol callback (no task switch per piece). Returns what was
        buffered before."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._source.resume()
        self._sink = sink
        return data

    def undivert(self) -> None:
        """Stop handing body pieces to the sink (and drop the reference cycle to it)."""
        self._sink = None

    async def wait(self) -> None:
        """Until the body ends or fails (which raises) or `wake()` is called (by whoever
        keeps the reader's timeout: this sets no timer)."""
        if self._error is not None:
            raise self._error
        if self._done:
            return
        self._waiter = waiter = self._source.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    @property
    def done(self) -> bool:
        """Whether the body has been read to its end. A failed body is never done: its
        reader goes on to `wait()` or `read_chunk()`, which raise the failure."""
        return self._done and self._error is None

    def wake(self) -> None:
        """Return control to the task waiting in `wait()`."""
        self._wake()

    def pause_reading(self) -> None:
        """Stop reading from the backend (the client is slower than it)."""
        self._source.pause()

    def resume_reading(self) -> None:
        self._source.resume()

    def has_body_bytes(self) -> bool:
        """Whether body bytes are waiting to be read."""
        return bool(self._chunks)

    def whole_body(self) -> bytes | None:
        """The entire body if it has already arrived in full, else None (nothing consumed)."""
        if not self._done or self._error is not None:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read(self, limit: int = 16 * 1024 * 1024) -> bytes:
        """The whole body (for small control responses such as health checks)."""
        parts = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > limit:
                raise BackendUnreachable("backend sent a larger answer than expected")
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if it can be reused."""
        self._source.finished(self)

    def close(self) -> None:
        """Abandon the response: the connection is closed, so the backend stops at once."""
        self._source.abort()

    # Called by the connection's protocol callbacks.
    def feed(self, data: bytes) -> None:
        """A piece of the body arrived (a diverted body's waits for `flush`)."""
        self._chunks.append(data)
        if self._sink is not None:
            return
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._source.pause()
        self._wake()

    def flush(self) -> None:
        """Hand the body pieces of the read just parsed to the sink, as one: a read that
        brought many chunks (events sent back to back) costs one write to the client."""
        chunks = self._chunks
        if self._sink is not None and chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._sink(data)

    def finish(self, error: BaseException | None = None) -> None:
        """The body ended, or failed with `error` (ignored once it has ended)."""
        if error is not None and not self._done:
            self._error = error
        self._done = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
