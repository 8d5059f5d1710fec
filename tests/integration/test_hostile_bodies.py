"""Bodies made to hurt: a huge body of tiny tokens, deep nesting, a duplicate `model`,
invalid UTF-8 where routing does not look. Every other client keeps being served."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import time

import aiohttp
import orjson
import pytest

from tests.conftest import one_backend
from tests.fakes import json_script


class LoopStalls:
    """While open, the longest time the event loop went without running a 5 ms ticker.

    The garbage collector is run first and paused meanwhile: a full collection of a test
    process's heap is a stall of its own that says nothing of the gateway's code."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopStalls:
        gc.collect()
        gc.disable()
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        gc.enable()
        print(f"longest event-loop stall: {self.longest:.3f} s")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            self.longest = max(self.longest, now - last)
            last = now


RENAMING = "models:\n  m: {targets: [{backend: gpu, model: org/upstream-m}]}\n"
BIG = "server: {max_body_mb: 33}\n"


async def test_huge_body_of_tiny_tokens_does_not_stall_the_loop(gateway_factory, upstream) -> None:
    """32 MiB of `"",` tokens to a model whose target renames it: the rewrite is exact, and
    the event loop (which serves every other client) never stops for long; it froze for
    5-7 s when `model` was found by a Python loop over the body's tokens. The client shares
    the loop here, so the loop's longest stall is measured directly, with a ticker."""
    gw = await gateway_factory(one_backend(upstream.url, models=RENAMING, extra=BIG))
    n = 32 * 2**20
    body = b'{"x": [' + b'"",' * ((n - 40) // 3) + b'""], "model": "m"}'
    upstream.script["/v1/chat/completions"] = json_script(200, {"ok": True})  # reads, no parse
    async with aiohttp.ClientSession() as s, LoopStalls() as stalls:
        async with s.post(gw.url + "/v1/chat/completions", data=io.BytesIO(body)) as r:
            assert 200 == r.status
        async with s.get(gw.url + "/health") as r:
            assert 200 == r.status
    assert body.replace(b'"model": "m"', b'"model": "org/upstream-m"') == upstream.last.body
    assert stalls.longest < 1.0, f"the event loop stalled for {stalls.longest:.3f} s"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("/v1/chat/completions", b'{"model": "m", "x": ' + b"[" * 1_000 + b"]" * 1_000 + b"}"),
        ("/anthropic/v1/messages", b'{"model": "m", "x": ' + b"[" * 1_000 + b"]" * 1_000 + b"}"),
        ("/gemini/v1/models/m:generateContent", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("/endpoints/m/invocations", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ],
)
async def test_deep_nesting_is_a_400(gateway_factory, upstream, path, body) -> None:
    """JSON nested 1,000 or 100,000 levels deep is a 400 on every JSON route, never a 500."""
    gw = await gateway_factory(one_backend(upstream.url, models=RENAMING))
    async with aiohttp.ClientSession() as s, s.post(gw.url + path, data=body) as r:
        assert 400 == r.status
        text = await r.text()
    assert "nest" in text
    assert [] == upstream.posts


@pytest.mark.parametrize("models", ["", RENAMING])
async def test_model_twice_is_a_400_with_or_without_a_rewrite(
    gateway_factory, upstream, models
) -> None:
    """`model` twice at the top level is refused the same way whether the target renames it
    or the body would go through untouched (a backend might read the other one)."""
    gw = await gateway_factory(one_backend(upstream.url, models=models))
    body = b'{"model": "secret", "messages": [], "mod\\u0065l": "m"}'
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", data=body) as r:
            assert 400 == r.status
            error = (await r.json())["error"]
    assert ("invalid_request", "'model' appears more than once in the body") == (
        error["type"],
        error["message"],
    )
    assert [] == upstream.posts


async def test_invalid_utf8_inside_a_forwarded_value_is_a_400(gateway, upstream) -> None:
    """Bytes that are not UTF-8 inside a value the gateway does not read are still a 400,
    as the README promises, and never reach the backend."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9"}]}'
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/chat/completions", data=body) as r:
            assert 400 == r.status
            assert "request body is not valid UTF-8" == (await r.json())["error"]["message"]
    assert [] == upstream.posts


async def test_compiling_a_large_template_keeps_the_loop_free(gateway_factory, upstream) -> None:
    """A 32 KB chat_template (a new one each time, so never cached) is compiled and rendered
    off the event loop: the loop goes on serving while it compiles (it stalled for the whole
    compile, about 1 s for 60 KB, when that ran on the loop)."""
    config = (
        f"backends:\n  gpu: {{url: '{upstream.url}', kind: tgi}}\n"
        "models:\n  m: {targets: [{backend: gpu}]}\n"
    )
    gw = await gateway_factory(config)
    completion = {
        "id": "c",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    upstream.script["/v1/completions"] = json_script(200, completion)
    async with aiohttp.ClientSession() as s, LoopStalls() as stalls:
        for n in range(3):
            unique = f"{n}-{time.monotonic_ns()}"
            template = unique + "".join(
                f"{{% if messages[0].content == '{i}' %}}{i}{{% endif %}}" for i in range(640)
            )
            body = orjson.dumps(
                {
                    "model": "m",
                    "messages": [{"role": "user", "content": "x"}],
                    "chat_template": template,
                }
            )
            async with s.post(gw.url + "/v1/chat/completions", data=body) as r:
                assert 200 == r.status, await r.text()
    assert stalls.longest < 0.2, f"the event loop stalled for {stalls.longest:.3f} s"
