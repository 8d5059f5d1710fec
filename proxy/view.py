"""The routing view of a request body: `model` and `stream`, and nothing else.

The body itself is forwarded as received; only `model` may be rewritten, in place, by
`replace_model`, which touches the bytes of that one value (and a stream's `stream_options`,
at the span `peek` finds, by proxy/stream_usage.py). Every pass over a body is made by
msgspec, in C, whatever the body holds (no Python loop over its tokens).
"""

from __future__ import annotations

import ctypes
import re
from typing import TypeVar

import msgspec
import orjson

from proxy.errors import InvalidRequest


class _Fields(msgspec.Struct, frozen=True):
    """The fields routing reads, as sent, any JSON type; every other field is left unread."""

    model: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    stream: object = False
    chat_template: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    stream_options: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    # Where each route's prompt is, for `affinity`'s key (found in the same pass)
    system: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET  # Anthropic's own system prompt
    messages: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    input: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class RequestView(msgspec.Struct, frozen=True):
    """What routing needs from an OpenAI-style body, checked."""

    model: str
    stream: bool
    chat_template: bool = False  # the body carries a `chat_template` to render
    model_at: tuple[int, int] | None = None  # the model value's byte span, for a rewrite
    options_at: tuple[int, int] | None = None  # a stream's `stream_options` value's span
    prompt: tuple[msgspec.Raw, ...] = ()  # the values of `peek`'s prompt fields it has


class _InvocationFields(msgspec.Struct, frozen=True):
    """Which kind of request an MLflow/OICM body is, told by its keys (values left raw)."""

    messages: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    input: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    inputs: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    stream: object = False
    chat_template: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    stream_options: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class Invocation(msgspec.Struct, frozen=True):
    """An endpoint-addressed body: its kind, by the keys it has, and whether it streams."""

    kind: str  # "chat", "completions", "embeddings" or "tgi" (TGI-style {"inputs": ...})
    stream: bool
    chat_template: bool = False
    options_at: tuple[int, int] | None = None  # a stream's `stream_options` value's span
    prompt: tuple[msgspec.Raw, ...] = ()  # its kind's prompt (`messages`, `prompt`, `input`)


_T = TypeVar("_T")
_SEARCH_PAST = 4096  # a prompt value this long is left out of the search for `model` keys
_DECODER = msgspec.json.Decoder(_Fields)
_INVOCATION = msgspec.json.Decoder(_InvocationFields)
_ANY = msgspec.json.Decoder()


def peek(body: bytes, prompt_fields: tuple[str, ...] = ()) -> RequestView:
    """Decode `model` and `stream`, or raise `InvalidRequest` saying what is wrong; the
    view's `prompt` holds the values of those of `prompt_fields` the body has, in order.

    One C-speed pass over the body (a second one only where a duplicate `model` could hide);
    `model` named twice at the top level is refused, whether or not a rewrite follows.
    """
    view = _decode(_DECODER, body)
    if view.model is msgspec.UNSET:
        raise InvalidRequest("'model' is required")
    model = _ANY.decode(view.model)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string")
    prompt = _present(view, prompt_fields)
    only = _only_model_key(body, prompt)
    start = _model_at(body, view.model, only)
    if only < 0:
        _refuse_a_second_model(body, start)
    stream = _stream_flag(view.stream)
    return RequestView(
        model=model,
        stream=stream,
        chat_template=view.chat_template is not msgspec.UNSET,
        model_at=(start, start + len(view.model)),
        options_at=_options_at(body, view.stream_options) if stream else None,
        prompt=prompt,
    )


def _present(fields: msgspec.Struct, names: tuple[str, ...]) -> tuple[msgspec.Raw, ...]:
    """The values of the decoded `fields` named in `names` that the body had, in order."""
    if len(names) == 1:  # the usual case: one field, no generator
        value = getattr(fields, names[0])
        return () if value is msgspec.UNSET else (value,)
    return tuple(v for v in (getattr(fields, name) for name in names) if v is not msgspec.UNSET)


