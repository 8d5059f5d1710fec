"""Streams whose client did not ask for usage, through real gateways on 127.0.0.1: the backend is
asked, the client does not see the answer to that question, proxy_tokens_total and the key store
count it; everything else is forwarded byte for byte as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.keys import Hasher, UsageRow, new_key, open_store
from tests.conftest import Gateway, Upstream, wait_for
from tests.fakes import Received, Script, default_script, delta_event, sse_event, usage_event
from tests.integration.test_metrics import samples, value

Factory = Callable[..., Coroutine[Any, Any, Gateway]]
CHAT = "/v1/chat/completions"
PROMPT, COMPLETION = 13, 3
MODELS = "models:\n  m: {targets: [{backend: gpu, model: up-m}]}\n"
ALWAYS = "usage: {streams: always}\n"


def config(url: str, extra: str = ALWAYS, backend: str = "kind: vllm") -> str:
    return f"backends:\n  gpu: {{url: '{url}', {backend}}}\n{MODELS}{extra}"


def asked(body: bytes) -> bool:
    options = orjson.loads(body).get("stream_options") or {}
    return options.get("include_usage") is True


def honest(*, pieces: int = 1, usage_in_last: bool = False, done: bool = True) -> Script:
    """A backend that streams as vLLM does: the usage-only event only when the body asked
    (`pieces`: that event written in so many reads); `usage_in_last`: usage in the finish chunk
    whatever was asked, as llama.cpp's /v1/completions does."""

    async def handle(request: web.Request, rec: Received) -> web.StreamResponse:
        if not orjson.loads(rec.body).get("stream"):
            return await default_script(request, rec)  # JSON with usage 5 + 2
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text in ("", "Hel", "lo"):
            await response.write(delta_event({"content": text}))
        if usage_in_last:
            await response.write(
                sse_event(
                    {
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": PROMPT, "completion_tokens": COMPLETION},
                    }
                )
            )
        else:
            await response.write(delta_event({}, "stop"))
        if asked(rec.body):
            event = usage_event(PROMPT, COMPLETION)
            size = -(-len(event) // pieces)
            for at in range(0, len(event), size):
                await response.write(event[at : at + size])
                await asyncio.sleep(0.02)  # its own read at the gateway
        if done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handle


async def post(url: str, body: bytes, path: str = CHAT, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + path, data=body, headers=headers) as r:
        return r.status, await r.read()


async def tokens(gw: Gateway, model: str = "m") -> tuple[float, float]:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        got = samples(await r.text())
    return (
        value(got, "proxy_tokens_total", model=model, kind="prompt"),
        value(got, "proxy_tokens_total", model=model, kind="completion"),
    )


def with_model(body: bytes, model: str = "up-m") -> bytes:
    return body.replace(b'"model":"m"', b'"model":"' + model.encode() + b'"')


async def test_a_stream_that_did_not_ask_is_counted_and_sees_no_extra_event(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """The backend is asked for usage (two bytes spans spliced in), the client gets the very
    bytes it would have got without asking, and proxy_tokens_total has the counts."""
    upstream.script[CHAT] = honest()
    gw = await gateway_factory(config(upstream.url))
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    status, got = await post(gw.url, body)
    sent = upstream.last.body
    _, direct = await post(upstream.url, with_model(body))  # what a client gets unasked
    assert 200 == status
    assert b'{"stream_options":{"include_usage":true},' + with_model(body)[1:] == sent
    assert direct == got
    assert b'"usage"' not in got
    assert (PROMPT, COMPLETION) == await tokens(gw)


async def test_a_client_that_asked_gets_the_backend_bytes_exactly(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """include_usage: true is the client's: body and stream byte for byte, usage event kept."""
    upstream.script[CHAT] = honest()
    gw = await gateway_factory(config(upstream.url))
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}'
    status, got = await post(gw.url, body)
    assert with_model(body) == upstream.last.body
    _, direct = await post(upstream.url, with_model(body))
    assert (200, direct) == (status, got)
    assert b'"choices":[],"usage"' in got
    assert (PROMPT, COMPLETION) == await tokens(gw)


async def test_include_usage_false_is_a_client_that_did_not_ask(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """include_usage: false becomes true upstream, and the usage event is not the client's."""
    upstream.script[CHAT] = honest()
    gw = await gateway_factory(config(upstream.url))
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":false},"messages":[]}'
    _, got = await post(gw.url, body)
    assert with_model(body).replace(b"false", b"true") == upstream.last.body
    _, direct = await post(upstream.url, with_model(body))
    assert direct == got
    assert (PROMPT, COMPLETION) == await tokens(gw)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[]}',
        b'{"model":"m","stream":false,"messages":[]}',
        b'{"model":"m","stream":false,"stream_options":{"include_usage":false},"messages":[]}',
        b' {"model" : "m" , "messages":[] }\n',
    ],
)
async def test_non_streams_are_untouched_byte_for_byte(
    gateway_factory: Factory, upstream: Upstream, body: bytes
) -> None:
    """A plain request goes up as sent (only the model rewritten) and comes back as answered."""
    gw = await gateway_factory(config(upstream.url))
    status, got = await post(gw.url, body)
    expected_up = body.replace(b'"m"', b'"up-m"', 1)
    assert expected_up == upstream.last.body
    _, direct = await post(upstream.url, expected_up)
    assert (200, direct) == (status, got)
    assert (5, 2) == await tokens(gw)  # the fake's JSON usage


