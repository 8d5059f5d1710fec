"""An Anthropic Messages request as the equivalent OpenAI chat-completions request.

`decode_request` checks the shapes (see `anthropic_types`); this module checks what the shapes
cannot say (which blocks belong in which turn, images without vision) and rebuilds the request
as a chat request. Every mistake is an `InvalidRequest` naming the path of the bad value.
"""

from __future__ import annotations

from proxy.errors import InvalidRequest
from proxy.translate.anthropic_types import (
    Base64Source,
    Block,
    ChooseAny,
    ChooseAuto,
    ChooseNone,
    ChooseTool,
    ImageBlock,
    TextBlock,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
    UrlSource,
    decode_request,
)
from proxy.translate.chat import dumps, stream_options


def to_chat_request(
    body: object, *, upstream_model: str, vision: bool = False
) -> dict[str, object]:
    """The chat request for a decoded Messages request body; `InvalidRequest` if it is malformed."""
    request = decode_request(body)
    if not request.messages:
        raise InvalidRequest("messages: at least one message is required")
    messages = _system(request.system)
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
        elif not message.content:
            raise InvalidRequest(f"{where}.content: at least one content block is required")
        elif message.role == "user":
            messages.extend(_user_turn(message.content, where, vision))
        else:
            messages.append(_assistant_turn(message.content, where))
    chat: dict[str, object] = {
        "model": upstream_model,
        "messages": messages,
        "max_tokens": request.max_tokens,
    }
    if request.stop_sequences:
        chat["stop"] = list(request.stop_sequences)
    sampling = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,  # not OpenAI's, but vLLM, SGLang, TGI and llama.cpp read it
        "user": request.metadata.user_id if request.metadata else None,
    }
    chat.update({key: value for key, value in sampling.items() if value is not None})
    chat.update(_tools(request.tools, request.tool_choice))
    if request.output_config and request.output_config.format:
        spec = {"name": "response", "schema": request.output_config.format.schema}
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    chat.update(stream_options(request.stream))
    return chat


def _system(system: str | list[TextBlock] | None) -> list[dict[str, object]]:
    text = system if isinstance(system, str) else "\n".join(b.text for b in system or ())
    return [{"role": "system", "content": text}] if text else []


def _user_turn(blocks: list[Block], where: str, vision: bool) -> list[dict[str, object]]:
    """Tool results become `tool` messages, which must follow the assistant's calls at once,
    so they come first; the turn's text and images follow as one user message."""
    results: list[dict[str, object]] = []
    parts: list[dict[str, object]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image(block, at, vision))
        elif isinstance(block, ToolResultBlock):
            results.append(_tool_result(block, at, vision, parts))
        else:
            kind = "tool_use" if isinstance(block, ToolUseBlock) else "thinking"
            raise InvalidRequest(f"{at}.type: {kind} blocks belong in assistant messages")
    if parts:
        results.append({"role": "user", "content": _content(parts)})
    return results


def _tool_result(
    block: ToolResultBlock, at: str, vision: bool, parts: list[dict[str, object]]
) -> dict[str, object]:
    """A `tool` message; images in the result join the user parts (tool messages carry text)."""
    if isinstance(block.content, str):
        text = block.content
    else:
        texts = []
        for k, item in enumerate(block.content):
            if isinstance(item, TextBlock):
                texts.append(item.text)
            else:
                parts.append(_image(item, f"{at}.content[{k}]", vision))
        text = "\n".join(texts)
    if block.is_error:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}


def _assistant_turn(blocks: list[Block], where: str) -> dict[str, object]:
    texts: list[str] = []
    calls: list[dict[str, object]] = []
    for j, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            function = {"name": block.name, "arguments": dumps(block.input)}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, ImageBlock | ToolResultBlock):
            kind = "image" if isinstance(block, ImageBlock) else "tool_result"
            at = f"{where}.content[{j}]"
            raise InvalidRequest(f"{at}.type: {kind} blocks belong in user messages")
        # Thinking blocks are the model's own earlier reasoning: a chat backend has no slot for it.
    turn: dict[str, object] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
    if calls:
        turn["tool_calls"] = calls
    elif not texts:
        turn["content"] = ""
    return turn


def _image(block: ImageBlock, at: str, vision: bool) -> dict[str, object]:
    if not vision:
        raise InvalidRequest(f"{at}: image input needs a model with vision, and this one has none")
    source = block.source
    if isinstance(source, Base64Source):
        url = f"data:{source.media_type};base64,{source.data}"
    elif isinstance(source, UrlSource):
        url = source.url
    else:
        raise InvalidRequest(
            f"{at}.source.type: 'file' sources are not supported; use base64 or url"
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _content(parts: list[dict[str, object]]) -> object:
    """Plain text as one string (every backend reads that), else the list of parts."""
    if all(part["type"] == "text" for part in parts):
        return "\n".join(str(part["text"]) for part in parts)
    return parts


def _tools(tools: list[Tool] | None, choice: ToolChoice | None) -> dict[str, object]:
    out: dict[str, object] = {}
    specs: list[dict[str, object]] = []
    for i, tool in enumerate(tools or ()):
        if tool.type not in (None, "custom"):
            raise InvalidRequest(f"tools[{i}].type: server tool {tool.type!r} is not supported")
        if tool.input_schema is None:
            raise InvalidRequest(f"tools[{i}].input_schema: field required")
        function: dict[str, object] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        specs.append({"type": "function", "function": function})
    names = {tool.name for tool in tools or ()}
    if specs:
        out["tools"] = specs
    if choice is None:
        return out
    if isinstance(choice, ChooseAny | ChooseTool) and not names:
        raise InvalidRequest("tool_choice: forcing a tool call needs a non-empty tools list")
    if isinstance(choice, ChooseTool) and choice.name not in names:
        raise InvalidRequest(f"tool_choice.name: no tool named {choice.name!r} in tools")
    if not names:
        return out
    if isinstance(choice, ChooseTool):
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        modes = {ChooseAuto: "auto", ChooseAny: "required", ChooseNone: "none"}
        out["tool_choice"] = modes[type(choice)]
    if choice.disable_parallel_tool_use:
        out["parallel_tool_calls"] = False
    return out
