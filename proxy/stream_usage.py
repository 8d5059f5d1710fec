"""Usage for streams whose client did not ask for it: the request's edit, the answer's filter.

OpenAI-compatible servers send a stream's token counts only when the body says
`"stream_options": {"include_usage": true}`, which most clients do not send. Where the gateway
needs the counts (`usage.streams`, see README "Usage of streams"), `request_edit` says how to
add that to the body: a splice of a few bytes at a span the body's one decode found, never a
re-serialisation. The backend then ends its stream with one more event, `"choices": []` with
`"usage"`, that the client did not ask for; `UsageFilter` takes exactly that event out of
what the client receives, whatever the boundaries of the backend's reads, and keeps it for
accounting. That event is the one exception to byte-for-byte forwarding. [pure]
"""

from __future__ import annotations

import re
from typing import NamedTuple

import msgspec

from proxy.config import Config
from proxy.usage import CR
from proxy.view import model_span, raw_span, set_model

ASK = b'"stream_options":{"include_usage":true},'  # added first in a body without the field


class Edit(NamedTuple):
    """Bytes `start` to `end` of a body replaced by `new` (start == end: an insertion)."""

    start: int
    end: int
    new: bytes


class _Options(msgspec.Struct, frozen=True):
    """The `stream_options` fields we read, as sent."""

    include_usage: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    continuous_usage_stats: object = None


class _OptionsValue(msgspec.Struct, frozen=True):
    """A body's top-level `stream_options`, as sent."""

    stream_options: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_OPTIONS = msgspec.json.Decoder(_Options)
_OPTIONS_VALUE = msgspec.json.Decoder(_OptionsValue)
_OPEN = re.compile(rb"[ \t\r\n]*\{[ \t\r\n]*(\}?)")


def asks_stream_usage(config: Config) -> bool:
    """Whether this gateway asks streams' backends for usage (`usage.streams`): always, never,
    or (auto) where the counts are needed: per-key accounting and per-key limits (a key store),
    or a tokens-per-minute limit (`auth.default_limits`, `models.NAME.limits`)."""
    mode = config.usage.streams
    if mode != "auto":
        return mode == "always"
    limits = [config.auth.default_limits, *(m.limits for m in config.models.values())]
    return config.auth.store is not None or any(x is not None and x.tpm for x in limits)


def options_span(body: bytes) -> tuple[int, int] | None:
    """The span of the top-level `stream_options` value (None when absent), found by a decode
    of its own: for bodies whose view did not look (they were rebuilt after it)."""
    try:
        value = _OPTIONS_VALUE.decode(body).stream_options
    except (msgspec.DecodeError, RecursionError):  # a body the view took: not in practice
        return None
    return None if value is msgspec.UNSET else raw_span(body, value)


def request_edit(body: bytes, options_at: tuple[int, int] | None) -> Edit | None:
    """The splice that makes a streaming body ask for usage, or None when it need not or
    must not be touched.

    `options_at` is the span of the body's top-level `stream_options` value (None: absent).
    Absent or `null`, the field is set; an object without `include_usage` gets it as its
    first member; `include_usage: false` or `null` becomes `true`. A body whose client asked
    already (`true`), or asked for `continuous_usage_stats` (usage in every chunk, which is
    the client's to want), or whose field is not of the types the API takes (the backend's
    answer says what is wrong) is left as it is.
    """
    if options_at is None:
        m = _OPEN.match(body)
        if m is None or m.group(1):  # not an object, or `{}` (a streaming body has members)
            return None
        return Edit(m.start(1), m.start(1), ASK)
    start, end = options_at
    value = body[start:end]
    if value == b"null":
        return Edit(start, end, b'{"include_usage":true}')
    try:
        options = _OPTIONS.decode(value)
    except (msgspec.DecodeError, RecursionError):  # not an object: the backend says so
        return None
    if options.continuous_usage_stats not in (None, False):
        return None
    if options.include_usage is msgspec.UNSET:
        m = _OPEN.match(value)
        assert m is not None  # it decoded as an object
        at = start + m.start(1)
        return Edit(at, at, b'"include_usage":true' + (b"" if m.group(1) else b","))
    flag = bytes(options.include_usage)
    if flag not in (b"false", b"null"):  # true: asked already; anything else: not ours to fix
        return None
    at = start + raw_span(value, options.include_usage)[0]
    return Edit(at, at + len(flag), b"true")


def apply(body: bytes, edit: Edit, model: str | None, model_at: tuple[int, int] | None) -> bytes:
    """The body with `edit` made and, when `model` is given, the model set as `set_model`
    would set it: one copy of the body when the model's span is known."""
    if model is not None and model_at is None:
        model_at = model_span(body)
        if model_at is None:  # no model in the body: `set_model` adds one first
            return set_model(splice(body, [edit]), model)
    edits = [edit]
    if model is not None:
        assert model_at is not None
        edits.append(Edit(model_at[0], model_at[1], msgspec.json.encode(model)))
        edits.sort()
    return splice(body, edits)


def splice(body: bytes, edits: list[Edit]) -> bytes:
    """`body` with each edit made (in order, spans apart): one copy of the body."""
    whole = memoryview(body)
    parts: list[bytes | memoryview] = []
    kept = 0
    for start, end, new in edits:
        parts += (whole[kept:start], new)
        kept = end
    parts.append(whole[kept:])
    return b"".join(parts)


# --- the answer: the usage-only event out of an SSE stream -------------------------------

