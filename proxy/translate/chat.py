"""The parts of an OpenAI chat completion (and of its stream chunks) that the translators read.

A backend's answer is decoded into these small Structs once, so the translators work with typed
values. An answer that does not fit is the backend's fault, not the client's: it becomes
`BackendUnreachable` (502), never a 400 and never a `KeyError`.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
import orjson

from proxy.errors import BackendUnreachable


class FunctionCall(msgspec.Struct, frozen=True):
    name: str | None = None
    arguments: str | None = None


class ToolCall(msgspec.Struct, frozen=True):
    index: int | None = None
    id: str | None = None
    function: FunctionCall | None = None


class Message(msgspec.Struct, frozen=True):
    """A completion's `message`, or a chunk's `delta`: the same fields, all optional."""

    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(msgspec.Struct, frozen=True):
    index: int = 0
    message: Message | None = None
    delta: Message | None = None
    finish_reason: str | None = None
    # vLLM and SGLang name the stop string that ended the text here (an int is a stop token id).
    stop_reason: str | int | None = None
    stop: str | int | None = None


# A token count is never negative, and two of them add up within 64 bits (translators report
# the total, and orjson writes 64-bit integers only): a count past that is a malformed answer.
TokenCount = Annotated[int, msgspec.Meta(ge=0, lt=2**62)]


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = None


class Completion(msgspec.Struct, frozen=True):
    """A `chat.completion` or one `chat.completion.chunk`."""

    id: str | None = None
    choices: list[Choice] = msgspec.field(default_factory=list)
    usage: Usage | None = None

    def first_choice(self) -> Choice | None:
        """The choice with index 0: the translators serve one candidate."""
        return next((c for c in self.choices if c.index == 0), None)


_T = TypeVar("_T")


def _convert(value: object, kind: type[_T], what: str) -> _T:
    if isinstance(value, dict) and "error" in value:
        raise BackendUnreachable(f"backend reported an error: {_error_text(value['error'])}")
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise BackendUnreachable(f"backend sent a malformed {what}: {exc}") from None


def _error_text(error: object) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return orjson.dumps(error).decode()


def decode_completion(value: object) -> Completion:
    """A decoded `chat.completion` body as a `Completion`; `BackendUnreachable` if malformed."""
    return _convert(value, Completion, "chat completion")


def decode_chunk(value: object) -> Completion:
    """A decoded `chat.completion.chunk` as a `Completion`; `BackendUnreachable` if malformed."""
    return _convert(value, Completion, "chat completion chunk")


def matched_stop(choice: Choice) -> str | None:
    """The stop string the backend says ended the text, when it says so."""
    for value in (choice.stop_reason, choice.stop):
        if isinstance(value, str) and value:
            return value
    return None


def parse_arguments(arguments: str | None) -> dict[str, Any]:
    """A tool call's arguments as an object; `{}` when empty, invalid or not an object."""
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def dumps(value: object) -> str:
    """Compact JSON text, as the chat API carries tool arguments and tool results."""
    return orjson.dumps(value).decode()


def stream_options(stream: bool) -> dict[str, object]:
    """The chat request fields that ask for a stream with a usage chunk at its end."""
    if not stream:
        return {}
    return {"stream": True, "stream_options": {"include_usage": True}}