async def test_a_usage_event_split_across_reads(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """The usage event in three reads (apart in time) is still taken out, and counted."""
    upstream.script[CHAT] = honest(pieces=3)
    gw = await gateway_factory(config(upstream.url))
    body = b'{"model":"m","stream":true,"messages":[]}'
    _, got = await post(gw.url, body)
    _, direct = await post(upstream.url, with_model(body))
    assert direct == got
    assert (PROMPT, COMPLETION) == await tokens(gw)


async def test_without_done_the_stream_ends_at_its_finish(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """A backend that sends no [DONE]: the stream ends with its finish chunk."""
    upstream.script[CHAT] = honest(done=False)
    gw = await gateway_factory(config(upstream.url))
    body = b'{"model":"m","stream":true,"messages":[]}'
    _, got = await post(gw.url, body)
    _, direct = await post(upstream.url, with_model(body))
    assert direct == got
    assert got.endswith(delta_event({}, "stop"))
    assert (PROMPT, COMPLETION) == await tokens(gw)


async def test_usage_in_the_last_content_chunk_is_left_there(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """A backend that puts usage in its finish chunk (llama.cpp's completions): that chunk
    goes out as it came, and its counts are counted."""
    upstream.script["/v1/completions"] = honest(usage_in_last=True)
    gw = await gateway_factory(config(upstream.url))
    body = b'{"model":"m","stream":true,"prompt":"x"}'
    _, got = await post(gw.url, body, "/v1/completions")
    _, direct = await post(upstream.url, with_model(body), "/v1/completions")
    assert direct == got
    assert (PROMPT, COMPLETION) == await tokens(gw)


@pytest.mark.parametrize(
    ("extra", "backend"),
    [
        ("", "kind: vllm"),  # auto without a key store: nothing needs it
        ("usage: {streams: never}\n", "kind: vllm"),
        (ALWAYS, "kind: vllm, stream_usage: false"),  # a backend that refuses the field
    ],
)
async def test_where_usage_is_not_asked_the_stream_is_untouched(
    gateway_factory: Factory, upstream: Upstream, extra: str, backend: str
) -> None:
    """Off (by mode or for the backend): the body and the stream byte for byte, as before."""
    upstream.script[CHAT] = honest()
    gw = await gateway_factory(config(upstream.url, extra, backend))
    body = b'{"model":"m","stream":true,"messages":[]}'
    _, got = await post(gw.url, body)
    assert with_model(body) == upstream.last.body
    _, direct = await post(upstream.url, with_model(body))
    assert direct == got
    assert (0, 0) == await tokens(gw)


async def test_a_retry_asks_the_next_backend_too(
    gateway_factory: Factory, upstream_factory: Callable[[], Coroutine[Any, Any, Upstream]]
) -> None:
    """A target that answered 503 passes the request on; the next one is asked as well."""
    busy, good = await upstream_factory(), await upstream_factory()

    async def overloaded(request: web.Request, rec: Received) -> web.StreamResponse:
        return web.json_response({"error": {"message": "busy"}}, status=503)

    busy.script[CHAT], good.script[CHAT] = overloaded, honest()
    gw = await gateway_factory(
        f"backends:\n  a: {{url: '{busy.url}', kind: vllm}}\n  b: {{url: '{good.url}', kind: vllm}}\n"
        "models:\n  m: {policy: weighted, targets: [{backend: a, weight: 1000}, {backend: b, "
        "weight: 0.001}]}\n" + ALWAYS
    )
    _, got = await post(gw.url, b'{"model":"m","stream":true,"messages":[]}')
    assert [True, True] == [asked(busy.last.body), asked(good.last.body)]
    assert b'"usage"' not in got
    assert (PROMPT, COMPLETION) == await tokens(gw)


async def test_mlflow_and_oicm_streams_are_asked_too(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """The endpoint-addressed routes (MLflow invocations, OICM's proxy, a TGI-style body made
    into chat) ask as the OpenAI routes do."""
    upstream.script[CHAT] = honest()
    gw = await gateway_factory(config(upstream.url))
    for path, body in [
        ("/gateway/m/invocations", b'{"messages":[],"stream":true}'),
        ("/models/m/proxy/v1/chat/completions", b'{"messages":[],"stream":true}'),
        ("/models/m/proxy/v1/chat/completions", b'{"inputs":"hi","stream":true}'),
    ]:
        _, got = await post(gw.url, body, path)
        assert asked(upstream.last.body), path
        assert b'"usage"' not in got, path
    assert (3 * PROMPT, 3 * COMPLETION) == await tokens(gw)


async def test_a_stream_cut_mid_event_ends_as_it_did(
    gateway_factory: Factory, upstream_factory: Callable[[], Coroutine[Any, Any, Upstream]]
) -> None:
    """A backend that dies inside what may be the usage event: the client gets the same bytes
    (the cut event closed, then the error event) with usage asked or not."""

    async def dies(request: web.Request, rec: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(delta_event({"content": "a"}))
        await response.write(b'data: {"id":"x","choices":[')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    answers = []
    for extra in (ALWAYS, ""):
        up = await upstream_factory()
        up.script[CHAT] = dies
        gw = await gateway_factory(config(up.url, extra))
        answers.append(await post(gw.url, b'{"model":"m","stream":true,"messages":[]}'))
    assert answers[0] == answers[1]
    assert b'"choices":[\n\ndata: {"error":{"type":"backend_unreachable"' in answers[0][1]


async def test_a_translated_stream_counts_usage_split_across_reads(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """Anthropic's route translated to chat asks for usage itself; its count is read from the
    events the translator decodes, however the backend's reads were cut."""
    upstream.script[CHAT] = honest(pieces=4)
    gw = await gateway_factory(config(upstream.url, "", "kind: tgi"))
    body = orjson.dumps(
        {
            "model": "m",
            "max_tokens": 8,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        }
    )
    status, got = await post(gw.url, body, "/anthropic/v1/messages")
    assert 200 == status
    assert b"event: message_stop" in got
    assert (PROMPT, COMPLETION) == await tokens(gw)


async def test_a_forwarded_anthropic_stream_counts_its_prompt(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """A backend serving /v1/messages itself puts input_tokens in message_start and only
    output_tokens in message_delta: both are counted."""
    events = [
        sse_event(
            {
                "type": "message_start",
                "message": {"usage": {"input_tokens": 9, "output_tokens": 0}},
            },
            "message_start",
        ),
        sse_event({"type": "content_block_delta", "delta": {"text": "Hi"}}, "content_block_delta"),
        sse_event({"type": "message_delta", "usage": {"output_tokens": 2}}, "message_delta"),
        sse_event({"type": "message_stop"}, "message_stop"),
    ]

    async def messages(request: web.Request, rec: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    upstream.script["/v1/messages"] = messages
    gw = await gateway_factory(config(upstream.url, ALWAYS))
    body = b'{"model":"m","max_tokens":8,"stream":true,"messages":[]}'
    _, got = await post(gw.url, body, "/anthropic/v1/messages")
    assert b"".join(events) == got
    assert body.replace(b'"m"', b'"up-m"') == upstream.last.body  # Anthropic's: not touched
    assert (9, 2) == await tokens(gw)


# --- per-key usage in the key store -------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or a redis-server of the test's own."""
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    return str(request.getfixturevalue("redis_server").url)


async def usage_rows(location: str) -> list[UsageRow]:
    store = await open_store(location)
    try:
        return sorted(await store.usage(0), key=lambda r: (r.key, r.model))
    finally:
        await store.close()


async def test_per_key_usage_reaches_the_store_in_batches(
    gateway_factory: Factory, upstream: Upstream, location: str
) -> None:
    """With a key store (usage.streams auto), plain streams are asked; each key's requests
    and tokens per model reach the store within a flush, a static key's as `key-0`."""
    upstream.script[CHAT] = honest()
    store = await open_store(location)
    secret, record = new_key("team-a", Hasher(), time.time())
    await store.create(record)
    await store.close()
    gw = await gateway_factory(
        config(upstream.url, f"auth: {{store: '{location}'}}\nusage: {{flush_s: 0.1}}\n"),
        {"API_KEYS": "sk-static"},
    )
    stream = b'{"model":"m","stream":true,"messages":[]}'
    for key, body in [(secret, stream), (secret, stream), (secret, b'{"model":"m"}')]:
        status, got = await post(gw.url, body, Authorization=f"Bearer {key}")
        assert 200 == status
        assert b'"choices":[],"usage"' not in got
    assert 200 == (await post(gw.url, stream, Authorization="Bearer sk-static"))[0]
    assert 401 == (await post(gw.url, stream))[0]  # refused before any backend: not counted
    expected = [
        ("key-0", "m", 1, PROMPT, COMPLETION),
        ("team-a", "m", 3, 2 * PROMPT + 5, 2 * COMPLETION + 2),
    ]

    async def written() -> list[tuple[str, str, int, int, int]]:
        rows = await usage_rows(location)
        return [(r.key, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows]

    for _ in range(50):  # flushed every 0.1 s
        if await written() == expected:
            break
        await asyncio.sleep(0.1)
    assert expected == await written()
    assert (3 * PROMPT + 5, 3 * COMPLETION + 2) == await tokens(gw)


async def test_usage_left_in_memory_is_written_at_stop(
    gateway_factory: Factory, upstream: Upstream, tmp_path: Path
) -> None:
    """A gateway that stops before its next flush writes what it holds on the way out."""
    location = str(tmp_path / "keys.db")
    gw = await gateway_factory(
        config(upstream.url, f"auth: {{store: '{location}'}}\nusage: {{flush_s: 3600}}\n"),
        {"API_KEYS": "sk-static"},
    )
    assert 200 == (await post(gw.url, b'{"model":"m"}', Authorization="Bearer sk-static"))[0]
    await wait_for(lambda: len(gw.state.usage_tally or ()) == 1)
    await gw.serving.close(0)
    rows = await usage_rows(location)
    assert [("key-0", "m", 1, 5, 2)] == [
        (r.key, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows
    ]


async def test_a_rendered_chat_template_stream_asks_and_hides_the_answer(
    gateway_factory: Factory, upstream: Upstream
) -> None:
    """A chat request with chat_template, rendered by the gateway into /v1/completions for a
    backend that does not take the field, asks for usage; the client gets chat chunks only."""
    upstream.script["/v1/completions"] = honest()
    gw = await gateway_factory(config(upstream.url, "", "kind: llamacpp"))
    body = orjson.dumps(
        {
            "model": "m",
            "stream": True,
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
            "messages": [{"role": "user", "content": "hi"}],
        }
    )
    status, got = await post(gw.url, body, "/models/m/proxy/v1/chat/completions")
    assert 200 == status
    assert {"include_usage": True} == orjson.loads(upstream.last.body)["stream_options"]
    assert b'"choices":[]' not in got
    assert got.endswith(b"data: [DONE]\n\n")
    assert (PROMPT, COMPLETION) == await tokens(gw)