# An event is what lies between two blank lines (WHATWG HTML, "Server-sent events",
# "Interpreting an event stream": lines end in LF or CRLF here; a lone-CR stream is passed on
# untouched, as no backend sends one). Blank lines between events belong to no event and go
# out as they come. The event taken out is one whose data holds an empty top-level `choices`
# and a `usage` object: the one OpenAI's API defines for `include_usage`. A key is matched
# only where its opening quote is not escaped, so text inside a string never matches.
# `choices` is judged by its first appearance, whose bytes tell as soon as they have come.
_CHOICES = re.compile(rb'(?<!\\)"choices"[ \t\r\n]*:[ \t\r\n]*\[[ \t\r\n]*([^ \t\r\n])')
_USAGE_OBJECT = re.compile(rb'(?<!\\)"usage"[ \t\r\n]*:[ \t\r\n]*\{')
_EVENT_START = re.compile(rb"[^\r\n]")
WHOLE_EVENTS = (b"\n\n", b"\n\r\n")  # a read that ends so ends with a complete event
USAGE_KEY = b'"usage"'
# The most of an unfinished event held back while it may still be the usage event (that event
# is a few hundred bytes); a longer one goes out as it comes, and is never taken out.
HOLD_BYTES = 8192


def _event_end(buf: bytes, pos: int) -> int:
    """Where the event starting at `pos` ends (just past its blank line), or -1."""
    lf = buf.find(b"\n\n", pos)
    if CR not in buf:
        return lf + 2 if lf >= 0 else -1
    crlf = buf.find(b"\n\r\n", pos)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 3
    return lf + 2 if lf >= 0 else -1


def is_usage_only(event: bytes) -> bool:
    """Whether an SSE event is the usage-only chunk: empty `choices` and a `usage` object
    (and no longer than `HOLD_BYTES`, so that the answer never depends on the reads)."""
    if len(event) > HOLD_BYTES:
        return False
    choices = _CHOICES.search(event)
    return (
        choices is not None and choices.group(1) == b"]" and _USAGE_OBJECT.search(event) is not None
    )


def _not_usage(buf: bytes, pos: int) -> bool:
    """Whether the unfinished event at `pos` can no longer be the usage-only one."""
    if len(buf) - pos > HOLD_BYTES:
        return True
    choices = _CHOICES.search(buf, pos)
    return choices is not None and choices.group(1) != b"]"


class UsageFilter:
    """Feed it a stream's bytes in any chunking; it gives back the same bytes without the
    usage-only event, and keeps that event in `usage`.

    Nothing is buffered but the start of an unfinished event that may still be the usage event
    (at most `HOLD_BYTES`, and only until its `choices` show it is not): an event held so is
    sent the moment it ends, which is when a client could first read it anyway. A read made of
    whole events with no `"usage"` in it, which is nearly every read, is given back as it is.
    """

    __slots__ = ("held", "passing", "tail", "usage")

    def __init__(self) -> None:
        self.held = b""  # the start of an unfinished event, not sent yet
        self.passing = False  # an unfinished event whose start was sent: the rest follows it
        self.tail = b""  # the last two bytes sent of that event (a blank line may straddle)
        self.usage = b""  # the usage-only event taken out, if one was

    def feed(self, data: bytes) -> bytes:
        """What of the stream so far can go to the client now."""
        if self.passing:
            return self._pass(data)
        if self.held:
            data, self.held = self.held + data, b""
        elif data.find(USAGE_KEY) < 0 and data.endswith(WHOLE_EVENTS):
            return data
        return self._scan(data)

    def end(self) -> bytes:
        """What is left at the end of the body: an unfinished event (taken out if it is the
        usage event)."""
        held, self.held, self.passing = self.held, b"", False
        if held and is_usage_only(held):
            self.usage = held
            return b""
        return held

    def _pass(self, data: bytes) -> bytes:
        joined = self.tail + data
        end = _event_end(joined, 0)
        if end < 0:
            self.tail = joined[-2:]
            return data
        self.passing, self.tail = False, b""
        cut = end - (len(joined) - len(data))
        rest = data[cut:]
        return data[:cut] + self._scan(rest) if rest else data

    def _scan(self, buf: bytes) -> bytes:
        """`buf` starts where an event may start: send it all but usage events and an
        unfinished event that may be one."""
        parts: list[bytes] = []
        kept = pos = 0
        size = len(buf)
        # `_event_end`, kept across the events of one read (which may hold thousands): the
        # next blank line of each kind is looked for again only once `pos` has passed it
        # (-1: there is none, -2: not looked for yet), so each search covers the read once.
        cr = CR in buf
        lf = crlf = -2
        while True:
            m = _EVENT_START.search(buf, pos)
            if m is None:
                pos = size
                break
            pos = m.start()
            if lf != -1 and lf < pos:
                lf = buf.find(b"\n\n", pos)
            end = lf + 2 if lf >= 0 else -1
            if cr:
                if crlf != -1 and crlf < pos:
                    crlf = buf.find(b"\n\r\n", pos)
                if crlf >= 0 and (lf < 0 or crlf < lf):
                    end = crlf + 3
            if end < 0:
                break
            if buf.find(USAGE_KEY, pos, end) >= 0 and is_usage_only(buf[pos:end]):
                parts.append(buf[kept:pos])
                self.usage = buf[pos:end]
                kept = end
            pos = end
        if pos < size:  # an unfinished event starts at `pos`
            if _not_usage(buf, pos):
                self.passing, self.tail = True, buf[-2:]
            else:
                self.held, size = buf[pos:], pos
        if not parts:
            return buf[:size] if size < len(buf) else buf
        parts.append(buf[kept:size])
        return b"".join(parts)
