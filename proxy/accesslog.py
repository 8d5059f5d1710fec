"""One JSON line per request: what operators grep when something went wrong.

Lines are written to a buffered binary stream and flushed a few times a second (and at
shutdown), not once per request: a flush per line would cost a system call per request.
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
            self.stream.write(access_record(ex, method, path, finished, self._now()))

    def flush(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(OSError, ValueError):
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
