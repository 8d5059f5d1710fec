"""OICM's per-endpoint base URL `/models/{endpoint}/proxy/...`: OpenAI routes routed by endpoint,
TGI-style payloads turned into chat, task paths (JSON and multipart) forwarded as is, and a
client's `chat_template` passed through or rendered in the sandbox."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from bench.simbackend import start_simbackend
from tests.fakes import json_script, sse_event, sse_script, stream_script

KEY = "sk-oicm"
CHAT = "/v1/chat/completions"
CONFIG = """
backends:
  gpu: {{url: '{gpu}', kind: vllm}}
  tgi: {{url: '{tgi}', kind: tgi}}
models:
  qwen: {{targets: [{{backend: gpu, model: up-qwen}}]}}
  qwen-tgi: {{targets: [{{backend: tgi, model: up-tgi}}]}}
  whisper: {{targets: [{{backend: gpu}}]}}
"""
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
]
PROMPT = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"


@pytest.fixture
async def setup(upstream_factory, gateway_factory):
    """A gateway with a vllm backend and a tgi one, each a recording fake."""
    gpu, tgi = await upstream_factory(), await upstream_factory()
    gw = await gateway_factory(CONFIG.format(gpu=gpu.url, tgi=tgi.url), {"API_KEYS": KEY})
    return gw, gpu, tgi


def client(url: str, endpoint: str, sent: list[Any] | None = None) -> openai.OpenAI:
    """The openai SDK with the endpoint's base URL; `sent` collects each request it sends."""
    hooks = {"request": [lambda r: sent.append((r.headers, r.read()))]} if sent is not None else {}
    return openai.OpenAI(
        base_url=f"{url}/models/{endpoint}/proxy/v1",
        api_key=KEY,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(event_hooks=hooks),
    )


