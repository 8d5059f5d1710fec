"""What a relayed body holds, read by scanning bytes: SSE events and the backend's `usage`."""

from __future__ import annotations

import re

import msgspec

# OpenAI's names, and the Anthropic Messages and Responses APIs' names.
# A count has at most 18 digits (it fits 64 bits); a longer run of digits is no count, and
# would pass Python's limit on the digits int() reads (4300), which raises ValueError.
_PROMPT = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*([0-9]{1,18})(?![0-9])')
_COMPLETION = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*([0-9]{1,18})(?![0-9])')
_USAGE = b'"usage"'
# How much of a body's end is kept to find the usage object in (it comes last).
TAIL_BYTES = 8192
# b"\r" as the int `in` looks for with one memchr: `b"\r" in data` first tries to read its
# operand as an int and raises inside (about 0.12 µs), which per relayed read adds up
CR = ord("\r")


class Usage(msgspec.Struct, frozen=True):
    """Token counts the backend reported."""

    prompt: int
    completion: int


def count_events(chunk: bytes, tail: bytes = b"") -> int:
    """SSE events completed in `chunk`: blank-line terminators, LF or CRLF framed.

    `tail` is the end of the previous chunk (its last two bytes are enough), so that a
    terminator split across two chunks is counted once, in the chunk that completes it.
    """
    if tail and chunk[:1] in (b"\n", b"\r"):  # only then can a terminator straddle the two
        joined = tail[-2:] + chunk
        return _terminators(joined) - _terminators(tail[-2:])
    return _terminators(chunk)


def carry_tail(tail: bytes, chunk: bytes) -> bytes:
    """The last two bytes relayed once `chunk` follows `tail` (the `tail` of the next
    `count_events` call), also when `chunk` is shorter than two bytes."""
    return chunk[-2:] if len(chunk) > 1 else (tail + chunk)[-2:]


def events_after(tail: bytes, chunk: bytes) -> tuple[int, bytes]:
    """`count_events(chunk, tail)` and `carry_tail(tail, chunk)` in one call, with the usual
    case (LF framing, no terminator cut between two reads) made without either."""
    if CR in chunk or (tail and chunk[:1] in (b"\n", b"\r")) or len(chunk) < 2:
        return count_events(chunk, tail), carry_tail(tail, chunk)
    return chunk.count(b"\n\n"), chunk[-2:]


def _terminators(data: bytes) -> int:
    n = data.count(b"\n\n")
    if CR in data:  # CRLF framing is rare: a memchr pass first spares the second count
        n += data.count(b"\n\r\n")
    return n


# The last event of a complete stream: OpenAI's `[DONE]`, Anthropic's `message_stop`, and the
# Responses API's `response.completed` (each protocol's own end marker).
_END_MARKERS = (b"[DONE]", b"message_stop", b"response.completed")


def ends_event(tail: bytes) -> bool:
    """Whether an SSE body's tail ends at an event boundary (a blank line)."""
    return tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))


def ends_stream(tail: bytes) -> bool:
    """Whether an SSE body's tail ends with its protocol's last event, terminated.

    A client may close as soon as it has read that event (the openai SDK does, after
    `data: [DONE]`), before the backend's own end of body arrives; such a stream is complete.
    """
    if not ends_event(tail):
        return False
    body = tail.rstrip(b"\r\n")
    start = body.rfind(b"\n\n")  # a CRLF boundary counts only after it: searched there alone
    start = max(start, body.rfind(b"\r\n\r\n", start + 1))
    last = body[start + 1 :]
    return any(marker in last for marker in _END_MARKERS) and b"data:" in last


def usage_of(event: dict[str, object]) -> Usage | None:
    """The token counts of a decoded chat chunk's `usage` object, if it has one."""
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return Usage(
        prompt=prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else 0,
        completion=(
            completion if isinstance(completion, int) and not isinstance(completion, bool) else 0
        ),
    )


def opening_prompt(head: bytes) -> int | None:
    """The prompt's count in a stream's first `usage` (in `head`, the first piece relayed), as
    in Anthropic's stream, whose `message_start` carries `input_tokens`; None if it has none.
    Read as the piece goes by, so a stream holds a number for its whole life, not the bytes."""
    at = head.find(_USAGE, 0, TAIL_BYTES)
    first = _PROMPT.search(head, at, at + _NEAR_USAGE) if at >= 0 else None
    return int(first.group(1)) if first is not None else None


def stream_usage(opening: int | None, tail: bytes) -> Usage | None:
    """A stream's token counts: its last `usage` (in `tail`), with the prompt's count from its
    first one (`opening_prompt`) when the last has none, as in Anthropic's stream, whose
    `message_delta` carries only the output's."""
    last = usage_in(tail)
    if (last is not None and last.prompt) or opening is None:
        return last
    return Usage(prompt=opening, completion=last.completion if last else 0)


_NEAR_USAGE = 512  # bytes after a `usage` key in which its counts are looked for


def usage_in(tail: bytes) -> Usage | None:
    """The token counts of the last `usage` object in the body's tail, if it has one."""
    at = tail.rfind(_USAGE)
    if at < 0:
        return None
    prompt = _PROMPT.search(tail, at)
    completion = _COMPLETION.search(tail, at)
    if prompt is None and completion is None:
        return None
    return Usage(
        prompt=int(prompt.group(1)) if prompt is not None else 0,
        completion=int(completion.group(1)) if completion is not None else 0,
    )
