"""What the simulated backend says: OpenAI-shaped bodies and SSE events, built as bytes.

Pure functions and small precomputed tables, so the server module only moves bytes. Stream
events are assembled from a per-request prefix and suffix around a pre-escaped token, which
keeps the cost of one event to a couple of byte concatenations.
"""

from __future__ import annotations

import base64
import functools
import struct
import time
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

# A small deterministic vocabulary: token i of every completion is WORDS[i % len(WORDS)].
WORDS = (
    " The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
    " Streaming", " tokens", " arrive", " one", " by", " one", ",", " as", " from", " a", " GPU",
)  # fmt: skip
_WORDS_JSON = tuple(orjson.dumps(w) for w in WORDS)
EMBEDDING_DIMS = 8


def status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()


def json_response(status: int, body: bytes, *, keep_alive: bool = True) -> bytes:
    """A whole HTTP/1.1 response with a JSON body and Content-Length."""
    connection = b"keep-alive" if keep_alive else b"close"
    return b"".join(
        (
            status_line(status),
            b"content-type: application/json\r\nserver: simbackend\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: ",
            connection,
            b"\r\n\r\n",
            body,
        )
    )


def error_body(status: int, message: str, err_type: str) -> bytes:
    """vLLM's error shape: {"error": {"message", "type", "code"}}."""
    return orjson.dumps({"error": {"message": message, "type": err_type, "code": status}})


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\nserver: simbackend\r\ntransfer-encoding: chunked\r\n\r\n"
)
CHUNKED_END = b"0\r\n\r\n"


def http_chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying `payload` (one SSE event)."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


@functools.lru_cache(maxsize=256)
def token_text(count: int) -> str:
    """The text of a `count`-token completion (cached: benchmarks ask for a few sizes)."""
    return "".join(WORDS[i % len(WORDS)] for i in range(count))


def count_prompt_tokens(payload: dict[str, Any]) -> int:
    """A rough, deterministic prompt size: whitespace-separated words of every text field."""
    texts: list[str] = []
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list):
        texts.extend(p for p in prompt if isinstance(p, str))
    return max(1, sum(len(t.split()) for t in texts))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class Completion:
    """What one generation request asked for, decided before any byte is sent."""

    chat: bool
    request_id: str
    model: str
    created: int
    tokens: int
    finish_reason: str
    prompt_tokens: int
    include_usage: bool

    def body(self) -> bytes:
        """The non-streaming chat.completion or text_completion JSON."""
        text = token_text(self.tokens)
        choice: dict[str, Any]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = None
        choice["finish_reason"] = self.finish_reason
        return orjson.dumps(
            {
                "id": self.request_id,
                "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "usage": usage(self.prompt_tokens, self.tokens),
            }
        )


class StreamEvents:
    """The SSE events of one streamed completion, each already framed as an HTTP chunk."""

    def __init__(self, completion: Completion) -> None:
        self.completion = completion
        c = completion
        obj = "chat.completion.chunk" if c.chat else "text_completion"
        head = orjson.dumps({"id": c.request_id, "object": obj, "created": c.created})[:-1]
        self._head = b"data: " + head + b',"model":' + orjson.dumps(c.model)
        if c.chat:
            self._token_prefix = self._head + b',"choices":[{"index":0,"delta":{"content":'
            self._token_suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._token_prefix = self._head + b',"choices":[{"index":0,"text":'
            self._token_suffix = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def opening(self) -> bytes:
        """Events sent before the first token: the chat role delta (none for completions)."""
        if not self.completion.chat:
            return b""
        return http_chunk(
            self._head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def token(self, index: int) -> bytes:
        word = _WORDS_JSON[index % len(_WORDS_JSON)]
        return http_chunk(self._token_prefix + word + self._token_suffix)

    def closing(self) -> bytes:
        """The finish_reason event, the usage event when asked for, `[DONE]`, end of body."""
        c = self.completion
        reason = orjson.dumps(c.finish_reason)
        if c.chat:
            finish = b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
        else:
            finish = b',"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":'
        parts = [http_chunk(self._head + finish + reason + b"}]}\n\n")]
        if c.include_usage:
            usage_json = orjson.dumps(usage(c.prompt_tokens, c.tokens))
            parts.append(http_chunk(self._head + b',"choices":[],"usage":' + usage_json + b"}\n\n"))
        parts.append(http_chunk(b"data: [DONE]\n\n"))
        parts.append(CHUNKED_END)
        return b"".join(parts)


def embedding_vector(item: object, dims: int = EMBEDDING_DIMS) -> list[float]:
    """A deterministic unit-length vector derived from the input's bytes."""
    seed = zlib.crc32(repr(item).encode())
    raw = [((seed * (i + 1) * 2654435761) % 2001) / 1000.0 - 1.0 for i in range(dims)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    # Round through float32 so base64 and float encodings carry the same numbers.
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(v / norm for v in raw))))


def embeddings_body(payload: dict[str, Any], model: str) -> bytes:
    """OpenAI's embeddings list; `encoding_format: base64` packs little-endian float32."""
    raw_input = payload.get("input")
    if isinstance(raw_input, str) or (
        isinstance(raw_input, list) and raw_input and isinstance(raw_input[0], int)
    ):
        items: list[object] = [raw_input]
    elif isinstance(raw_input, list) and raw_input:
        items = list(raw_input)
    else:
        raise ValueError("'input' must be a string, a list of strings or a list of token lists")
    as_base64 = payload.get("encoding_format") == "base64"
    data = []
    prompt_tokens = 0
    for index, item in enumerate(items):
        vector = embedding_vector(item)
        embedding: object = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if as_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
        prompt_tokens += len(item) if isinstance(item, list) else max(1, len(str(item).split()))
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def models_body(models: tuple[str, ...], created: int) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": created, "owned_by": "simbackend"}
                for m in models
            ],
        }
    )


def now_s() -> int:
    return int(time.time())