def _only_model_key(body: bytes, prompt: tuple[msgspec.Raw, ...] = ()) -> int:
    """Where `"model"` is in the body when it is there once and no key can be spelt with
    escapes (so that one is the top-level key), else -1: two passes over the body, in C.

    `prompt`: top-level values decoded from `body`. No top-level key is inside one, so the
    longest, when it is long (a prompt of many KB), is not searched: the passes cover the
    rest of the body only."""
    size = len(body)
    longest = max(prompt, key=len) if size >= _SEARCH_PAST and prompt else None
    if longest is None or len(longest) < _SEARCH_PAST:  # the usual, short body: all of it
        at = body.find(b'"model"')
        if at < 0 or body.find(b'"model"', at + 7) >= 0 or body.find(b"\\u006") >= 0:
            return -1
        return at
    start, end = raw_span(body, longest)  # [start, end): not searched
    at = body.find(b'"model"', 0, start)
    if at >= 0:
        second = body.find(b'"model"', at + 7, start) >= 0 or body.find(b'"model"', end) >= 0
    else:  # none before the prompt: the key is after it
        at = body.find(b'"model"', end)
        if at < 0:
            return -1
        second = body.find(b'"model"', at + 7) >= 0
    if second or body.find(b"\\u006", 0, start) >= 0 or body.find(b"\\u006", end) >= 0:
        return -1
    return at


def _model_at(body: bytes, value: msgspec.Raw, only: int) -> int:
    """Where the top-level `model` value decoded from `body` starts in it. Where the key is
    `only` (`_only_model_key`), the value follows its colon: found by search, without
    reading the Raw's address."""
    if only >= 0:
        colon = body.find(b":", only + 7)
        if colon >= 0:
            start = colon + 1
            while body[start] in b" \t\r\n":
                start += 1
            if body.startswith(value, start):
                return start
    return _address(value) - _address(body)


def _options_at(body: bytes, value: msgspec.Raw | msgspec.UnsetType) -> tuple[int, int] | None:
    return None if value is msgspec.UNSET else raw_span(body, value)


def raw_span(body: bytes, value: msgspec.Raw) -> tuple[int, int]:
    """Where a `Raw` decoded from `body` lies in it (msgspec's Raw points into its input)."""
    start = _address(value) - _address(body)
    end = start + len(value)
    if not (start >= 0 and end <= len(body) and body.startswith(value, start)):  # a memcmp
        raise AssertionError("msgspec.Raw no longer points into the decoded body")
    return start, end


def _stream_flag(value: object) -> bool:
    if value is None:  # OpenAI's schema allows null, meaning false
        return False
    if not isinstance(value, bool):
        raise InvalidRequest("'stream' must be true or false")
    return value


def peek_invocation(body: bytes) -> Invocation:
    """Tell chat (`messages`), completions (`prompt`), embeddings (`input`) and TGI-style
    (`inputs`) bodies apart, or raise `InvalidRequest`."""
    fields = _decode(_INVOCATION, body)
    stream = _stream_flag(fields.stream)
    template = fields.chat_template is not msgspec.UNSET
    options = _options_at(body, fields.stream_options) if stream else None
    if fields.messages is not msgspec.UNSET:
        return Invocation("chat", stream, template, options, (fields.messages,))
    if fields.prompt is not msgspec.UNSET:
        return Invocation("completions", stream, options_at=options, prompt=(fields.prompt,))
    if fields.input is not msgspec.UNSET:
        return Invocation("embeddings", stream, prompt=(fields.input,))
    if fields.inputs is not msgspec.UNSET:
        return Invocation("tgi", stream)
    raise InvalidRequest(
        "cannot tell the request's kind: send 'messages' (chat), 'prompt' (completions) "
        "or 'input' (embeddings)"
    )


def decode_object(body: bytes) -> dict[str, object]:
    """Decode a whole JSON object body (for the routes that translate, not forward).

    What the translators build from it is sent on with orjson, which holds integers of 64 bits
    and nests 254 levels at most; a body past either is refused here, with the path of the value.
    """
    try:
        value = _ANY.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _not_json(body, exc) from exc
    except RecursionError:
        raise InvalidRequest(_TOO_DEEP) from None
    if not isinstance(value, dict):
        raise InvalidRequest("request body must be a JSON object")
    wrapped: object = value  # the translators nest a body's values a few levels deeper at most
    for _ in range(_HEADROOM):
        wrapped = [wrapped]
    try:  # one C pass over the body
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        raise InvalidRequest(_unencodable(value)) from None
    return value


_TOO_DEEP = "request body nests too deeply"
_HEADROOM = 14  # levels of orjson's 254 kept free: a body may nest 240 deep
_MAX_DEPTH = 240