async def post(url: str, data: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": content_type}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(url, data=data, headers=headers) as response:
            return response.status, await response.read()


async def test_streaming_chat_with_bearer_auth(setup) -> None:
    """The SDK streams chat on the endpoint's base URL; the backend gets the upstream model id."""
    gw, gpu, _ = setup
    gpu.script[CHAT] = stream_script(tokens=3)
    sent: list[Any] = []

    def run() -> list[Any]:
        with client(gw.url, "qwen", sent) as c:
            return list(
                c.chat.completions.create(
                    model="qwen",
                    messages=[{"role": "user", "content": "Hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )

    chunks = await asyncio.to_thread(run)
    body = sent[0][1]
    assert body.replace(b'"model":"qwen"', b'"model":"up-qwen"') == gpu.last.body
    assert CHAT == gpu.last.path
    assert "authorization" not in gpu.last.headers
    assert ["t0", "t1", "t2"] == [c.choices[0].delta.content for c in chunks if c.choices][:3]
    assert 3 == chunks[-1].usage.completion_tokens


async def test_the_endpoint_in_the_path_wins_over_the_body_model(setup) -> None:
    """Whatever `model` the client sends, the endpoint in the path picks the target."""
    gw, gpu, tgi = setup

    def run() -> Any:
        with client(gw.url, "qwen-tgi") as c:
            return c.chat.completions.create(
                model="anything", messages=[{"role": "user", "content": "Hi"}]
            )

    reply = await asyncio.to_thread(run)
    assert ([], "up-tgi") == (gpu.posts, orjson.loads(tgi.last.body)["model"])
    assert "hello" == reply.choices[0].message.content


async def test_against_the_simulated_backend(gateway_factory) -> None:
    """On the simulated vLLM, chat, streaming chat and models work on the endpoint's base URL."""
    sim = await start_simbackend(models=("sim-model",))
    try:
        gw = await gateway_factory(
            f"backends:\n  sim: {{url: '{sim.url}', kind: vllm}}\n"
            "models:\n  ep: {targets: [{backend: sim, model: sim-model}]}\n",
            {"API_KEYS": KEY},
        )

        def run() -> tuple[Any, list[Any], list[str]]:
            with client(gw.url, "ep") as c:
                reply = c.chat.completions.create(
                    model="ep", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
                )
                chunks = list(
                    c.chat.completions.create(
                        model="ep",
                        messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=4,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
                return reply, chunks, [m.id for m in c.models.list()]

        reply, chunks, models = await asyncio.to_thread(run)
    finally:
        await sim.close()
    assert (3, "length") == (reply.usage.completion_tokens, reply.choices[0].finish_reason)
    assert 4 == chunks[-1].usage.completion_tokens
    assert ["ep"] == models


async def test_tgi_style_payload_becomes_a_chat_request(setup) -> None:
    """A TGI-style payload on the chat route reaches the backend as a chat request."""
    gw, gpu, _ = setup
    gpu.script[CHAT] = stream_script(tokens=2)
    payload = {"inputs": "What is AI?", "max_new_tokens": 20, "do_sample": False, "stream": True}
    status, raw = await post(
        gw.url + "/models/qwen/proxy/v1/chat/completions", orjson.dumps(payload)
    )
    assert 200 == status
    assert {
        "model": "up-qwen",
        "messages": [{"role": "user", "content": "What is AI?"}],
        "max_tokens": 20,
        "stream": True,
        "temperature": 0,
    } == orjson.loads(gpu.last.body)
    assert CHAT == gpu.last.path
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_tgi_style_payload_with_parameters(setup) -> None:
    """TGI's nested `parameters` are read too; a non-streaming answer is the chat completion."""
    gw, gpu, _ = setup
    payload = {
        "inputs": "Hi",
        "parameters": {"max_new_tokens": 5, "temperature": 0.3, "stop": "\n"},
    }
    status, raw = await post(
        gw.url + "/models/qwen/proxy/v1/chat/completions", orjson.dumps(payload)
    )
    assert (200, "chat.completion") == (status, orjson.loads(raw)["object"])
    assert {
        "model": "up-qwen",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0.3,
        "stop": ["\n"],
    } == orjson.loads(gpu.last.body)


async def test_task_path_json_is_forwarded_as_is(setup) -> None:
    """A task path (rerank) reaches the backend at that path, body and query untouched."""
    gw, gpu, _ = setup
    answer = [{"index": 1, "score": 0.9}, {"index": 0, "score": 0.1}]
    gpu.script["/rerank"] = json_script(200, answer)
    body = b'{"query": "What is Deep Learning?", "texts": ["Deep Learning is not...", "Deep learning is..."]}'
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            gw.url + "/models/qwen/proxy/rerank?truncate=true", data=body, headers=headers
        ) as response:
            status, got = response.status, await response.json()
        async with session.get(gw.url + "/models/qwen/proxy/rerank/schema", headers=headers) as r:
            schema_status = r.status
    assert (200, answer) == (status, got)
    rerank = [r for r in gpu.received if r.path == "/rerank"]
    assert [("POST", "truncate=true", body)] == [(r.method, r.query, r.body) for r in rerank]
    assert 200 == schema_status
    assert ["GET"] == [r.method for r in gpu.received if r.path == "/rerank/schema"]


async def test_multipart_audio_is_forwarded_byte_for_byte(setup) -> None:
    """An audio upload reaches the backend byte for byte, Content-Type boundary included."""
    gw, gpu, _ = setup
    gpu.script["/v1/audio/transcriptions"] = json_script(200, {"text": "hello world"})
    sent: list[Any] = []
    audio = bytes(range(256)) * 64  # binary, with every byte value and CRLFs in it

    def run() -> Any:
        with client(gw.url, "whisper", sent) as c:
            return c.audio.transcriptions.create(
                model="whisper-1", file=("clip.wav", audio, "audio/wav"), language="en"
            )

    transcription = await asyncio.to_thread(run)
    headers, body = sent[0]
    assert "hello world" == transcription.text
    assert "/v1/audio/transcriptions" == gpu.last.path
    assert body == gpu.last.body
    assert headers["content-type"] == gpu.last.headers["content-type"]
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    assert audio in gpu.last.body


async def test_chat_template_passes_through_to_vllm(setup) -> None:
    """A `chat_template` reaches a vllm backend as sent (but the model), on both routes."""
    gw, gpu, tgi = setup
    sent: list[Any] = []

    def run() -> None:
        with client(gw.url, "qwen", sent) as c:
            c.chat.completions.create(
                model="qwen", messages=MESSAGES, extra_body={"chat_template": TEMPLATE}
            )
        with openai.OpenAI(
            base_url=gw.url + "/v1",
            api_key=KEY,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(
                event_hooks={"request": [lambda r: sent.append((r.headers, r.read()))]}
            ),
        ) as c:
            c.chat.completions.create(
                model="qwen", messages=MESSAGES, extra_body={"chat_template": TEMPLATE}
            )

    await asyncio.to_thread(run)
    assert [CHAT, CHAT] == [r.path for r in gpu.posts]
    assert [b.replace(b'"model":"qwen"', b'"model":"up-qwen"') for _, b in sent] == [
        r.body for r in gpu.posts
    ]
    assert TEMPLATE == orjson.loads(gpu.last.body)["chat_template"]
    assert [] == tgi.posts


def completion(text: str, finish: str = "stop") -> dict:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "up-tgi",
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }


async def test_chat_template_rendered_for_tgi(setup) -> None:
    """For tgi the template is rendered into a /v1/completions prompt; the answer is chat."""
    gw, _, tgi = setup
    tgi.script["/v1/completions"] = json_script(200, completion("Hello!"))

    def whole() -> Any:
        with client(gw.url, "qwen-tgi") as c:
            return c.chat.completions.create(
                model="qwen-tgi",
                messages=MESSAGES,
                max_tokens=8,
                temperature=0.1,
                extra_body={"chat_template": TEMPLATE},
            )

    reply = await asyncio.to_thread(whole)
    assert "/v1/completions" == tgi.last.path
    assert {"model": "up-tgi", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.1} == (
        orjson.loads(tgi.last.body)
    )
    assert ("chat.completion", "Hello!", "stop", 2) == (
        reply.object,
        reply.choices[0].message.content,
        reply.choices[0].finish_reason,
        reply.usage.completion_tokens,
    )

    pieces = [
        {**completion("Hel"), "usage": None},
        {**completion("lo", "length"), "usage": None},
        {**completion(""), "choices": [], "usage": completion("")["usage"]},
    ]
    tgi.script["/v1/completions"] = sse_script(
        [*(sse_event(p) for p in pieces), b"data: [DONE]\n\n"]
    )

    def streamed() -> list[Any]:
        with client(gw.url, "qwen-tgi") as c:
            return list(
                c.chat.completions.create(
                    model="qwen-tgi",
                    messages=MESSAGES,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"chat_template": TEMPLATE},
                )
            )

    chunks = await asyncio.to_thread(streamed)
    sent = orjson.loads(tgi.last.body)
    assert (PROMPT, True, {"include_usage": True}) == (
        sent["prompt"],
        sent["stream"],
        sent["stream_options"],
    )
    assert ["Hel", "lo"] == [c.choices[0].delta.content for c in chunks if c.choices]
    assert "length" == chunks[1].choices[0].finish_reason
    assert {"chat.completion.chunk"} == {c.object for c in chunks}
    assert 2 == chunks[-1].usage.completion_tokens


@pytest.mark.parametrize(
    ("template", "says"),
    [
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            ("rendering took longer than", "loops ran more than"),
        ),
        # Where the message is Jinja's or Python's own words, only our prefix and the line
        # number our code adds are asserted: a dependency may reword its messages.
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ("(line ", "took longer than")),
        ("{{ messages.__class__.__mro__ }}", ("(line 1)",)),
        ("{{ ''.__class__.__base__.__subclasses__() }}", ("(line 1)",)),
        ("{% for m in messages %}", ("(line 1)",)),
        ("{{ 'x' * 100000000 }}", ("a value would grow past 1000000 characters",)),
    ],
    ids=["loops", "recursion", "__class__ of messages", "__class__ of a string", "syntax", "huge"],
)
async def test_hostile_or_broken_template_is_a_400(setup, template, says) -> None:
    """A looping, escaping, broken or exploding template is a 400 in bounded time."""
    gw, _, tgi = setup

    def run() -> openai.BadRequestError:
        with client(gw.url, "qwen-tgi") as c, pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(
                model="qwen-tgi", messages=MESSAGES, extra_body={"chat_template": template}
            )
        return info.value

    started = time.monotonic()
    exc = await asyncio.to_thread(run)
    assert time.monotonic() - started < 10
    assert "invalid_request" == exc.body["type"]
    assert exc.body["message"].startswith("chat_template: ")
    assert any(word in exc.body["message"] for word in says), exc.body["message"]
    assert [] == tgi.posts


async def test_unknown_endpoint_and_missing_key(setup) -> None:
    """An unknown endpoint is a 404 envelope; no key is a 401 before any routing."""
    gw, gpu, _ = setup
    status, raw = await post(gw.url + "/models/nope/proxy/rerank", b"{}")
    assert (404, "not_found") == (status, orjson.loads(raw)["error"]["type"])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(gw.url + "/models/qwen/proxy/rerank", data=b"{}") as response:
            assert 401 == response.status
    assert [] == gpu.posts


async def _raw_post(url: str, target: bytes) -> bytes:
    """Send one POST with an exact request target; everything the gateway answers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("target", "upstream_path"),
    [
        (b"/models/qwen/proxy/a%20b%3Fc%23d", "/base/a%20b%3Fc%23d"),
        (b"/models/qwen/proxy/x%2Fy?q=1", "/base/x%2Fy"),
    ],
)
async def test_proxy_path_goes_upstream_as_encoded(
    gateway_factory, upstream, target, upstream_path
) -> None:
    """The task path reaches the backend as the client encoded it, under the backend's base
    path: no escape is decoded into the upstream request line."""
    config = (
        f"backends:\n  gpu: {{url: '{upstream.url}/base', kind: tgi}}\n"
        "models:\n  qwen: {targets: [{backend: gpu}]}\n"
    )
    gw = await gateway_factory(config)
    seen: list[str] = []

    async def record(request, rec):
        seen.append(request.raw_path.partition("?")[0])
        return web.json_response({})

    upstream.script["/base/a b?c#d"] = record
    upstream.script["/base/x/y"] = record
    answer = await _raw_post(gw.url, target)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert [upstream_path] == seen


@pytest.mark.parametrize(
    "target",
    [
        b"/models/qwen/proxy/a%0d%0aX-Injected:%20yes",
        b"/models/qwen/proxy/a%09b%20c",
        b"/models/qwen/proxy/../../admin",
        b"/models/qwen/proxy/%2e%2e/%2e%2e/admin",
    ],
)
async def test_proxy_path_with_control_characters_or_dot_segments_is_a_400(
    gateway_factory, upstream, target
) -> None:
    """A path that would smuggle bytes into the upstream request line, or climb out of the
    backend's base path, is refused with an envelope (400; a decoded line break matches no
    route at all, so that one is a 404) and never reaches the backend."""
    config = (
        f"backends:\n  gpu: {{url: '{upstream.url}/base', kind: tgi}}\n"
        "models:\n  qwen: {targets: [{backend: gpu}]}\n"
    )
    gw = await gateway_factory(config)
    answer = await _raw_post(gw.url, target)
    if b"%0a" in target:
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
        assert b'"type":"not_found"' in answer
    else:
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b'"type":"invalid_request"' in answer
    assert [] == upstream.posts
