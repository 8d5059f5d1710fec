"""The real llama-server answers the protocols the gateway relies on (straight to it, no gateway).

Asserts protocol shape, usage and finish reasons, never the model's text (Gemma 3 270M base writes junk).
"""

from __future__ import annotations

import json
import socket
from typing import Any

import aiohttp
import pytest

from tests.real_backend.server import MODEL_ALIAS, RealServer, start_llama_server

pytestmark = pytest.mark.real_backend

MAX_TOKENS = 8
CHAT = {
    "model": MODEL_ALIAS,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
}
MESSAGES = {
    "model": MODEL_ALIAS,
    "system": "Be brief.",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
}
TIMEOUT = aiohttp.ClientTimeout(total=60)


async def post(server: RealServer, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """POST JSON; (status, content type, whole body)."""
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(server.url + path, json=body) as resp,
    ):
        return resp.status, resp.content_type, await resp.read()


def sse_events(body: bytes) -> list[tuple[str | None, str]]:
    """(event name or None, data) for each SSE event of a finished stream."""
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = None, []
        for line in block.decode().split("\n"):
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        if data:
            events.append((name, "\n".join(data)))
    return events


def check_openai_usage(usage: dict[str, Any]) -> None:
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]


async def test_health_and_models(llama_server: RealServer) -> None:
    """GET /v1/models lists the alias the tests and the gateway config use."""
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(llama_server.url + "/v1/models") as resp,
    ):
        assert 200 == resp.status
        models = await resp.json()
    assert "list" == models["object"]
    assert MODEL_ALIAS in [m["id"] for m in models["data"]]


async def test_chat_completion(llama_server: RealServer) -> None:
    """Non-streaming chat: an OpenAI chat.completion with usage and a finish reason."""
    status, ctype, body = await post(llama_server, "/v1/chat/completions", CHAT)
    assert (200, "application/json") == (status, ctype)
    doc = json.loads(body)
    assert "chat.completion" == doc["object"]
    assert MODEL_ALIAS == doc["model"]
    [choice] = doc["choices"]
    assert "assistant" == choice["message"]["role"]
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"length", "stop"}
    check_openai_usage(doc["usage"])
    if choice["finish_reason"] == "length":
        assert MAX_TOKENS == doc["usage"]["completion_tokens"]


async def test_chat_completion_stream_with_usage(llama_server: RealServer) -> None:
    """Streaming chat with include_usage: role chunk, deltas, one finish chunk, a usage chunk, [DONE]."""
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, ctype, raw = await post(llama_server, "/v1/chat/completions", body)
    assert (200, "text/event-stream") == (status, ctype)
    events = sse_events(raw)
    assert "[DONE]" == events[-1][1]
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert {"chat.completion.chunk"} == {c["object"] for c in chunks}
    assert 1 == len({c["id"] for c in chunks})
    assert "assistant" == chunks[0]["choices"][0]["delta"]["role"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in {"length", "stop"}
    assert all(f is None for f in finishes[:-1])
    usage_chunk = chunks[-1]
    assert [] == usage_chunk["choices"]
    check_openai_usage(usage_chunk["usage"])


async def test_anthropic_messages(llama_server: RealServer) -> None:
    """Non-streaming /v1/messages: an Anthropic message with text blocks, stop_reason and usage."""
    status, ctype, body = await post(llama_server, "/v1/messages", MESSAGES)
    assert (200, "application/json") == (status, ctype)
    doc = json.loads(body)
    assert ("message", "assistant") == (doc["type"], doc["role"])
    assert doc["content"]
    assert {"text"} == {block["type"] for block in doc["content"]}
    assert doc["stop_reason"] in {"max_tokens", "end_turn"}
    assert doc["usage"]["input_tokens"] > 0
    assert 1 <= doc["usage"]["output_tokens"] <= MAX_TOKENS


async def test_anthropic_messages_stream(llama_server: RealServer) -> None:
    """Streaming /v1/messages: Anthropic's event sequence, with event names matching data types."""
    status, ctype, raw = await post(llama_server, "/v1/messages", {**MESSAGES, "stream": True})
    assert (200, "text/event-stream") == (status, ctype)
    events = [(name, json.loads(data)) for name, data in sse_events(raw)]
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events if name != "ping"]
    assert ["message_start", "content_block_start"] == names[:2]
    assert ["content_block_stop", "message_delta", "message_stop"] == names[-3:]
    assert {"content_block_delta"} == set(names[2:-3])
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] > 0
    delta = next(data for name, data in events if name == "message_delta")
    assert delta["delta"]["stop_reason"] in {"max_tokens", "end_turn"}
    assert 1 <= delta["usage"]["output_tokens"] <= MAX_TOKENS


async def test_embeddings(llama_embed_server: RealServer) -> None:
    """The --embeddings instance returns OpenAI-shaped float vectors (640 dims) and usage."""
    body = {"model": MODEL_ALIAS, "input": ["hello", "world"]}
    status, ctype, raw = await post(llama_embed_server, "/v1/embeddings", body)
    assert (200, "application/json") == (status, ctype)
    doc = json.loads(raw)
    assert [0, 1] == [item["index"] for item in doc["data"]]
    assert [640, 640] == [len(item["embedding"]) for item in doc["data"]]
    assert doc["usage"]["prompt_tokens"] > 0


def test_start_and_stop_own_process(llama_server: RealServer) -> None:
    """start_llama_server() serves on its own port; stop() ends that process and frees the port."""
    server = start_llama_server()
    try:
        assert f"http://127.0.0.1:{server.port}" == server.url
        assert llama_server.port != server.port
        assert server.process.poll() is None
    finally:
        code = server.stop()
    assert code is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    assert llama_server.process.poll() is None
