"""A chat completion (whole, or as a stream of chunks) as a Responses API answer (pure)."""

from __future__ import annotations

from typing import Any, cast

import orjson

from proxy.errors import BackendUnreachable
from proxy.translate.chat import (
    Completion,
    FunctionCall,
    Message,
    Usage,
    decode_chunk,
    decode_completion,
)
from proxy.translate.responses_request import FORMATS, NUMBER, TOOL_CHOICES


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
        "temperature": NUMBER,
        "top_p": NUMBER,
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
    elif choice not in TOOL_CHOICES:
        choice = "auto"
    text = req.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") not in FORMATS:
        fmt = {"type": "text"}
    echo["metadata"] = echo["metadata"] or {}
    echo["parallel_tool_calls"] = echo["parallel_tool_calls"] is not False
    fixed = {"previous_response_id": None, "store": False, "truncation": "disabled"}
    return {**echo, **fixed, "text": {"format": fmt}, "tool_choice": choice, "tools": tools}
