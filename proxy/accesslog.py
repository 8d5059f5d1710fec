"""One JSON line per request: what operators grep when something went wrong.

Lines are kept and written once `ATOMIC_BYTES` (PIPE_BUF) of them are ready, a few times a
second when fewer are, and at shutdown; not once per request, which would cost a system call
per request. Each write holds whole lines and at most `ATOMIC_BYTES` (a longer line alone), so
the lines of several workers that share one standard output (a pipe, or journald's socket)
never cut into one another. Keeping no more than that is cheaper too: a quarter of a megabyte
of lines held between writes made each line cost three times as much (fresh memory per line).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import BinaryIO

import orjson

from proxy.exchange import Exchange

FLUSH_EVERY_S = 0.2
ATOMIC_BYTES = 4096  # PIPE_BUF: a write this size or smaller to a pipe is never interleaved


def access_record(ex: Exchange, method: str, path: str, finished: float, now: str) -> bytes:
    """The access-log line of a finished exchange (never a key: only the key's position)."""
    ttfb = None if ex.first_byte_at is None else round((ex.first_byte_at - ex.started) * 1000, 3)
    return orjson.dumps(
        {
            "time": now,
            "request_id": ex.request_id,
            "method": method,
            "path": path,
            "route": ex.route,
            "model": ex.model_label,
            "backend": ex.backend,
            "tries": ex.tries,
            "status": ex.status,
            "duration_ms": round((finished - ex.started) * 1000, 3),
            "ttfb_ms": ttfb,
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            "events": ex.events,
            "prompt_tokens": ex.usage.prompt if ex.usage else None,
            "completion_tokens": ex.usage.completion if ex.usage else None,
            "key": ex.principal.key_id if ex.principal else None,
            "error": ex.error_type,
            "client_gone": ex.client_gone,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


class AccessLog:
    """Where access-log lines go; `None` turns the log off."""

    def __init__(self, stream: BinaryIO | None) -> None:
        self.stream = stream
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self._second = -1
        self._stamp = ""

    def _now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return self._stamp

    def write(self, ex: Exchange, method: str, path: str, finished: float) -> None:
        if self.stream is not None:
            line = access_record(ex, method, path, finished, self._now())
            if self.pending_bytes + len(line) > ATOMIC_BYTES:
                self.flush()  # what is kept fills one write: it goes now
            self.pending.append(line)
            self.pending_bytes += len(line)

    def flush(self) -> None:
        """Write the kept lines in one write (ATOMIC_BYTES at most, or one longer line)."""
        if self.stream is None or not self.pending:
            return
        chunk = b"".join(self.pending)
        self.pending, self.pending_bytes = [], 0
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(chunk)
            self.stream.flush()

    async def flushing(self) -> AsyncIterator[None]:
        """cleanup_ctx-style: flush a few times a second while the app runs, and at its end."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(FLUSH_EVERY_S)
                self.flush()

        task = asyncio.create_task(loop(), name="access-log-flush")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.flush()
