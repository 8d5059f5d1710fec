"""The routing view of a request body: `model` and `stream`, and nothing else.

The body itself is forwarded as received; only `model` may be rewritten, in place, by
`replace_model`, which touches the bytes of that one value.
"""

from __future__ import annotations

import re

import msgspec

from proxy.errors import InvalidRequest


class _Fields(msgspec.Struct, frozen=True):
    """The two fields as sent, any JSON type; every other field is left unread."""

    model: object = msgspec.UNSET
    stream: object = False


class RequestView(msgspec.Struct, frozen=True):
    """What routing needs from an OpenAI-style body, checked."""

    model: str
    stream: bool


_DECODER = msgspec.json.Decoder(_Fields)
_ANY = msgspec.json.Decoder()


def peek(body: bytes) -> RequestView:
    """Decode `model` and `stream`, or raise `InvalidRequest` saying what is wrong."""
    if not body.strip():
        raise InvalidRequest("request body is empty: send a JSON object")
    try:
        view = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"request body must be a JSON object ({_lower(exc)})") from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON ({_lower(exc)})") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest("request body is not valid UTF-8") from exc
    if view.model is msgspec.UNSET:
        raise InvalidRequest("'model' is required")
    if not isinstance(view.model, str) or not view.model:
        raise InvalidRequest("'model' must be a non-empty string")
    if view.stream is None:  # OpenAI's schema allows null, meaning false
        return RequestView(model=view.model, stream=False)
    if not isinstance(view.stream, bool):
        raise InvalidRequest("'stream' must be true or false")
    return RequestView(model=view.model, stream=view.stream)


def decode_object(body: bytes) -> dict[str, object]:
    """Decode a whole JSON object body (for the routes that translate, not forward)."""
    try:
        value = _ANY.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON ({_lower(exc)})") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest("request body is not valid UTF-8") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("request body must be a JSON object")
    return value


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
