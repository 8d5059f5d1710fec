"""A chat completion (whole, or as a stream of chunks) as an Anthropic Messages response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import orjson

from proxy.errors import BackendUnreachable
from proxy.translate.chat import (
    Completion,
    FunctionCall,
    Message,
    ToolCall,
    Usage,
    decode_chunk,
    decode_completion,
    matched_stop,
    parse_arguments,
)

_STOP_REASONS = {"length": "max_tokens", "content_filter": "refusal"}


def stop_reason(
    finish_reason: str | None,
    matched: str | None,
    stop_sequences: list[str] | None,
    *,
    tool_use: bool,
) -> tuple[str, str | None]:
    """Anthropic's `(stop_reason, stop_sequence)` for a chat choice's ending."""
    if finish_reason in ("tool_calls", "function_call") or (tool_use and finish_reason == "stop"):
        return ("tool_use" if tool_use else "end_turn"), None
    asked = stop_sequences is None or matched in stop_sequences
    if finish_reason == "stop" and matched and asked:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish_reason or "", "end_turn"), None


def make_message_id(chat_id: str | None) -> str:
    """An Anthropic-looking message id made from the backend's completion id."""
    return f"msg_{chat_id or 'gateway'}"


def from_chat_response(
    chat: object,
    *,
    model: str,
    message_id: str | None = None,
    stop_sequences: list[str] | None = None,
) -> dict[str, object]:
    """The Messages response for a decoded `chat.completion`; `BackendUnreachable` if malformed.

    `stop_sequences` are the request's: a stop string the backend reports is only called a
    `stop_sequence` when the client asked for it.
    """
    completion = decode_completion(chat)
    choice = completion.first_choice()
    if choice is None:
        raise BackendUnreachable("backend sent a chat completion with no choices")
    msg_id = message_id or make_message_id(completion.id)
    message = choice.message or Message()
    content: list[dict[str, object]] = []
    if message.content:
        content.append({"type": "text", "text": message.content})
    for i, call in enumerate(message.tool_calls or ()):
        function = call.function or FunctionCall()
        content.append(
            {
                "type": "tool_use",
                "id": call.id or f"toolu_{msg_id}_{i}",
                "name": function.name or "",
                "input": parse_arguments(function.arguments),
            }
        )
    reason, sequence = stop_reason(
        choice.finish_reason,
        matched_stop(choice),
        stop_sequences,
        tool_use=bool(message.tool_calls),
    )
    usage = completion.usage or Usage()
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {
            "input_tokens": usage.prompt_tokens or 0,
            "output_tokens": usage.completion_tokens or 0,
        },
    }


def _event(name: str, data: Mapping[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicStream:
    """Turns chat.completion.chunk values into Anthropic's stream events, one chunk at a time.

    `feed` each decoded chunk, then call `finish` after `[DONE]` (or when the stream ends): it
    emits whatever closing events are still owed. The closing `message_delta` goes out as soon as
    both the finish reason and the usage chunk have been seen, or at `finish`.
    """

    def __init__(
        self, *, model: str, message_id: str, stop_sequences: list[str] | None = None
    ) -> None:
        self._model = model
        self._id = message_id
        self._stop_sequences = stop_sequences
        self._started = False
        self._done = False
        self._open: int | None = None  # index of the content block now open
        self._open_kind: Literal["text", "tool_use"] | None = None
        self._blocks = 0  # content blocks started so far
        self._tool_blocks: dict[int, int] = {}  # chat tool-call index -> content block index
        self._finish_reason: str | None = None
        self._matched: str | None = None
        self._usage: Usage | None = None
        self._output_chunks = 0  # estimates output tokens when the backend sends no usage

    def feed(self, chunk: dict[str, object]) -> bytes:
        """The SSE bytes of the events one chunk implies (often none, sometimes several)."""
        if self._done:
            return b""
        completion = decode_chunk(chunk)
        if completion.usage is not None:
            self._usage = completion.usage
        out = bytearray(self._start())
        out += self._choice(completion)
        if self._finish_reason is not None and self._usage is not None:
            out += self._end()
        return bytes(out)

    def finish(self) -> bytes:
        """The closing events still owed: `message_start` too if no chunk ever came."""
        if self._done:
            return b""
        return self._start() + self._end()

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        input_tokens = self._usage.prompt_tokens or 0 if self._usage else 0
        message: dict[str, object] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _choice(self, completion: Completion) -> bytes:
        choice = completion.first_choice()
        if choice is None:
            return b""
        out = bytearray()
        delta = choice.delta or Message()
        if delta.content or delta.tool_calls:
            self._output_chunks += 1
        if delta.content:
            if self._open_kind != "text":
                out += self._open_block({"type": "text", "text": ""}, "text")
            text_delta: dict[str, object] = {"type": "text_delta", "text": delta.content}
            out += self._delta(text_delta)
        for position, call in enumerate(delta.tool_calls or ()):
            out += self._tool_call(call, position)
        if choice.finish_reason is not None:
            self._finish_reason = choice.finish_reason
            self._matched = matched_stop(choice)
            out += self._close()
        return bytes(out)

    def _tool_call(self, call: ToolCall, position: int) -> bytes:
        index = call.index if call.index is not None else position
        function = call.function or FunctionCall()
        out = b""
        if index not in self._tool_blocks:
            block: dict[str, object] = {
                "type": "tool_use",
                "id": call.id or f"toolu_{self._id}_{index}",
                "name": function.name or "",
                "input": {},
            }
            out = self._open_block(block, "tool_use")
            self._tool_blocks[index] = self._blocks - 1
        elif self._tool_blocks[index] != self._open:
            raise BackendUnreachable(
                "backend interleaved the arguments of parallel tool calls, which an Anthropic "
                "stream cannot carry (its content blocks come one at a time)"
            )
        if function.arguments:
            out += self._delta({"type": "input_json_delta", "partial_json": function.arguments})
        return out

    def _open_block(self, block: dict[str, object], kind: Literal["text", "tool_use"]) -> bytes:
        out = self._close()
        self._open, self._open_kind = self._blocks, kind
        self._blocks += 1
        start = {"type": "content_block_start", "index": self._open, "content_block": block}
        return out + _event("content_block_start", start)

    def _delta(self, delta: dict[str, object]) -> bytes:
        event = {"type": "content_block_delta", "index": self._open, "delta": delta}
        return _event("content_block_delta", event)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open, self._open_kind = self._open, None, None
        return _event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _end(self) -> bytes:
        out = self._close()
        self._done = True
        reason, sequence = stop_reason(
            self._finish_reason,
            self._matched,
            self._stop_sequences,
            tool_use=bool(self._tool_blocks),
        )
        usage: dict[str, object] = {"output_tokens": self._output_chunks}
        if self._usage is not None:
            if self._usage.completion_tokens is not None:
                usage["output_tokens"] = self._usage.completion_tokens
            if self._usage.prompt_tokens is not None:
                usage["input_tokens"] = self._usage.prompt_tokens
        delta: dict[str, object] = {"stop_reason": reason, "stop_sequence": sequence}
        out += _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
        return out + _event("message_stop", {"type": "message_stop"})
