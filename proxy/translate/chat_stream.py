"""An incremental parser of an OpenAI-style chat-completions SSE stream.

Bytes go in as the backend sent them, in any chunking; each complete `data:` event comes out
decoded. It reads the event-stream format as the WHATWG spec defines it (lines end in `\\n`,
`\\r\\n` or `\\r`; a blank line ends an event; `:` starts a comment; several `data:` lines join
with `\\n`), and holds at most one event's worth of bytes.
"""

from __future__ import annotations

import re

import orjson

from proxy.errors import BackendUnreachable

MAX_EVENT_BYTES = 8 * 1024 * 1024
_LINE_END = re.compile(rb"[\r\n]")

Event = dict[str, object] | None


class ChatStreamParser:
    """Feed it bytes; get back each complete event's JSON object, `None` for `data: [DONE]`.

    An event whose object has a top-level `"error"` key comes back as it is: the caller decides
    what an error event means. An event over `MAX_EVENT_BYTES`, or one that is not a JSON object,
    raises `BackendUnreachable`.
    """

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buffer = bytearray()  # bytes of the line not yet ended
        self._data: list[bytes] = []  # the `data:` lines of the event under way
        self._size = 0  # bytes in `_data`
        self._scan = 0  # bytes of `_buffer` already searched for a line end

    def feed(self, data: bytes) -> list[Event]:
        """The events that `data` completes, in order."""
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        start = 0  # where the current line begins
        scan = self._scan  # where to look for its end: the bytes before hold none
        while (end := _LINE_END.search(buffer, scan)) is not None:
            cut = end.start()
            if buffer[cut] == 0x0D:  # "\r": a "\n" may follow in the next chunk
                if cut + 1 == len(buffer):
                    scan = cut
                    break
                after = cut + 2 if buffer[cut + 1] == 0x0A else cut + 1
            else:
                after = cut + 1
            self._line(bytes(buffer[start:cut]), events)
            start = scan = after
        else:
            scan = len(buffer)
        del buffer[:start]
        self._scan = scan - start
        if self._size + len(buffer) > self._max:
            raise BackendUnreachable("backend sent an oversized stream event")
        return events

    def flush(self) -> list[Event]:
        """The event the body's end cuts off without a blank line (some servers end so)."""
        events: list[Event] = []
        if self._buffer.endswith(b"\r"):
            del self._buffer[-1:]
        if self._buffer:
            self._line(bytes(self._buffer), events)
            self._buffer.clear()
        self._scan = 0
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            payload = b"\n".join(self._data)
            if payload.strip():  # an event with empty data is not dispatched (SSE spec)
                events.append(_decode(payload))
            self._data.clear()
            self._size = 0
            return
        field, _, value = line.partition(b":")
        if field != b"data":  # comments (":..."), event:, id:, retry: carry nothing we read
            return
        value = value.removeprefix(b" ")
        self._size += len(value) + 1
        if self._size > self._max:
            raise BackendUnreachable("backend sent an oversized stream event")
        self._data.append(value)


def _decode(data: bytes) -> Event:
    if data == b"[DONE]":
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BackendUnreachable(
            f"backend sent a stream event that is not valid JSON ({exc}): {data[:200]!r}"
        ) from None
    if not isinstance(value, dict):
        raise BackendUnreachable(
            f"backend sent a stream event that is not a JSON object: {data[:200]!r}"
        )
    return value
