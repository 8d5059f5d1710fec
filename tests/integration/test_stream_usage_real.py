"""Against the real llama-server: the OpenAI SDK streams without stream_options through the
gateway, proxy_tokens_total and the key store grow by the server's own counts, and the client
sees the chunks it sees going direct, no usage chunk among them.

Gemma 3 270M at temperature 0 with a token budget: the counts are the server's, read from a
request made directly with include_usage (its prompt count does not depend on its cache).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from proxy.keys import Hasher, new_key, open_store
from tests.integration.test_metrics import samples, value

pytestmark = pytest.mark.real_backend

MODELS = "models:\n  gemma: {targets: [{backend: gpu, model: gemma-3-270m}]}\n"
HI = [{"role": "user", "content": "Say hello."}]
BUDGET = 8


def config(url: str, extra: str) -> str:
    return f"backends:\n  gpu: {{url: '{url}', kind: llamacpp}}\n{MODELS}{extra}"


def server_counts(url: str) -> tuple[int, int]:
    """The prompt and completion tokens llama-server itself reports for the request."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="gemma-3-270m",
            messages=HI,
            max_tokens=BUDGET,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    return usage.prompt_tokens, usage.completion_tokens


def stream_unasked(
    base_url: str, model: str, key: str
) -> list[openai.types.chat.ChatCompletionChunk]:
    """What the SDK yields for a plain stream: no stream_options, as its users write it."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    return list(
        client.chat.completions.create(
            model=model, messages=HI, max_tokens=BUDGET, temperature=0, stream=True
        )
    )


async def tokens(url: str) -> tuple[float, float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        got = samples(await r.text())
    return (
        value(got, "proxy_tokens_total", model="gemma", kind="prompt"),
        value(got, "proxy_tokens_total", model="gemma", kind="completion"),
    )


async def test_the_sdk_streaming_unasked_is_counted_and_sees_no_extra_chunk(
    llama_server, gateway_factory
) -> None:
    """The SDK without stream_options: the same chunks as going direct (none with empty
    choices, none with usage), and proxy_tokens_total grows by llama-server's counts."""
    gw = await gateway_factory(config(llama_server.url, "usage: {streams: always}\n"))
    expected = await asyncio.to_thread(server_counts, llama_server.url)
    assert (0, 0) == await tokens(gw.url)
    through = await asyncio.to_thread(stream_unasked, gw.url + "/v1", "gemma", "-")
    direct = await asyncio.to_thread(stream_unasked, llama_server.url + "/v1", "gemma-3-270m", "-")
    assert [] == [c for c in through if not c.choices or c.usage is not None]
    assert [c.choices[0].delta.content for c in direct] == [
        c.choices[0].delta.content for c in through
    ]
    assert "length" == through[-1].choices[0].finish_reason
    assert BUDGET == expected[1]
    assert (float(expected[0]), float(expected[1])) == await tokens(gw.url)


async def test_a_plain_stream_reaches_the_key_store(
    llama_server, gateway_factory, tmp_path: Path
) -> None:
    """With a key store (usage.streams auto), a managed key's plain SDK streams are in its
    usage with llama-server's counts."""
    location = str(tmp_path / "keys.db")
    store = await open_store(location)
    secret, record = new_key("team-a", Hasher(), time.time())
    await store.create(record)
    await store.close()
    gw = await gateway_factory(
        config(llama_server.url, f"auth: {{store: '{location}'}}\nusage: {{flush_s: 0.1}}\n")
    )
    prompt, completion = await asyncio.to_thread(server_counts, llama_server.url)
    for _ in range(2):
        chunks = await asyncio.to_thread(stream_unasked, gw.url + "/v1", "gemma", secret)
        assert all(c.choices for c in chunks)
    expected = [("team-a", "gemma", 2, 2 * prompt, 2 * completion)]
    rows: list[tuple[str, str, int, int, int]] = []
    for _ in range(50):
        store = await open_store(location)
        try:
            found = await store.usage(0)
        finally:
            await store.close()
        rows = [(r.key, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in found]
        if rows == expected:
            break
        await asyncio.sleep(0.1)
    assert expected == rows


async def test_completions_keep_usage_where_llama_server_puts_it(
    llama_server, gateway_factory
) -> None:
    """llama-server's /v1/completions stream carries usage in its last chunk whether asked or
    not: that chunk reaches the client as it came, and is counted once."""
    gw = await gateway_factory(config(llama_server.url, "usage: {streams: always}\n"))
    body = {"prompt": "Once", "max_tokens": 3, "temperature": 0, "stream": True}

    async def raw(url: str, model: str) -> bytes:
        async with (
            aiohttp.ClientSession() as s,
            s.post(url + "/v1/completions", json={**body, "model": model}) as r,
        ):
            return await r.read()

    through = await raw(gw.url, "gemma")
    direct = await raw(llama_server.url, "gemma-3-270m")
    assert through.count(b"\n\n") == direct.count(b"\n\n")
    assert b'"usage":{"completion_tokens":3,' in through
    assert 3.0 == (await tokens(gw.url))[1]
