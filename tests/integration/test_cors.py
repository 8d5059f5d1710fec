"""server.cors: preflights as browsers send them, and Access-Control-* on every kind of answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import load_config
from proxy.cors import EXPOSE_HEADERS
from proxy.reload import apply
from proxy.state import LIVE
from tests.conftest import one_backend
from tests.fakes import Received, chunk_event
from tests.integration.test_cli import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
APP = "https://app.example.com"
EVIL = "https://evil.example"
KEYS = {"API_KEYS": "k-app"}
CORS = f"server:\n  cors: {{allow_origins: ['{APP}', 'http://127.0.0.1:5173'], max_age_s: 600}}\n"
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def preflight_headers(
    origin: str = APP, method: str = "POST", headers: str = "authorization, content-type"
) -> dict[str, str]:
    """What Chromium sends before a fetch() with a key and a JSON body."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
        "Sec-Fetch-Mode": "cors",
    }


@pytest.fixture
async def cors_gw(gateway_factory, upstream):
    return await gateway_factory(one_backend(upstream.url, extra=CORS), KEYS)


async def send(
    url: str, method: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, aiohttp.typedefs.CIMultiDictProxy[str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, headers=headers, data=body) as r,
    ):
        return r.status, r.headers, await r.read()


async def test_preflight_of_an_allowed_origin(cors_gw, upstream) -> None:
    """A browser's preflight without a key: 204 allowing the origin, the route's method and
    the asked headers, cacheable for max_age_s; it never reaches the backend."""
    status, headers, body = await send(
        cors_gw.url + "/v1/chat/completions", "OPTIONS", preflight_headers()
    )
    assert (204, b"") == (status, body)
    assert {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Methods": "POST",
        "Access-Control-Max-Age": "600",
        "Access-Control-Expose-Headers": EXPOSE_HEADERS,
    } == {
        k: headers.get(k)
        for k in (
            "Access-Control-Allow-Origin",
            "Access-Control-Allow-Methods",
            "Access-Control-Max-Age",
            "Access-Control-Expose-Headers",
        )
    }
    assert {"authorization", "content-type", "x-api-key"} <= set(
        headers["Access-Control-Allow-Headers"].split(", ")
    )
    assert "Origin" in headers.getall("Vary")
    assert headers["X-Request-ID"]
    assert [] == upstream.posts


async def test_preflight_is_accounted_under_its_route(cors_gw) -> None:
    """A preflight shows in the access log and metrics with its route template and 204."""
    await send(cors_gw.url + "/v1/models/some-model", "OPTIONS", preflight_headers(method="GET"))
    line = orjson.loads(cors_gw.access_lines()[-1])
    assert ("/v1/models/{model}", 204, "OPTIONS") == (line["route"], line["status"], line["method"])


async def test_preflight_of_a_get_route_lists_its_methods(cors_gw) -> None:
    """A GET route's preflight allows GET and HEAD (what the router serves there)."""
    status, headers, _ = await send(
        cors_gw.url + "/v1/models", "OPTIONS", preflight_headers(method="GET", headers="")
    )
    assert (204, "GET, HEAD") == (status, headers["Access-Control-Allow-Methods"])


async def test_preflight_of_an_origin_not_listed(cors_gw, upstream) -> None:
    """An origin not listed: 403 permission_denied and no Access-Control-* header at all."""
    status, headers, body = await send(
        cors_gw.url + "/v1/chat/completions", "OPTIONS", preflight_headers(origin=EVIL)
    )
    assert 403 == status
    assert {
        "error": {
            "type": "permission_denied",
            "message": f"origin '{EVIL}' may not call the gateway from a browser "
            "(server.cors.allow_origins)",
        }
    } == orjson.loads(body)
    assert [] == [k for k in headers if k.lower().startswith("access-control-")]
    assert "Origin" in headers.getall("Vary")
    assert [] == upstream.posts


@pytest.mark.parametrize(
    ("method", "asked", "message"),
    [
        ("DELETE", "authorization", "method DELETE is not served on this route (it takes POST)"),
        (
            "POST",
            "authorization, x-evil",
            "header 'x-evil' may not be sent from a browser (server.cors.allow_headers)",
        ),
    ],
)
async def test_preflight_of_a_method_or_header_not_allowed(
    cors_gw, upstream, method, asked, message
) -> None:
    """A method the route does not serve, or a header not in allow_headers: 403, no
    Allow-Methods or Allow-Headers, so the browser sends nothing."""
    status, headers, body = await send(
        cors_gw.url + "/v1/chat/completions",
        "OPTIONS",
        preflight_headers(method=method, headers=asked),
    )
    assert (403, {"error": {"type": "permission_denied", "message": message}}) == (
        status,
        orjson.loads(body),
    )
    assert None is headers.get("Access-Control-Allow-Methods")
    assert None is headers.get("Access-Control-Allow-Headers")
    assert [] == upstream.posts


