"""A chat completion (whole, or as a stream of chunks) as a Gemini GenerateContentResponse."""

from __future__ import annotations

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
    parse_arguments,
)

_FINISH_REASONS = {
    "stop": "STOP",
    "tool_calls": "STOP",  # Gemini ends a turn of function calls with STOP too
    "function_call": "STOP",
    "length": "MAX_TOKENS",
    "content_filter": "SAFETY",
}


def finish_reason(reason: str | None) -> str:
    """Gemini's `finishReason` for a chat choice's `finish_reason` (none said: a plain stop)."""
    return "STOP" if reason is None else _FINISH_REASONS.get(reason, "OTHER")


def function_call(
    call_id: str | None, name: str | None, arguments: str | None
) -> dict[str, object]:
    """A `functionCall` part; `args` is `{}` when the backend's arguments are not a JSON object."""
    call: dict[str, object] = {"name": name or "", "args": parse_arguments(arguments)}
    if call_id:
        call["id"] = call_id
    return {"functionCall": call}


def usage_metadata(usage: Usage) -> dict[str, object]:
    counts = {
        "promptTokenCount": usage.prompt_tokens,
        "candidatesTokenCount": usage.completion_tokens,
    }
    metadata: dict[str, object] = {k: v for k, v in counts.items() if v is not None}
    metadata["totalTokenCount"] = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
    return metadata


def _response(
    parts: list[dict[str, object]],
    *,
    model: str,
    response_id: str | None,
    finish: str | None = None,
    usage: dict[str, object] | None = None,
) -> dict[str, object]:
    candidate: dict[str, object] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    response: dict[str, object] = {"candidates": [candidate]}
    if usage is not None:
        response["usageMetadata"] = usage
    response["modelVersion"] = model
    if response_id:
        response["responseId"] = response_id
    return response


def from_chat_response(chat: object, *, model: str) -> dict[str, object]:
    """The GenerateContentResponse for a decoded `chat.completion` (malformed: 502)."""
    completion = decode_completion(chat)
    choice = completion.first_choice()
    if choice is None:
        raise BackendUnreachable("backend sent a chat completion with no choices")
    message = choice.message or Message()
    parts: list[dict[str, object]] = [{"text": message.content}] if message.content else []
    for call in message.tool_calls or ():
        function = call.function or FunctionCall()
        parts.append(function_call(call.id, function.name, function.arguments))
    return _response(
        parts or [{"text": ""}],
        model=model,
        response_id=completion.id,
        finish=finish_reason(choice.finish_reason),
        usage=usage_metadata(completion.usage) if completion.usage else None,
    )


class _PendingCall:
    def __init__(self, call_id: str | None, name: str | None) -> None:
        self.id = call_id
        self.name = name
        self.arguments: list[str] = []


class GeminiStream:
    """Turns chat.completion.chunk values into Gemini's SSE stream, one chunk at a time.

    Text goes out as it comes. Function calls go out whole, on the last event, since a Gemini
    client reads `args` as an object, not as a string being written. The last event also carries
    `finishReason` and `usageMetadata`; it goes out once the finish reason and the usage chunk
    have been seen, or at `finish` (call it after `[DONE]`).
    """

    def __init__(self, *, model: str, response_id: str | None = None) -> None:
        self._model = model
        self._id = response_id
        self._calls: dict[int, _PendingCall] = {}
        self._finish_reason: str | None = None
        self._finished = False
        self._usage: Usage | None = None
        self._done = False
        self._output_chunks = 0  # estimates output tokens when the backend sends no usage

    def feed(self, chunk: dict[str, object]) -> bytes:
        """The SSE bytes of the events one chunk implies (often one, sometimes none)."""
        if self._done:
            return b""
        completion = decode_chunk(chunk)
        self._id = self._id or completion.id
        if completion.usage is not None:
            self._usage = completion.usage
        out = self._choice(completion)
        if self._finished and self._usage is not None:
            out += self._end()
        return out

    def finish(self) -> bytes:
        """The last event, if it is still owed."""
        return b"" if self._done else self._end()

    def _choice(self, completion: Completion) -> bytes:
        choice = completion.first_choice()
        if choice is None:
            return b""
        delta = choice.delta or Message()
        for position, call in enumerate(delta.tool_calls or ()):
            self._call(call, position)
        if delta.content or delta.tool_calls:
            self._output_chunks += 1
        if choice.finish_reason is not None:
            self._finish_reason = choice.finish_reason
            self._finished = True
        if not delta.content:
            return b""
        return self._event(
            _response([{"text": delta.content}], model=self._model, response_id=self._id)
        )

    def _call(self, call: ToolCall, position: int) -> None:
        index = call.index if call.index is not None else position
        function = call.function or FunctionCall()
        pending = self._calls.setdefault(index, _PendingCall(call.id, function.name))
        pending.id = pending.id or call.id
        pending.name = pending.name or function.name
        if function.arguments:
            pending.arguments.append(function.arguments)

    def _end(self) -> bytes:
        self._done = True
        parts = [
            function_call(c.id, c.name, "".join(c.arguments))
            for _, c in sorted(self._calls.items())
        ]
        usage = self._usage or Usage(completion_tokens=self._output_chunks)
        last = _response(
            parts or [{"text": ""}],
            model=self._model,
            response_id=self._id,
            finish=finish_reason(self._finish_reason),
            usage=usage_metadata(usage),
        )
        return self._event(last)

    @staticmethod
    def _event(response: dict[str, object]) -> bytes:
        return b"data: " + orjson.dumps(response) + b"\r\n\r\n"
