"""A scriptable fake inference server on 127.0.0.1 that records what reached it.

Each test sets `upstream.script[path]` to a handler (the helpers below build common ones);
the fake records every request's raw body and headers, and when a peer aborted a response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web

Script = Callable[[web.Request, "Received"], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    """One request as the upstream saw it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    aborted_at: float | None = None  # time.monotonic() when the gateway closed on us


@dataclass
class FakeUpstream:
    """The fake's state: scripts per path, and everything it received."""

    script: dict[str, Script] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)  # bodies up to the gateway's limits
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Received(
            request.method,
            request.path,
            request.raw_path.partition("?")[2],
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        self.received.append(rec)
        handler = self.script.get(request.path, default_script)
        try:
            return await handler(request, rec)
        except (asyncio.CancelledError, ConnectionError):
            rec.aborted_at = time.monotonic()
            self.aborted.set()
            raise

    @property
    def last(self) -> Received:
        """The last request other than a health check."""
        return self.posts[-1]

    @property
    def posts(self) -> list[Received]:
        """Requests other than the gateway's health checks (GETs)."""
        return [r for r in self.received if r.method != "GET"]


def chat_body(model: str = "m", text: str = "hello", prompt: int = 5, completion: int = 2) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def chunk_event(i: int, text: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage_event(prompt: int, completion: int) -> bytes:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def default_script(request: web.Request, rec: Received) -> web.StreamResponse:
    """Answer chat-like requests: JSON, or a short stream when the body asks for one."""
    data = orjson.loads(rec.body) if rec.body else {}
    if isinstance(data, dict) and data.get("stream"):
        return await stream_script(tokens=3)(request, rec)
    if request.path.endswith("/models"):
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})
    model = data.get("model", "m") if isinstance(data, dict) else "m"
    return web.json_response(chat_body(model=model))


def json_script(status: int, payload: object, headers: dict[str, str] | None = None) -> Script:
    """Answer with a fixed status and JSON body."""

    async def handle(request: web.Request, rec: Received) -> web.StreamResponse:
        return web.Response(
            status=status,
            body=orjson.dumps(payload),
            content_type="application/json",
            headers=headers,
        )

    return handle


def stream_script(
    tokens: int = 3,
    *,
    header_delay: float = 0.0,
    first_delay: float = 0.0,
    gap: float = 0.0,
    usage: bool = True,
    cut_after: int | None = None,
    done: bool = True,
) -> Script:
    """An SSE chat stream: headers after `header_delay`, tokens `gap` apart, optionally cut."""

    async def handle(request: web.Request, rec: Received) -> web.StreamResponse:
        await asyncio.sleep(header_delay)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(first_delay)
        for i in range(tokens):
            if cut_after is not None and i == cut_after:
                assert request.transport is not None
                request.transport.abort()  # the backend dies mid-stream
                return response
            if i:
                await asyncio.sleep(gap)
            await response.write(chunk_event(i, f"t{i}"))
        await response.write(chunk_event(tokens, finish="length"))
        if usage:
            await response.write(usage_event(7, tokens))
        if done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handle


def slow_json_script(delay: float, payload: object | None = None) -> Script:
    """Wait `delay` seconds before answering (a long non-streaming generation)."""

    async def handle(request: web.Request, rec: Received) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.json_response(payload if payload is not None else chat_body())

    return handle


def sse_event(data: object, event: str | None = None) -> bytes:
    """One server-sent event: `event:` (when named) and `data:` with `data` as compact JSON."""
    head = b"event: " + event.encode() + b"\n" if event is not None else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def delta_event(delta: dict, finish: str | None = None, **choice: object) -> bytes:
    """One `chat.completion.chunk` event with any delta (text, tool calls) and choice fields."""
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_script(events: list[bytes], *, cut_after: int | None = None) -> Script:
    """Answer with these SSE events, in order; with `cut_after`, die after that many."""

    async def handle(request: web.Request, rec: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, event in enumerate(events):
            if cut_after is not None and i == cut_after:
                assert request.transport is not None
                request.transport.abort()  # the backend dies mid-stream
                return response
            await response.write(event)
        await response.write_eof()
        return response

    return handle


def sequence_script(*scripts: Script) -> Script:
    """Answer the first request with the first script, the next with the next (the last repeats)."""
    queue = list(scripts)

    async def handle(request: web.Request, rec: Received) -> web.StreamResponse:
        script = queue.pop(0) if len(queue) > 1 else queue[0]
        return await script(request, rec)

    return handle


def chat_answer(
    content: str | None = "Fine.",
    finish: str = "stop",
    *,
    tool_calls: list[dict] | None = None,
    prompt: int = 11,
    completion: int = 4,
    model: str = "up-chat",
    **choice: object,
) -> dict:
    """A chat.completion as a backend sends it (for the translated routes' tests)."""
    message: dict = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-7",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, **choice}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def text_stream(
    *texts: str, finish: str = "stop", prompt: int = 12, **choice: object
) -> list[bytes]:
    """A chat stream: a role delta, the texts, the finish, the usage chunk, [DONE]."""
    events = [delta_event({"role": "assistant", "content": ""})]
    events += [delta_event({"content": t}) for t in texts]
    events.append(delta_event({}, finish, **choice))
    return [*events, usage_event(prompt, len(texts)), b"data: [DONE]\n\n"]
