"""The access-log line: every field operators grep for, and never a key."""

from __future__ import annotations

import io
import json
import re

from multidict import CIMultiDict

from proxy.accesslog import ATOMIC_BYTES, AccessLog, access_record
from proxy.auth import KeySet, authenticate
from proxy.exchange import Exchange
from proxy.usage import Usage

NOW = "2026-11-22T03:04:12+0000"

SECRET = "sk-live-0123456789abcdef"


def finished_stream() -> Exchange:
    """A streamed chat completion that went well, authenticated with SECRET."""
    ex = Exchange(
        request_id="req-42", route="/v1/chat/completions", started=100.0, dialect="openai"
    )
    headers = CIMultiDict({"Authorization": f"Bearer {SECRET}", "X-Request-ID": "req-42"})
    ex.principal = authenticate(headers, KeySet([SECRET, "sk-other"]))
    ex.model_label = "qwen"
    ex.backend = "gpu-a"
    ex.tries = ["gpu-b:503", "gpu-a"]
    ex.status = 200
    ex.sse = True
    ex.first_byte_at = 100.25
    ex.bytes_in = 321
    ex.bytes_out = 4096
    ex.events = 17
    ex.usage = Usage(prompt=12, completion=34)
    return ex


def test_access_record_fields() -> None:
    """The line holds the request's id, route, model, backend, status, timings, sizes and usage."""
    record = json.loads(
        access_record(finished_stream(), "POST", "/v1/chat/completions", 101.5, NOW)
    )
    expected = {
        "request_id": "req-42",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "/v1/chat/completions",
        "model": "qwen",
        "backend": "gpu-a",
        "tries": ["gpu-b:503", "gpu-a"],
        "status": 200,
        "duration_ms": 1500.0,
        "ttfb_ms": 250.0,
        "bytes_in": 321,
        "bytes_out": 4096,
        "events": 17,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "key": "key-0",
        "error": None,
        "client_gone": False,
    }
    assert expected == {k: v for k, v in record.items() if k != "time"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", record["time"])


def test_access_record_never_holds_the_key() -> None:
    """The key's position is logged; the key itself and the Authorization value are not."""
    line = access_record(finished_stream(), "POST", "/v1/chat/completions", 101.5, NOW)
    assert b'"key":"key-0"' in line
    assert SECRET.encode() not in line
    assert b"Bearer" not in line


def test_access_record_of_a_request_that_reached_no_backend() -> None:
    """A refused request logs null ttfb, tokens and key, backend none, and its error type."""
    ex = Exchange(request_id="r", route="unmatched", started=10.0, dialect="openai")
    ex.status = 401
    ex.error_type = "authentication_error"
    record = json.loads(access_record(ex, "GET", "/v2/nothing", 10.5, NOW))
    expected = {
        "route": "unmatched",
        "model": "none",
        "backend": "none",
        "status": 401,
        "duration_ms": 500.0,
        "ttfb_ms": None,
        "bytes_in": 0,
        "bytes_out": 0,
        "events": 0,
        "prompt_tokens": None,
        "completion_tokens": None,
        "key": None,
        "error": "authentication_error",
        "client_gone": False,
    }
    assert expected == {k: record[k] for k in expected}


def test_access_record_client_gone() -> None:
    """A client that went away is logged as such, with the 499 the middleware sets."""
    ex = finished_stream()
    ex.status = 499
    ex.client_gone = True
    record = json.loads(access_record(ex, "POST", "/v1/chat/completions", 100.5, NOW))
    assert (499, True, 250.0) == (record["status"], record["client_gone"], record["ttfb_ms"])


def test_lines_are_written_whole_and_at_most_pipe_buf_at_a_time() -> None:
    """Several workers share one standard output: every write holds whole lines only."""
    writes: list[bytes] = []

    class Recording(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            writes.append(bytes(data))
            return len(data)

    log = AccessLog(Recording())
    for i in range(100):
        ex = finished_stream()
        ex.request_id = "r" * (i % 7 * 40)  # lines of several lengths
        log.write(ex, "POST", "/v1/chat/completions", 100.5)
    assert all(len(w) <= ATOMIC_BYTES and w.endswith(b"\n") for w in writes)
    assert writes and log.pending_bytes <= ATOMIC_BYTES  # written as they fill, little kept
    log.flush()
    lines = b"".join(writes).splitlines()
    assert 100 == len(lines) and all(json.loads(line)["status"] == 200 for line in lines)
    assert [] == log.pending
    ex = finished_stream()
    ex.request_id = "x" * 5000  # a line longer than one atomic write: alone, whole
    log.write(ex, "POST", "/v1/chat/completions", 100.5)
    log.flush()
    assert 5000 < len(writes[-1]) and writes[-1].endswith(b"\n") and writes[-1].count(b"\n") == 1
