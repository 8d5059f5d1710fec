"""One JSON line per request: what operators grep when something went wrong."""

from __future__ import annotations

import logging
import time

import orjson

from proxy.exchange import Exchange

logger = logging.getLogger("proxy.access")


def access_record(ex: Exchange, method: str, path: str, finished: float) -> bytes:
    """The access-log line of a finished exchange (never a key: only the key's position)."""
    ttfb = None if ex.first_byte_at is None else round((ex.first_byte_at - ex.started) * 1000, 3)
    return orjson.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "request_id": ex.request_id,
            "method": method,
            "path": path,
            "route": ex.route,
            "model": ex.model_label,
            "backend": ex.backend,
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
        }
    )


def log_access(ex: Exchange, method: str, path: str, finished: float) -> None:
    """Write the access-log line, if anyone listens."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(access_record(ex, method, path, finished).decode())