async def test_preflight_of_an_unknown_route_is_404(cors_gw) -> None:
    """A path no route serves: the 404 envelope (the browser then sends nothing)."""
    status, _, body = await send(cors_gw.url + "/v9/nothing", "OPTIONS", preflight_headers())
    assert (404, "not_found") == (status, orjson.loads(body)["error"]["type"])


async def test_preflight_on_the_endpoint_proxy_is_not_forwarded(cors_gw, upstream) -> None:
    """/models/{endpoint}/proxy/... forwards every method, but a preflight is the gateway's:
    answered here for the method asked, never sent to the backend."""
    status, headers, _ = await send(
        cors_gw.url + "/models/m/proxy/classify", "OPTIONS", preflight_headers(method="PUT")
    )
    assert (204, "PUT") == (status, headers["Access-Control-Allow-Methods"])
    assert [] == upstream.posts


async def test_plain_answer_carries_the_headers(cors_gw) -> None:
    """A JSON answer to an allowed origin: Allow-Origin, Expose-Headers, Vary: Origin."""
    status, headers, _ = await send(
        cors_gw.url + "/v1/chat/completions",
        "POST",
        {"Origin": APP, "Authorization": "Bearer k-app", "Content-Type": "application/json"},
        CHAT,
    )
    assert (200, APP, EXPOSE_HEADERS) == (
        status,
        headers["Access-Control-Allow-Origin"],
        headers["Access-Control-Expose-Headers"],
    )
    assert "Origin" in headers.getall("Vary")


async def test_error_answer_carries_the_headers(cors_gw, upstream) -> None:
    """The real request still needs its key: a 401 envelope the page can read."""
    status, headers, body = await send(
        cors_gw.url + "/v1/chat/completions", "POST", {"Origin": APP}, CHAT
    )
    assert (401, "authentication_error") == (status, orjson.loads(body)["error"]["type"])
    assert APP == headers["Access-Control-Allow-Origin"]
    assert [] == upstream.posts


async def test_answer_to_an_origin_not_listed_allows_nothing(cors_gw) -> None:
    """The request is served (CORS is not access control; the key is), but without
    Access-Control-Allow-Origin, so the browser keeps the answer from the page."""
    status, headers, _ = await send(
        cors_gw.url + "/v1/chat/completions",
        "POST",
        {"Origin": EVIL, "Authorization": "Bearer k-app"},
        CHAT,
    )
    assert (200, None) == (status, headers.get("Access-Control-Allow-Origin"))


async def vllm_like_stream(request: web.Request, rec: Received) -> web.StreamResponse:
    """A stream whose head has vLLM's own CORS headers (its default --allowed-origins '*')."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Credentials": "true",
        }
    )
    await response.prepare(request)
    for i in range(3):
        await response.write(chunk_event(i, f"t{i}"))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def test_stream_carries_the_headers_in_its_head(cors_gw, upstream) -> None:
    """A streamed chat answer's head has the gateway's Access-Control-* headers, and only
    them: the backend's own are dropped (two Allow-Origin values fail in a browser)."""
    upstream.script["/v1/chat/completions"] = vllm_like_stream
    body = orjson.dumps({"model": "m", "stream": True, "messages": []})
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            cors_gw.url + "/v1/chat/completions",
            data=body,
            headers={"Origin": APP, "Authorization": "Bearer k-app"},
        ) as r,
    ):
        head = (r.status, r.headers.getall("Access-Control-Allow-Origin"))
        credentials = r.headers.get("Access-Control-Allow-Credentials")
        events = [line async for line in r.content if line.startswith(b"data: ")]
    assert (200, [APP]) == head
    assert None is credentials
    assert 4 == len(events)
    assert APP == upstream.last.headers["origin"]  # the client's headers still go upstream


async def test_options_without_origin_is_a_405(cors_gw, upstream) -> None:
    """OPTIONS that is no preflight is what it was: a key first, then the 405 envelope."""
    no_key = await send(cors_gw.url + "/v1/chat/completions", "OPTIONS", {})
    keyed = await send(
        cors_gw.url + "/v1/chat/completions", "OPTIONS", {"Authorization": "Bearer k-app"}
    )
    assert (401, "authentication_error") == (no_key[0], orjson.loads(no_key[2])["error"]["type"])
    assert (
        405,
        {"error": {"type": "invalid_request", "message": "method OPTIONS is not allowed here"}},
    ) == (
        keyed[0],
        orjson.loads(keyed[2]),
    )
    assert [] == upstream.posts


