"""The OpenAI Responses API served from a chat-completions backend (TGI, or `openai` when told so).

`to_chat_request` turns a `/v1/responses` request into a chat request, `from_chat_response` turns
the backend's `chat.completion` into a Response object, and `ResponsesStream` turns its
`chat.completion.chunk`s into the Responses event stream. The gateway stores nothing, so whatever
needs a stored response, conversation or prompt is refused with a 400 that says so.
"""

from __future__ import annotations

from typing import Any, cast

import orjson

from proxy.errors import BackendUnreachable, InvalidRequest
from proxy.translate.chat import (
    Completion,
    FunctionCall,
    Message,
    Usage,
    decode_chunk,
    decode_completion,
)
from proxy.translate.chat import stream_options as chat_stream_options

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TOOL_CHOICES = ("none", "auto", "required")
_FORMATS = ("text", "json_object", "json_schema")
_NUMBER = (int, float)


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
        "temperature": _get(req, "temperature", "", _NUMBER, "a number"),
        "top_p": _get(req, "top_p", "", _NUMBER, "a number"),
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
    if isinstance(value, str) and value in _TOOL_CHOICES:
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
    if kind not in _FORMATS:
        raise InvalidRequest(
            f"text.format.type: expected one of {', '.join(_FORMATS)}, got {kind!r}"
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


def from_chat_response(
    chat: object, *, model: str, response_id: str, created_at: int, request: object = None
) -> dict[str, object]:
    """The Response object for a decoded `chat.completion`; `BackendUnreachable` if malformed.

    `request` is the client's Responses request, whose settings a Response repeats (instructions,
    tools, temperature, ...); without it they take their defaults.
    """
    completion = decode_completion(chat)
    choice = completion.first_choice()
    if choice is None or choice.message is None:
        raise BackendUnreachable("backend sent a chat completion with no choices")
    status, reason = _status(choice.finish_reason)
    calls = choice.message.tool_calls or []
    output: list[dict[str, Any]] = []
    if choice.message.content or not calls:
        item = _message_item(response_id, 0, "incomplete" if reason else "completed")
        item["content"] = [_text_part(choice.message.content or "")]
        output.append(item)
    for call in calls:
        function = call.function or FunctionCall()
        item = _call_item(response_id, len(output), call.id, function.name, "completed")
        item["arguments"] = function.arguments or ""
        output.append(item)
    head = _head(response_id, created_at, model, request)
    return _response(head, status, reason, output, completion.usage)


class ResponsesStream:
    """Turns one chat completion stream into the Responses API's events, chunk by chunk.

    `feed` takes each decoded chunk and raises `BackendUnreachable` for a malformed or error
    chunk (the caller then ends the stream with `failed`); `finish` follows `[DONE]`. Items come
    one at a time, as OpenAI sends them: each is closed before the next one opens.
    """

    def __init__(
        self, *, model: str, response_id: str, created_at: int, request: object = None
    ) -> None:
        self._id = response_id
        self._head = _head(response_id, created_at, model, request)
        self._sequence = 0
        self._started = self._ended = False
        self._output: list[dict[str, Any]] = []
        self._open: int | None = None  # output index of the item still taking deltas
        self._calls: dict[int, int] = {}  # chat tool call index -> output index
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    def feed(self, chunk: dict[str, object]) -> bytes:
        """The SSE bytes of the events one chunk implies (often one, sometimes none or several)."""
        if self._ended:
            return b""
        completion = decode_chunk(chunk)
        self._usage = completion.usage or self._usage
        return self._start() + self._choice(completion)

    def finish(self) -> bytes:
        """Each open item's closing events, then `response.completed` (or `.incomplete`)."""
        if self._ended:
            return b""
        out = self._start() + self._close()
        self._ended = True
        status, reason = _status(self._finish_reason)
        response = _response(self._head, status, reason, self._output, self._usage)
        return out + self._event(f"response.{status}", response=response)

    def failed(self, message: str) -> bytes:
        """A `response.failed` event that ends a stream the backend broke off midway."""
        if self._ended:
            return b""
        out = self._start()
        self._ended = True
        for item in self._output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        response = _response(self._head, "failed", None, self._output, self._usage)
        response["error"] = {"code": "server_error", "message": message}
        return out + self._event("response.failed", response=response)

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        response = _response(self._head, "in_progress", None, [], None)
        created = self._event("response.created", response=response)
        return created + self._event("response.in_progress", response=response)

    def _choice(self, completion: Completion) -> bytes:
        choice = completion.first_choice()
        if choice is None:
            return b""
        self._finish_reason = choice.finish_reason or self._finish_reason
        delta = choice.delta or Message()
        out = self._text(delta.content) if delta.content else b""
        for position, call in enumerate(delta.tool_calls or ()):
            function = call.function or FunctionCall()
            index = call.index if call.index is not None else position
            if index not in self._calls:
                out += self._close()
                self._open = self._calls[index] = len(self._output)
                out += self._add(_call_item(self._id, self._open, call.id, function.name))
            elif self._calls[index] != self._open:
                raise BackendUnreachable("backend went back to a tool call it had ended")
            if function.arguments:
                self._output[self._calls[index]]["arguments"] += function.arguments
                out += self._item_event("function_call_arguments.delta", delta=function.arguments)
        return out

    def _text(self, text: str) -> bytes:
        out = b""
        if self._open is None or self._output[self._open]["type"] != "message":
            out += self._close()
            self._open = len(self._output)
            item = _message_item(self._id, self._open, "in_progress")
            out += self._add(item)
            item["content"] = [_text_part("")]
            out += self._item_event("content_part.added", content_index=0, part=_text_part(""))
        self._output[self._open]["content"][0]["text"] += text
        return out + self._item_event("output_text.delta", content_index=0, delta=text, logprobs=[])

    def _add(self, item: dict[str, Any]) -> bytes:
        self._output.append(item)
        return self._event("response.output_item.added", output_index=self._open, item=item)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        item = self._output[self._open]
        item["status"] = "incomplete" if _status(self._finish_reason)[1] else "completed"
        if item["type"] == "function_call":
            out = self._item_event("function_call_arguments.done", arguments=item["arguments"])
        else:
            part = item["content"][0]
            out = self._item_event(
                "output_text.done", content_index=0, text=part["text"], logprobs=[]
            )
            out += self._item_event("content_part.done", content_index=0, part=part)
        out += self._event("response.output_item.done", output_index=self._open, item=item)
        self._open = None
        return out

    def _item_event(self, name: str, **data: object) -> bytes:
        """An event about the open item, which names it by id and output index."""
        index = cast(int, self._open)  # only ever called with an item open
        item_id = self._output[index]["id"]
        return self._event(f"response.{name}", item_id=item_id, output_index=index, **data)

    def _event(self, name: str, **data: object) -> bytes:
        event = {"type": name, "sequence_number": self._sequence, **data}
        self._sequence += 1
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def _status(finish_reason: str | None) -> tuple[str, str | None]:
    if finish_reason in ("length", "content_filter"):
        return "incomplete", "max_output_tokens" if finish_reason == "length" else finish_reason
    return "completed", None


def _item_id(prefix: str, response_id: str, index: int) -> str:
    return f"{prefix}_{response_id.removeprefix('resp_')}_{index}"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message_item(response_id: str, index: int, status: str) -> dict[str, Any]:
    item_id = _item_id("msg", response_id, index)
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": []}


def _call_item(
    response_id: str, index: int, call_id: str | None, name: str | None, status: str = "in_progress"
) -> dict[str, Any]:
    call_id = call_id or _item_id("call", response_id, index)
    item = {"id": _item_id("fc", response_id, index), "type": "function_call", "status": status}
    return {**item, "call_id": call_id, "name": name or "", "arguments": ""}


def _head(response_id: str, created_at: int, model: str, request: object) -> dict[str, object]:
    """The fields a Response has from start to end: ids, and the request settings it repeats."""
    head = {"id": response_id, "object": "response", "created_at": created_at, "model": model}
    return {**head, "background": False, "error": None, **_echo(request)}


def _response(
    head: dict[str, object],
    status: str,
    reason: str | None,
    output: list[dict[str, Any]],
    usage: Usage | None,
) -> dict[str, object]:
    details = None if reason is None else {"reason": reason}
    return {
        **head,
        "status": status,
        "incomplete_details": details,
        "output": output,
        "usage": _usage(usage),
    }


def _usage(usage: Usage | None) -> dict[str, object] | None:
    if usage is None:
        return None
    prompt, completion = usage.prompt_tokens or 0, usage.completion_tokens or 0
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": prompt + completion,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _echo(request: object) -> dict[str, object]:
    """The request settings a Response repeats, each only where it has the right shape."""
    req: dict[str, Any] = request if isinstance(request, dict) else {}
    kinds: dict[str, Any] = {
        "instructions": str,
        "max_output_tokens": int,
        "temperature": _NUMBER,
        "top_p": _NUMBER,
        "user": str,
        "metadata": dict,
        "parallel_tool_calls": bool,
    }
    echo: dict[str, object] = {key: None for key in kinds}
    for key, kind in kinds.items():
        if isinstance(req.get(key), kind) and (kind is bool or not isinstance(req[key], bool)):
            echo[key] = req[key]
    raw_tools = req.get("tools")
    tools = [
        {
            "type": "function",
            "name": t["name"],
            "description": t.get("description"),
            "parameters": t.get("parameters"),
            "strict": t.get("strict"),
        }
        for t in (raw_tools if isinstance(raw_tools, list) else [])
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)
    ]
    choice = req.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("name"), str):
        choice = {"type": "function", "name": choice["name"]}
    elif choice not in _TOOL_CHOICES:
        choice = "auto"
    text = req.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") not in _FORMATS:
        fmt = {"type": "text"}
    echo["metadata"] = echo["metadata"] or {}
    echo["parallel_tool_calls"] = echo["parallel_tool_calls"] is not False
    fixed = {"previous_response_id": None, "store": False, "truncation": "disabled"}
    return {**echo, **fixed, "text": {"format": fmt}, "tool_choice": choice, "tools": tools}
