"""The routing view of a request body: `model` and `stream`, and nothing else.

The body itself is forwarded as received; only `model` may be rewritten, in place, by
`replace_model`, which touches the bytes of that one value.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
import orjson

from proxy.errors import InvalidRequest


class _Fields(msgspec.Struct, frozen=True):
    """The fields routing reads, as sent, any JSON type; every other field is left unread."""

    model: object = msgspec.UNSET
    stream: object = False
    chat_template: object = msgspec.UNSET


class RequestView(msgspec.Struct, frozen=True):
    """What routing needs from an OpenAI-style body, checked."""

    model: str
    stream: bool
    chat_template: bool = False  # the body carries a `chat_template` to render


class _InvocationFields(msgspec.Struct, frozen=True):
    """Which kind of request an MLflow/OICM body is, told by its keys (values left raw)."""

    messages: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    input: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    inputs: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    stream: object = False
    chat_template: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class Invocation(msgspec.Struct, frozen=True):
    """An endpoint-addressed body: its kind, by the keys it has, and whether it streams."""

    kind: str  # "chat", "completions", "embeddings" or "tgi" (TGI-style {"inputs": ...})
    stream: bool
    chat_template: bool = False


_T = TypeVar("_T")
_DECODER = msgspec.json.Decoder(_Fields)
_INVOCATION = msgspec.json.Decoder(_InvocationFields)
_ANY = msgspec.json.Decoder()


def peek(body: bytes) -> RequestView:
    """Decode `model` and `stream`, or raise `InvalidRequest` saying what is wrong."""
    view = _decode(_DECODER, body)
    if view.model is msgspec.UNSET:
        raise InvalidRequest("'model' is required")
    if not isinstance(view.model, str) or not view.model:
        raise InvalidRequest("'model' must be a non-empty string")
    return RequestView(
        model=view.model,
        stream=_stream_flag(view.stream),
        chat_template=view.chat_template is not msgspec.UNSET,
    )


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
    if fields.messages is not msgspec.UNSET:
        return Invocation("chat", stream, template)
    if fields.prompt is not msgspec.UNSET:
        return Invocation("completions", stream)
    if fields.input is not msgspec.UNSET:
        return Invocation("embeddings", stream)
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
    """Decode a body's routing view, every failure an `InvalidRequest` saying what is wrong."""
    if not body.strip():
        raise InvalidRequest("request body is empty: send a JSON object")
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


# A JSON string (with escapes) or one structural character; whatever lies between is
# numbers, literals, commas, colons and whitespace, none of which changes nesting depth.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]', re.DOTALL)
_VALUE_AFTER_KEY = re.compile(rb'\s*:\s*("[^"\\]*(?:\\.[^"\\]*)*")', re.DOTALL)


def model_span(body: bytes) -> tuple[int, int] | None:
    """Byte offsets of the top-level `"model"` string value in a JSON object body."""
    depth = 0
    found: tuple[int, int] | None = None
    for m in _TOKEN.finditer(body):
        first = body[m.start()]
        if first == 0x22:  # a string: a key when ':' follows it
            if depth == 1 and _is_model_key(m.group()):
                value = _VALUE_AFTER_KEY.match(body, m.end())
                if value is not None:
                    if found is not None:
                        raise InvalidRequest("'model' appears more than once in the body")
                    found = value.span(1)
        elif first in b"{[":
            depth += 1
        else:
            depth -= 1
    return found


def _is_model_key(token: bytes) -> bool:
    """Whether a JSON string token spells `model`, escapes included (`"mod\\u0065l"`)."""
    if token == b'"model"':
        return True
    return b"\\" in token and len(token) < 64 and _ANY.decode(token) == "model"


def replace_model(body: bytes, model: str) -> bytes:
    """The body with the top-level `model` value set to `model`, every other byte as sent."""
    span = model_span(body)
    if span is None:  # peek() has proven the key exists, so this is unreachable in practice
        raise InvalidRequest("'model' is required")
    start, end = span
    return body[:start] + msgspec.json.encode(model) + body[end:]


_OPEN_BRACE = re.compile(rb"\s*\{\s*(\}?)")


def set_model(body: bytes, model: str) -> bytes:
    """The body with `model` set: replaced where it is, else added first; nothing else moves."""
    if model_span(body) is not None:
        return replace_model(body, model)
    m = _OPEN_BRACE.match(body)
    if m is None:
        raise InvalidRequest("request body must be a JSON object")
    at = m.start(1)
    separator = b"" if m.group(1) else b","
    return body[:at] + b'"model":' + msgspec.json.encode(model) + separator + body[at:]