async def test_cors_off_adds_nothing(gateway_factory, upstream) -> None:
    """Without server.cors, a preflight is an OPTIONS like any other (401 without a key, 405
    with one) and no answer carries an Access-Control-* header of the gateway's."""
    gw = await gateway_factory(one_backend(upstream.url), KEYS)
    url = gw.url + "/v1/chat/completions"
    no_key = await send(url, "OPTIONS", preflight_headers())
    keyed = await send(url, "OPTIONS", {**preflight_headers(), "Authorization": "Bearer k-app"})
    answer = await send(url, "POST", {"Origin": APP, "Authorization": "Bearer k-app"}, CHAT)
    assert (401, 405, 200) == (no_key[0], keyed[0], answer[0])
    for _, headers, _ in (no_key, keyed, answer):
        assert [] == [k for k in headers if k.lower().startswith("access-control-")]
        assert "Origin" not in headers.getall("Vary", [])


async def test_any_origin_and_any_header(gateway_factory, upstream) -> None:
    """allow_origins ['*'] answers '*' (no Vary needed); allow_headers ['*'] names back the
    headers asked (a wildcard would not cover Authorization), such as the OpenAI JS SDK's."""
    extra = "server:\n  cors: {allow_origins: ['*'], allow_headers: ['*']}\n"
    gw = await gateway_factory(one_backend(upstream.url, extra=extra), KEYS)
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    status, headers, _ = await send(
        gw.url + "/v1/chat/completions", "OPTIONS", preflight_headers(origin=EVIL, headers=asked)
    )
    assert (204, "*", asked) == (
        status,
        headers["Access-Control-Allow-Origin"],
        headers["Access-Control-Allow-Headers"],
    )
    assert "600" == headers["Access-Control-Max-Age"]  # the default
    assert "Origin" not in headers.getall("Vary", [])


async def test_preflight_with_a_malformed_header_list_is_400(gateway_factory, upstream) -> None:
    """Requested header names that are not tokens are not named back: 400 invalid_request."""
    extra = "server:\n  cors: {allow_origins: ['*'], allow_headers: ['*']}\n"
    gw = await gateway_factory(one_backend(upstream.url, extra=extra), KEYS)
    status, _, body = await send(
        gw.url + "/v1/chat/completions", "OPTIONS", preflight_headers(headers="x-ok, bad header")
    )
    assert (400, "invalid_request") == (status, orjson.loads(body)["error"]["type"])


async def test_admin_api_gets_no_cors(gateway_factory, upstream, tmp_path) -> None:
    """No browser origin may call the admin API: its preflight is not answered (the admin
    key is asked for first) and its answers carry no Access-Control-* header."""
    extra = CORS + f"auth: {{store: '{tmp_path / 'keys.db'}', admin_key_env: ADMIN_KEY}}\n"
    env = {**KEYS, "ADMIN_KEY": "a" * 32}
    gw = await gateway_factory(one_backend(upstream.url, extra=extra), env)
    status, headers, _ = await send(gw.url + "/admin/keys", "OPTIONS", preflight_headers())
    assert 401 == status
    assert [] == [k for k in headers if k.lower().startswith("access-control-")]


def readme_section() -> str:
    text = README.read_text()
    return text.split("\n## CORS\n", 1)[1].split("\n## ", 1)[0]


async def test_readme_cors_example(gateway_factory, upstream) -> None:
    """README's CORS example (its backend pointed at a fake) answers its preflight as shown."""
    text = readme_section()
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    config["backends"] = {"gpu-a": {"url": upstream.url, "kind": "vllm"}}
    gw = await gateway_factory(orjson.dumps(config).decode(), KEYS)
    head = re.search(r"```http\n(.*?)```", text, re.S).group(1)
    request_line, *request_headers = head.splitlines()
    asked = dict(line.split(": ", 1) for line in request_headers if ": " in line)
    answer = re.search(r"```http\nHTTP/1.1 (.*?)```", text, re.S).group(1).strip().splitlines()
    expected = dict(line.split(": ", 1) for line in answer[1:] if ": " in line)
    path = request_line.split()[1]
    status, headers, _ = await send(gw.url + path, "OPTIONS", asked)
    assert (int(answer[0].split()[0]), expected) == (
        status,
        {k: headers.get(k) for k in expected},
    )


PAGE = """<!doctype html>
<title>chat</title>
<script>
(async () => {
  const out = {};
  try {
    const r = await fetch(%(gateway)s + "/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer k-app", "Content-Type": "application/json"},
      body: JSON.stringify({model: "m", stream: true, messages: [{role: "user", content: "hi"}]}),
    });
    out.status = r.status;
    out.requestId = r.headers.get("x-request-id");
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    out.text = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      out.text += decoder.decode(value, {stream: true});
    }
  } catch (e) {
    out.error = String(e);
  }
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
})();
</script>
"""


