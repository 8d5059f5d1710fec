"""A Responses API request as a chat-completions request (pure)."""

from __future__ import annotations

from typing import Any

from proxy.errors import InvalidRequest
from proxy.translate.chat import stream_options as chat_stream_options

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TOOL_CHOICES = ("none", "auto", "required")
FORMATS = ("text", "json_object", "json_schema")
NUMBER = (int, float)


def to_chat_request(body: object, *, upstream_model: str) -> dict[str, object]:
    """The chat request that asks the backend what a Responses API request asks."""
    req = _object(body, "body")
    for key in ("previous_response_id", "conversation", "prompt"):
        if req.get(key) is not None:
            raise InvalidRequest(
                f"{key}: not supported: this gateway stores no responses, "
                "conversations or prompts; send the whole input instead"
            )
    if req.get("background"):
        raise InvalidRequest("background: not supported: this gateway answers in the foreground")
    instructions = _get(req, "instructions", "", str, "a string")
    messages = [] if instructions is None else [{"role": "system", "content": instructions}]
    chat: dict[str, object] = {
        "model": upstream_model,
        "messages": messages + _input_messages(req.get("input")),
    }
    tokens = _get(req, "max_output_tokens", "", int, "a positive integer")
    if tokens is not None and tokens < 1:
        raise InvalidRequest("max_output_tokens: expected a positive integer")
    tools = _get(req, "tools", "", list, "a list")
    fields = {
        "max_tokens": tokens,
        "temperature": _get(req, "temperature", "", NUMBER, "a number"),
        "top_p": _get(req, "top_p", "", NUMBER, "a number"),
        "tools": None if tools is None else [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)],
        "tool_choice": None if req.get("tool_choice") is None else _tool_choice(req["tool_choice"]),
        "parallel_tool_calls": _get(req, "parallel_tool_calls", "", bool, "true or false"),
        "response_format": _response_format(req.get("text")),
        "user": _get(req, "user", "", str, "a string"),
    }
    chat.update((key, value) for key, value in fields.items() if value is not None)
    chat.update(chat_stream_options(_get(req, "stream", "", bool, "true or false") is True))
    return chat


def _input_messages(value: object) -> list[dict[str, Any]]:
    if value is None:
        raise InvalidRequest("input: required: a string or a list of input items")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for i, raw in enumerate(_list(value, "input")):
        path = f"input[{i}]."
        item = _object(raw, path[:-1])
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, path))
        elif kind == "function_call":
            function = {
                "name": _str(item, "name", path),
                "arguments": _str(item, "arguments", path),
            }
            call = {"id": _str(item, "call_id", path), "type": "function", "function": function}
            if messages and messages[-1]["role"] == "assistant":  # parallel calls: one message
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = _tool_output(item.get("output"), f"{path}output")
            messages.append(
                {"role": "tool", "tool_call_id": _str(item, "call_id", path), "content": output}
            )
        elif kind == "item_reference":
            raise InvalidRequest(
                f"{path}type: 'item_reference' needs stored items; this "
                "gateway stores none, so send the item itself"
            )
        elif kind != "reasoning":  # earlier reasoning: chat backends take none back
            raise InvalidRequest(f"{path}type: unsupported input item type {kind!r}")
    if not messages:
        raise InvalidRequest("input: must hold at least one message")
    return messages


def _message(item: dict[str, Any], path: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRequest(
            f"{path}role: expected user, assistant, system or developer, got {role!r}"
        )
    content = item.get("content")
    if not isinstance(content, str):
        parts = _list(content, f"{path}content")
        content = [_part(p, f"{path}content[{j}].", role) for j, p in enumerate(parts)]
        if len(content) == 1 and content[0]["type"] == "text":
            content = content[0]["text"]
    return {"role": _ROLES[role], "content": content}


def _part(raw: object, path: str, role: str) -> dict[str, Any]:
    part = _object(raw, path[:-1])
    kind = part.get("type")
    if kind in ("input_text", "output_text", "refusal"):
        return {
            "type": "text",
            "text": _str(part, "refusal" if kind == "refusal" else "text", path),
        }
    if kind == "input_image":
        if role != "user":
            raise InvalidRequest(f"{path}type: images are only allowed in user messages")
        if part.get("image_url") is None:
            raise InvalidRequest(
                f"{path}image_url: required: this gateway stores no files, so "
                "send the image as a URL or a data: URL, not a file_id"
            )
        image = {"url": _str(part, "image_url", path)}
        if (detail := _get(part, "detail", path, str, "a string")) is not None:
            image["detail"] = detail
        return {"type": "image_url", "image_url": image}
    if kind in ("input_file", "input_audio"):
        raise InvalidRequest(f"{path}type: {kind!r} is not supported on this backend")
    raise InvalidRequest(f"{path}type: unknown content type {kind!r}")


def _tool_output(value: object, path: str) -> str:
    if isinstance(value, str):
        return value
    texts = []
    for j, raw in enumerate(_list(value, path)):
        part = _object(raw, f"{path}[{j}]")
        if part.get("type") != "input_text":
            raise InvalidRequest(
                f"{path}[{j}].type: a function_call_output takes input_text "
                f"parts only, got {part.get('type')!r}"
            )
        texts.append(_str(part, "text", f"{path}[{j}]."))
    return "".join(texts)


def _tool(raw: object, path: str) -> dict[str, Any]:
    tool = _object(raw, path)
    if tool.get("type") != "function":
        raise InvalidRequest(
            f"{path}.type: built-in tool {tool.get('type')!r} is not supported "
            "on this backend; only function tools are"
        )
    function = {
        "name": _str(tool, "name", f"{path}."),
        "description": _get(tool, "description", f"{path}.", str, "a string"),
        "parameters": _get(tool, "parameters", f"{path}.", dict, "an object"),
        "strict": _get(tool, "strict", f"{path}.", bool, "true or false"),
    }
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def _tool_choice(value: object) -> object:
    if isinstance(value, str) and value in TOOL_CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": _str(value, "name", "tool_choice.")}}
    raise InvalidRequest(
        "tool_choice: expected none, auto, required or "
        f'{{"type": "function", "name": ...}}, got {value!r}'
    )


def _response_format(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    fmt = _object(_object(value, "text").get("format", {"type": "text"}), "text.format")
    kind = fmt.get("type")
    if kind not in FORMATS:
        raise InvalidRequest(
            f"text.format.type: expected one of {', '.join(FORMATS)}, got {kind!r}"
        )
    if kind != "json_schema":
        return None if kind == "text" else {"type": kind}
    path = "text.format."
    schema = {
        "name": _str(fmt, "name", path),
        "schema": _object(fmt.get("schema"), f"{path}schema"),
        "description": _get(fmt, "description", path, str, "a string"),
        "strict": _get(fmt, "strict", path, bool, "true or false"),
    }
    return {
        "type": "json_schema",
        "json_schema": {k: v for k, v in schema.items() if v is not None},
    }


def _get(obj: dict[str, Any], key: str, path: str, kind: Any, what: str) -> Any:
    """`obj[key]` if present and of `kind` (a bool is no number), None if absent, else a 400."""
    value = obj.get(key)
    if value is not None and (
        not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
    ):
        raise InvalidRequest(f"{path}{key}: expected {what}")
    return value


def _str(obj: dict[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{path}{key}: expected a string")
    return value


def _object(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{path}: expected an object")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{path}: expected a list")
    return value
