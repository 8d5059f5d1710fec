"""What a relayed body holds, read by scanning bytes: SSE events and the backend's `usage`."""

from __future__ import annotations

import re

import msgspec

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_USAGE = b'"usage"'
# How much of a body's end is kept to find the usage object in (it comes last).
TAIL_BYTES = 8192


class Usage(msgspec.Struct, frozen=True):
    """Token counts the backend reported."""

    prompt: int
    completion: int


def count_events(chunk: bytes, previous_ended_in_newline: bool) -> int:
    """SSE events completed in `chunk`, i.e. blank-line terminators (LF or CRLF framing)."""
    n = chunk.count(b"\n\n") + chunk.count(b"\n\r\n")
    if previous_ended_in_newline and chunk[:1] in (b"\n", b"\r"):
        n += 1
    return n


def usage_in(tail: bytes) -> Usage | None:
    """The token counts of the last `usage` object in the body's tail, if it has one."""
    at = tail.rfind(_USAGE)
    if at < 0:
        return None
    prompt = _PROMPT.search(tail, at)
    completion = _COMPLETION.search(tail, at)
    if prompt is None:
        return None
    return Usage(
        prompt=int(prompt.group(1)),
        completion=int(completion.group(1)) if completion is not None else 0,
    )