async def browser_fetch(gateway_url: str, tmp_path: Path, page_port: int) -> dict:
    """Serve PAGE on 127.0.0.1:`page_port`, open it in headless Chromium, and return what
    its fetch() of a streamed chat answer from the gateway reported (within 60 s)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (make test installs it)", pytrace=False)
    result: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text=PAGE % {"gateway": orjson.dumps(gateway_url).decode()}, content_type="text/html"
        )

    async def report(request: web.Request) -> web.Response:
        if not result.done():
            result.set_result(orjson.loads(await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/result", report)
    server = TestServer(app, host="127.0.0.1", port=page_port)
    await server.start_server()
    browser = subprocess.Popen(  # noqa: ASYNC220  (a long-lived child, stopped below by its pid)
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            f"http://127.0.0.1:{server.port}/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its renderers and helpers share its process group
    )
    try:
        async with asyncio.timeout(60):
            return await result
    finally:
        browser.terminate()  # it stops its own renderers and helpers...
        try:
            await asyncio.to_thread(browser.wait, 10)
        finally:
            with contextlib.suppress(ProcessLookupError):  # ...and any left are killed here
                os.killpg(browser.pid, signal.SIGKILL)
            await asyncio.to_thread(browser.wait, 10)
        await server.close()


async def test_chromium_streams_a_chat_answer_from_another_origin(
    gateway_factory, upstream, tmp_path
) -> None:
    """A page on one 127.0.0.1 port fetch()es a streamed chat answer with a key from the
    gateway on another: the browser's preflight passes, the page reads every event and the
    exposed x-request-id; the gateway saw the preflight (without a key) and the stream."""
    page_port = free_port()
    extra = f"server:\n  cors: {{allow_origins: ['http://127.0.0.1:{page_port}']}}\n"
    gw = await gateway_factory(one_backend(upstream.url, extra=extra), KEYS)
    got = await browser_fetch(gw.url, tmp_path, page_port)
    assert (200, None) == (got.get("status"), got.get("error"))
    assert got["requestId"]
    events = [e for e in got["text"].split("\n\n") if e]
    assert [e for e in events if e.startswith("data: {")] == events[:-1]
    assert "data: [DONE]" == events[-1]
    lines = [orjson.loads(line) for line in gw.access_lines()]
    assert [("OPTIONS", 204), ("POST", 200)] == [
        (line["method"], line["status"]) for line in lines if line["path"] == "/v1/chat/completions"
    ]
    assert got["requestId"] == lines[-1]["request_id"]


async def test_chromium_keeps_the_answer_from_an_origin_not_listed(
    gateway_factory, upstream, tmp_path
) -> None:
    """The same page from an origin not listed: the preflight is refused, so the browser
    sends no request (the page sees a network error) and nothing reaches the backend."""
    listed, page_port = free_port(), free_port()
    extra = f"server:\n  cors: {{allow_origins: ['http://127.0.0.1:{listed}']}}\n"
    gw = await gateway_factory(one_backend(upstream.url, extra=extra), KEYS)
    got = await browser_fetch(gw.url, tmp_path, page_port)
    assert "TypeError: Failed to fetch" == got.get("error")
    lines = [orjson.loads(line) for line in gw.access_lines()]
    assert [("OPTIONS", 403)] == [(line["method"], line["status"]) for line in lines]
    assert [] == upstream.posts


async def test_translated_stream_carries_the_headers(gateway_factory, upstream) -> None:
    """An Anthropic stream the gateway translates from chat (a TGI backend) has them too."""
    text = one_backend(upstream.url, extra=CORS).replace("kind: vllm", "kind: tgi")
    gw = await gateway_factory(text, KEYS)
    body = {
        "model": "m",
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.url + "/anthropic/v1/messages",
            json=body,
            headers={"Origin": APP, "x-api-key": "k-app"},
        ) as r,
    ):
        head = (r.status, r.headers.get("Access-Control-Allow-Origin"))
        events = [line async for line in r.content if line.startswith(b"event: ")]
    assert (200, APP) == head
    assert b"event: message_start\n" == events[0]
    assert "/v1/chat/completions" == upstream.last.path


async def test_a_reload_keeps_the_cors_in_force(cors_gw, upstream) -> None:
    """A reloaded file with another server.cors changes nothing until a restart: the origin
    it adds is still refused, the one it drops still allowed (README: CORS, Reload)."""
    live = cors_gw.serving.runner.app[LIVE]
    other = "server:\n  cors: {allow_origins: ['https://new.example']}\n"
    await apply(live, load_config(one_backend(upstream.url, extra=other)), KEYS)
    assert live.state is not cors_gw.state
    url = cors_gw.url + "/v1/chat/completions"
    assert 403 == (await send(url, "OPTIONS", preflight_headers(origin="https://new.example")))[0]
    assert 204 == (await send(url, "OPTIONS", preflight_headers()))[0]
