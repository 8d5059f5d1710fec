"""The Anthropic Messages request, as msgspec Structs, and its decoder.

The Structs mirror the Messages API. Unknown fields are ignored (Anthropic's API has many the
chat API has no use for: `cache_control`, `citations`, `thinking`, ...); content blocks, image
sources and tool choices are tagged unions on `type`, so an unknown type is an error that names
its path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from proxy.errors import InvalidRequest


class _Block(msgspec.Struct, frozen=True, tag_field="type"):
    """Content blocks are told apart by their `type`."""


class TextBlock(_Block, frozen=True, tag="text"):
    text: str


class Base64Source(msgspec.Struct, frozen=True, tag_field="type", tag="base64"):
    media_type: str
    data: str


class UrlSource(msgspec.Struct, frozen=True, tag_field="type", tag="url"):
    url: str


class FileSource(msgspec.Struct, frozen=True, tag_field="type", tag="file"):
    file_id: str


class ImageBlock(_Block, frozen=True, tag="image"):
    source: Base64Source | UrlSource | FileSource


class ToolUseBlock(_Block, frozen=True, tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block, frozen=True, tag="tool_result"):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] = ""
    is_error: bool = False


class ThinkingBlock(_Block, frozen=True, tag="thinking"):
    thinking: str = ""


class RedactedThinkingBlock(_Block, frozen=True, tag="redacted_thinking"):
    data: str = ""


Block = (
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
)


class InputMessage(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(msgspec.Struct, frozen=True):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class _Choice(msgspec.Struct, frozen=True, tag_field="type"):
    disable_parallel_tool_use: bool | None = None


class ChooseAuto(_Choice, frozen=True, tag="auto"):
    pass


class ChooseAny(_Choice, frozen=True, tag="any"):
    pass


class ChooseTool(_Choice, frozen=True, tag="tool"):
    name: str = ""


class ChooseNone(_Choice, frozen=True, tag="none"):
    pass


class JsonSchemaFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_schema"):
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, frozen=True):
    format: JsonSchemaFormat | None = None  # `effort` has no chat counterpart: ignored


ToolChoice = ChooseAuto | ChooseAny | ChooseTool | ChooseNone


class Metadata(msgspec.Struct, frozen=True):
    user_id: str | None = None


class MessagesRequest(msgspec.Struct, frozen=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]  # first: its absence is the common mistake
    model: str
    messages: list[InputMessage]
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    stream: bool = False


_MISSING = re.compile(r"Object missing required field `(.+)`")


def decode_request(body: object) -> MessagesRequest:
    """The typed request for a decoded JSON body; `InvalidRequest` naming the path if it is off."""
    try:
        return msgspec.convert(body, MessagesRequest)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None


def _invalid(error: str) -> InvalidRequest:
    """msgspec's "Expected `int`, got `str` - at `$.max_tokens`" as "max_tokens: expected ..."."""
    detail, found, where = error.partition(" - at `")
    path = where.rstrip("`").removeprefix("$").removeprefix(".") if found else ""
    if missing := _MISSING.fullmatch(detail):
        path = f"{path}.{missing[1]}" if path else missing[1]
        detail = "field required"
    elif detail.startswith("Invalid value ") and path.endswith("type"):
        kind = "content block"
        if path.endswith("source.type"):
            kind = "image source"
        elif path.startswith(("tool_choice", "output_config")):
            kind = path.split(".")[0]
        detail = f"unknown {kind} type {detail.removeprefix('Invalid value ')}"
    else:
        detail = detail[:1].lower() + detail[1:]
    return InvalidRequest(f"{path or 'request body'}: {detail}")
