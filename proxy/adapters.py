"""One `Adapter` per foreign protocol: the pure translators bound to one request."""

from __future__ import annotations

import time
import uuid

import orjson

from proxy.errors import Dialect, InvalidRequest, ProxyError, sse_error
from proxy.translate import anthropic, gemini, oicm, responses
from proxy.translated import StreamTranslator

CHAT = "/v1/chat/completions"


class AnthropicAdapter:
    """Anthropic Messages over chat completions."""

    dialect: Dialect = "anthropic"
    upstream_path = CHAT
    heavy = False

    def __init__(self, body: dict[str, object], model: str, vision: bool) -> None:
        self.body = body
        self.model = model
        self.vision = vision
        self.stream = body.get("stream") is True
        stop = body.get("stop_sequences")
        self.stop = [s for s in stop if isinstance(s, str)] if isinstance(stop, list) else None
        self.message_id = "msg_" + uuid.uuid4().hex

    def chat_request(self, upstream_model: str) -> dict[str, object]:
        return anthropic.to_chat_request(
            self.body, upstream_model=upstream_model, vision=self.vision
        )

    def answer(self, chat: object) -> dict[str, object]:
        return anthropic.from_chat_response(
            chat, model=self.model, message_id=self.message_id, stop_sequences=self.stop
        )

    def stream_translator(self) -> StreamTranslator:
        return anthropic.AnthropicStream(
            model=self.model, message_id=self.message_id, stop_sequences=self.stop
        )

    def stream_failed(self, err: ProxyError) -> bytes:
        return sse_error(err, "anthropic")


class GeminiAdapter:
    """Gemini generateContent / streamGenerateContent over chat completions."""

    dialect: Dialect = "gemini"
    upstream_path = CHAT
    heavy = False

    def __init__(self, body: dict[str, object], model: str, stream: bool, vision: bool) -> None:
        self.body = body
        self.model = model
        self.stream = stream
        self.vision = vision

    def chat_request(self, upstream_model: str) -> dict[str, object]:
        return gemini.to_chat_request(
            self.body, upstream_model=upstream_model, stream=self.stream, vision=self.vision
        )

    def answer(self, chat: object) -> dict[str, object]:
        return gemini.from_chat_response(chat, model=self.model)

    def stream_translator(self) -> StreamTranslator:
        return gemini.GeminiStream(model=self.model)

    def stream_failed(self, err: ProxyError) -> bytes:
        return sse_error(err, "gemini")


class ResponsesAdapter:
    """The OpenAI Responses API over chat completions."""

    dialect: Dialect = "openai"
    upstream_path = CHAT
    heavy = False

    def __init__(self, body: dict[str, object], model: str, vision: bool) -> None:
        self.body = body
        self.model = model
        self.vision = vision
        self.stream = body.get("stream") is True
        self.response_id = "resp_" + uuid.uuid4().hex
        self.created_at = int(time.time())
        self._stream: responses.ResponsesStream | None = None

    def chat_request(self, upstream_model: str) -> dict[str, object]:
        if not self.vision:
            where = _input_image(self.body.get("input"))
            if where is not None:
                raise InvalidRequest(
                    f"{where}: image input needs a model with vision; this has none"
                )
        return responses.to_chat_request(self.body, upstream_model=upstream_model)

    def answer(self, chat: object) -> dict[str, object]:
        return responses.from_chat_response(
            chat,
            model=self.model,
            response_id=self.response_id,
            created_at=self.created_at,
            request=self.body,
        )

    def stream_translator(self) -> StreamTranslator:
        self._stream = responses.ResponsesStream(
            model=self.model,
            response_id=self.response_id,
            created_at=self.created_at,
            request=self.body,
        )
        return self._stream

    def stream_failed(self, err: ProxyError) -> bytes:
        # Responses clients drop bare error events; a stream ends with response.failed.
        if self._stream is None:
            return sse_error(err)
        return self._stream.failed(err.message)


def _input_image(items: object) -> str | None:
    """The path of the first `input_image` part of a Responses `input`, if any."""
    if not isinstance(items, list):
        return None
    for i, item in enumerate(items):
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "input_image":
                    return f"input[{i}].content[{j}]"
    return None


class _CompletionAsChatStream:
    """Text-completion chunks re-dressed as chat chunks, in OpenAI's SSE framing; the
    usage-only chunk only for a client that asked for it."""

    def __init__(self, usage_chunk: bool) -> None:
        self.usage_chunk = usage_chunk

    def feed(self, chunk: dict[str, object]) -> bytes:
        if not self.usage_chunk and chunk.get("choices") == [] and "usage" in chunk:
            return b""  # the answer to the gateway's own question (usage.streams)
        return b"data: " + orjson.dumps(oicm.completion_chunk_to_chat_chunk(chunk)) + b"\n\n"

    def finish(self) -> bytes:
        return b"data: [DONE]\n\n"


class ChatTemplateAdapter:
    """A chat request carrying `chat_template`, rendered here into a /v1/completions prompt
    for backends that do not take the field themselves; answers come back in chat shape."""

    dialect: Dialect = "openai"
    upstream_path = "/v1/completions"
    heavy = True  # compiling and rendering a client's template is Python work without a bound in C

    def __init__(self, body: dict[str, object]) -> None:
        self.body = body
        self.stream = body.get("stream") is True
        options = body.get("stream_options")
        self.options = options if isinstance(options, dict) else {}
        self.asked = self.options.get("include_usage") is True  # the client wants the chunk

    def chat_request(self, upstream_model: str) -> dict[str, object]:
        completion = oicm.chat_template_to_completion_request(
            self.body, upstream_model=upstream_model
        )
        if self.stream:  # a translated stream always asks, as the other translations do
            completion["stream_options"] = {**self.options, "include_usage": True}
        return completion

    def answer(self, chat: object) -> dict[str, object]:
        return oicm.completion_to_chat(chat)

    def stream_translator(self) -> StreamTranslator:
        return _CompletionAsChatStream(usage_chunk=self.asked)

    def stream_failed(self, err: ProxyError) -> bytes:
        return sse_error(err)