def _unencodable(value: object) -> str:
    """Where a decoded body holds what orjson cannot write, in our words (the failure path)."""
    stack: list[tuple[object, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, int) and not -(2**63) <= item < 2**64:
            return f"{path or 'request body'}: integer does not fit in 64 bits"
        if depth > _MAX_DEPTH and isinstance(item, dict | list):
            return f"request body nests deeper than {_MAX_DEPTH} levels"
        if isinstance(item, dict):
            prefix = f"{path}." if path else ""
            stack.extend((v, f"{prefix}{k}", depth + 1) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in reversed(list(enumerate(item))))
    return _TOO_DEEP


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    """Decode a body's routing view, every failure an `InvalidRequest` saying what is wrong.

    The view skips the values it does not read without checking their UTF-8, so a body
    that is not all ASCII is checked whole here (C speed; ASCII is told in one fast pass).
    """
    if not body or body.isspace():  # (not `strip()`: a copy of a body that ends in a newline)
        raise InvalidRequest("request body is empty: send a JSON object")
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("request body is not valid UTF-8") from None
    try:
        return decoder.decode(body)
    except msgspec.ValidationError:  # the views take any value, so only the top level can fail
        raise InvalidRequest(f"request body must be a JSON object, not {_kind(body)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _not_json(body, exc) from exc
    except RecursionError:  # msgspec's own limit on nesting (about a thousand levels)
        raise InvalidRequest(_TOO_DEEP) from None


def _not_json(body: bytes, exc: Exception) -> InvalidRequest:
    """Why a body did not decode, in our words. Invalid UTF-8 is told apart by our own check
    (msgspec reports it as a DecodeError in some versions, a UnicodeDecodeError in others);
    the check runs only on this failure path, so a good body never pays for it."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidRequest("request body is not valid UTF-8")
    return InvalidRequest(f"request body is not valid JSON ({_lower(exc)})")


_KINDS = {ord("["): "an array", ord('"'): "a string", ord("t"): "a boolean", ord("f"): "a boolean"}


def _kind(body: bytes) -> str:
    """The JSON type of a valid JSON body that is not an object, by its first byte."""
    first = body.lstrip()[:1]
    return "null" if first == b"n" else _KINDS.get(first[0], "a number") if first else "nothing"


def _lower(exc: Exception) -> str:
    text = str(exc)
    return text if text[1:2].isupper() else text[:1].lower() + text[1:]


class _Prompt(msgspec.Struct, frozen=True):
    """The fields that hold a request's prompt, in each protocol, as zero-copy bytes; in the
    order a key prefers them (a system prompt of its own first)."""

    system: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET  # Anthropic's system prompt
    messages: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET  # OpenAI chat, Anthropic
    prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET  # completions
    input: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET  # embeddings, Responses
    contents: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET  # Gemini


_PROMPT = msgspec.json.Decoder(_Prompt)
_PROMPT_FIELDS = tuple(_Prompt.__struct_fields__)


def prompt_of(body: bytes, fields: tuple[str, ...] | None = None) -> tuple[msgspec.Raw, ...]:
    """The values of the body's prompt fields, for a route whose handler did not find them:
    those of `fields` (None: of each protocol's, in `_Prompt`'s order) the body has at its top
    level, in order (none when the body is not JSON). One msgspec pass, skipping every other
    value; `peek` and `peek_invocation` find the same values in their own pass."""
    try:
        decoded = _PROMPT.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return ()
    return _present(decoded, _PROMPT_FIELDS if fields is None else fields)


def prompt_head(prompt: tuple[msgspec.Raw, ...], size: int) -> bytes:
    """The first `size` bytes of the prompt's values one after another (a system prompt of
    its own, then the messages, as a template renders them); each is sliced, not copied whole."""
    if len(prompt) == 1:
        return memoryview(prompt[0])[:size].tobytes()
    head = b""
    for value in prompt:
        head += memoryview(value)[: size - len(head)]
        if len(head) >= size:
            break
    return head


class _ModelValue(msgspec.Struct, frozen=True):
    """The top-level `model` value as a zero-copy view of its bytes in the body."""

    model: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_MODEL_VALUE = msgspec.json.Decoder(_ModelValue)


def model_span(body: bytes) -> tuple[int, int] | None:
    """Byte offsets of the top-level `"model"` string value in a JSON object body, or None.

    Found at C speed whatever the rest of the body holds: msgspec decodes the top level once,
    skipping every other value, and hands `model` back as a `Raw` that points into `body`
    itself (zero-copy), so its offset is the distance between the two buffers. The offset is
    checked against the bytes before it is trusted. Raises `InvalidRequest` when `model`
    appears more than once at the top level (see `peek`).
    """
    value = _decode(_MODEL_VALUE, body).model
    if value is msgspec.UNSET:
        return None
    start = _address(value) - _address(body)
    end = start + len(value)
    if not (start >= 0 and end <= len(body) and body.startswith(value, start)):  # a memcmp
        raise AssertionError("msgspec.Raw no longer points into the decoded body")
    if _only_model_key(body) < 0:
        _refuse_a_second_model(body, start)
    return (start, end) if body[start] == 0x22 else None  # only a string value is a model


def _refuse_a_second_model(body: bytes, value_at: int) -> None:
    """A body whose top level names `model` twice is refused: the gateway would route by one
    and a backend may read the other. msgspec keeps the last, so the keys before it are
    decoded again (cut off as an object of their own) to find any other, escaped spellings
    included. Called only for a body where a second one can hide (`"model"` twice, or an
    escaped letter, which a key spelling it with escapes needs: `_only_model_key`)."""
    colon = body.rindex(b":", 0, value_at)
    key_end = body.rindex(b'"', 0, colon)
    key_start = body.rindex(b'"', 0, key_end)  # a key spelling `model` has no escaped quote
    before = body[:key_start].rstrip()
    if before.endswith(b"{"):  # the last `model` is the first key: there is no other
        return
    try:  # `before` ends with the comma after the previous member
        earlier = _MODEL_VALUE.decode(before[:-1] + b"}").model
    except (msgspec.DecodeError, RecursionError):
        raise InvalidRequest("request body is not valid JSON") from None
    if earlier is not msgspec.UNSET:
        raise InvalidRequest("'model' appears more than once in the body")


class _BufferView(ctypes.Structure):
    """CPython's Py_buffer (part of the stable ABI since 3.11)."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_GET_BUFFER = ctypes.pythonapi.PyObject_GetBuffer
_GET_BUFFER.argtypes = (ctypes.py_object, ctypes.POINTER(_BufferView), ctypes.c_int)
_GET_BUFFER.restype = ctypes.c_int
_RELEASE_BUFFER = ctypes.pythonapi.PyBuffer_Release
_RELEASE_BUFFER.argtypes = (ctypes.POINTER(_BufferView),)
_RELEASE_BUFFER.restype = None


def _address(buffer: bytes | msgspec.Raw) -> int:
    """Where a buffer's bytes start in memory (read through the buffer protocol)."""
    view = _BufferView()
    if _GET_BUFFER(buffer, ctypes.byref(view), 0) != 0:
        raise AssertionError("no buffer")  # bytes and msgspec.Raw always export one
    try:
        return int(view.buf or 0)
    finally:
        _RELEASE_BUFFER(ctypes.byref(view))


def replace_model(body: bytes, model: str) -> bytes:
    """The body with the top-level `model` value set to `model`, every other byte as sent."""
    span = model_span(body)
    if span is None:  # peek() has proven the key exists, so this is unreachable in practice
        raise InvalidRequest("'model' is required")
    return _splice(body, span, model)


def _splice(body: bytes, span: tuple[int, int], model: str) -> bytes:
    """`body` with the bytes in `span` replaced by `model` as JSON: one copy of the body."""
    start, end = span
    whole = memoryview(body)
    return b"".join((whole[:start], msgspec.json.encode(model), whole[end:]))


_OPEN_BRACE = re.compile(rb"\s*\{\s*(\}?)")


def set_model(body: bytes, model: str, at: tuple[int, int] | None = None) -> bytes:
    """The body with `model` set: replaced where it is, else added first; nothing else moves.

    `at` is the model value's span when `peek` has found it already (saving a pass).
    """
    span = at if at is not None else model_span(body)
    if span is not None:
        return _splice(body, span, model)
    m = _OPEN_BRACE.match(body)
    if m is None:
        raise InvalidRequest("request body must be a JSON object")
    first = m.start(1)
    separator = b"" if m.group(1) else b","
    return body[:first] + b'"model":' + msgspec.json.encode(model) + separator + body[first:]
