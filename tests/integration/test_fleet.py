"""A fleet behind one name, on real sockets: retries and fallbacks before the first byte,
the deadline-ordered queue, outlier ejection, least_loaded and affinity, one load count on
every route family."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import wait_for
from tests.fakes import (
    Received,
    Script,
    chat_body,
    default_script,
    json_script,
    sequence_script,
    slow_json_script,
)
from tests.integration.test_bad_input import call, call_text
from tests.integration.test_metrics import samples, value

CHAT = "/v1/chat/completions"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


def fleet(*urls: str, policy: str = "least_loaded", extra: str = "", limit: str = "") -> str:
    backends = "".join(
        f"  b{i}: {{url: '{url}', kind: vllm{limit}}}\n" for i, url in enumerate(urls)
    )
    targets = ", ".join(f"{{backend: b{i}}}" for i in range(len(urls)))
    return f"backends:\n{backends}models:\n  m: {{targets: [{targets}], policy: {policy}}}\n{extra}"


async def scrape(url: str) -> dict:
    return samples(await call_text(url + "/metrics"))


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_a_retryable_answer_goes_on_to_the_next_target(
    gateway_factory, upstream_factory, status
) -> None:
    """A 429/502/503/504 from one target, before any byte reached the client, is not
    relayed: the next target answers, and the retry is counted and logged."""
    bad, good = await upstream_factory(), await upstream_factory()
    bad.script[CHAT] = json_script(status, {"error": "busy"})
    gw = await gateway_factory(fleet(bad.url, good.url, policy="weighted"))
    for _ in range(6):  # whichever the policy leads with, each request ends on `good`
        code, payload, _ = await call(gw.url + CHAT, BODY)
        assert (200, "chat.completion") == (code, payload["object"])
    got = await scrape(gw.url)
    assert len(bad.posts) == value(got, "proxy_retries_total", model="m", reason=str(status))
    tries = [
        json.loads(line)["tries"] for line in gw.access_lines() if b'"route":"/v1/chat' in line
    ]
    assert {f"b0:{status}"} >= {t[0] for t in tries if len(t) == 2}


async def test_a_meant_status_is_relayed_not_retried(gateway_factory, upstream_factory) -> None:
    """400, 401, 403, 404 and 422 are the backend's answer to this request: relayed as sent."""
    first, second = await upstream_factory(), await upstream_factory()
    for fake in (first, second):
        fake.script[CHAT] = json_script(422, {"detail": "bad field"})
    gw = await gateway_factory(fleet(first.url, second.url))
    code, payload, _ = await call(gw.url + CHAT, BODY)
    assert (422, {"detail": "bad field"}) == (code, payload)
    assert 1 == len(first.posts) + len(second.posts)


async def test_the_last_target_s_retryable_answer_is_relayed(gateway_factory, upstream) -> None:
    """With no target left, the backend's own 503 (its body, its status) reaches the client."""
    upstream.script[CHAT] = json_script(503, {"error": "server busy"})
    gw = await gateway_factory(fleet(upstream.url))
    assert (503, {"error": "server busy"}) == (await call(gw.url + CHAT, BODY))[:2]


async def test_unreachable_targets_and_fallbacks_of_fallbacks(gateway_factory, upstream) -> None:
    """Targets that refuse connections are passed over, then the model's fallbacks and
    theirs, in order, within the one deadline."""
    config = (
        "backends:\n"
        "  dead1: {url: 'http://127.0.0.1:9', kind: vllm}\n"
        "  dead2: {url: 'http://127.0.0.1:9', kind: vllm}\n"
        f"  live: {{url: '{upstream.url}', kind: vllm}}\n"
        "models:\n"
        "  m: {targets: [{backend: dead1}, {backend: dead2}], fallbacks: [n]}\n"
        "  n: {targets: [{backend: dead1, model: n1}], fallbacks: [o]}\n"
        "  o: {targets: [{backend: live, model: up-o}]}\n"
    )
    gw = await gateway_factory(config)
    code, _, _ = await call(gw.url + CHAT, BODY)
    assert 200 == code
    assert b'"model": "up-o"' in upstream.last.body or b'"model":"up-o"' in upstream.last.body
    line = json.loads(gw.access_lines()[-1])
    assert ["dead1:unreachable", "dead2:unreachable", "dead1:unreachable", "live"] == sorted(
        line["tries"][:2]
    ) + line["tries"][2:]


async def test_a_target_tried_in_an_earlier_step_is_not_queued_for_again(
    gateway_factory, upstream_factory
) -> None:
    """A target full in the first step but tried (and failed) in a fallback step is not
    waited for once more: the queue waits for the target never tried, which answers. (`a`
    leads `m`'s step by weight, all but surely: full, it is passed over for `b`.)"""
    a, b, c = [await upstream_factory() for _ in range(3)]
    a_free, c_free = asyncio.Event(), asyncio.Event()
    config = (
        "backends:\n"
        f"  a: {{url: '{a.url}', kind: vllm, max_in_flight: 1}}\n"
        f"  b: {{url: '{b.url}', kind: vllm}}\n"
        f"  c: {{url: '{c.url}', kind: vllm, max_in_flight: 1}}\n"
        "models:\n"
        "  m: {targets: [{backend: a, model: up, weight: 1e6}, {backend: b, model: up, "
        "weight: 1e-6}], policy: weighted, fallbacks: [n]}\n"
        "  n: {targets: [{backend: a, model: up}, {backend: c, model: up}]}\n"
        "  pa: {targets: [{backend: a, model: up}]}\n"
        "  pc: {targets: [{backend: c, model: up}]}\n"
    )
    gw = await gateway_factory(config)

    def held(event: asyncio.Event, then: Script) -> Script:
        async def handle(request: web.Request, rec: Received) -> web.StreamResponse:
            await event.wait()
            return await then(request, rec)

        return handle

    async def b_answer(request: web.Request, rec: Received) -> web.StreamResponse:
        a_free.set()  # `a`'s slot frees while `b` is tried: the fallback step finds it free
        await wait_for(lambda: gw.state.backends["a"].in_flight == 0)
        return await busy(request, rec)

    busy = json_script(503, {"error": "busy"})
    a.script[CHAT] = sequence_script(held(a_free, default_script), busy)
    b.script[CHAT] = b_answer
    c.script[CHAT] = sequence_script(held(c_free, default_script), default_script)
    hold_a = asyncio.create_task(call(gw.url + CHAT, BODY.replace(b'"m"', b'"pa"')))
    await wait_for(lambda: len(a.posts) == 1)
    hold_c = asyncio.create_task(call(gw.url + CHAT, BODY.replace(b'"m"', b'"pc"')))
    await wait_for(lambda: len(c.posts) == 1)
    served = asyncio.create_task(call(gw.url + CHAT, BODY))
    await wait_for(lambda: gw.state.admission.waiting == 1 or served.done())
    c_free.set()
    code, payload, _ = await served
    assert (200, "chat.completion") == (code, payload.get("object")), payload
    assert [200, 200] == [(await hold_a)[0], (await hold_c)[0]]
    assert (2, 1, 2) == (len(a.posts), len(b.posts), len(c.posts))
    tries = [json.loads(line)["tries"] for line in gw.access_lines() if b'"model":"m"' in line]
    assert [["b:503", "a:503", "c"]] == tries


async def test_the_queue_serves_the_nearest_deadline_first(gateway_factory, upstream) -> None:
    """With the only target full, waiting requests get the slot in deadline order, not in
    arrival order."""
    upstream.script[CHAT] = slow_json_script(0.3)
    gw = await gateway_factory(fleet(upstream.url, limit=", max_in_flight: 1"))
    busy = asyncio.create_task(call(gw.url + CHAT, BODY))
    await wait_for(lambda: len(upstream.posts) == 1)
    order: list[str] = []

    async def queued(name: str, budget: str) -> None:
        body = BODY.replace(b'"hi"', f'"{name}"'.encode())
        code, _, _ = await call(gw.url + CHAT, body, {"OICM-Request-Timeout": budget})
        assert 200 == code
        order.append(name)

    late = asyncio.create_task(queued("late", "60"))
    await wait_for(lambda: gw.state.admission.waiting == 1)
    soon = asyncio.create_task(queued("soon", "10"))
    await wait_for(lambda: gw.state.admission.waiting == 2)
    await asyncio.gather(busy, late, soon)
    sent = [json.loads(r.body)["messages"][0]["content"] for r in upstream.posts]
    assert ["hi", "soon", "late"] == sent
    got = await scrape(gw.url)
    assert 2 == value(got, "proxy_queue_wait_seconds_count", model="m")
    assert 0 == value(got, "proxy_queue_depth")


async def test_a_deadline_that_passes_in_the_queue_is_a_504_at_once(
    gateway_factory, upstream
) -> None:
    """A request whose deadline passes while it waits gets its 504 then, and never reaches a
    backend; one that waits past server.queue_timeout_s gets 503 overloaded."""
    upstream.script[CHAT] = slow_json_script(2)
    gw = await gateway_factory(
        fleet(upstream.url, limit=", max_in_flight: 1", extra="server: {queue_timeout_s: 0.5}\n")
    )
    busy = asyncio.create_task(call(gw.url + CHAT, BODY))
    await wait_for(lambda: len(upstream.posts) == 1)
    started = time.monotonic()
    code, payload, _ = await call(gw.url + CHAT, BODY, {"OICM-Request-Timeout": "0.2"})
    assert (504, "backend_timeout") == (code, payload["error"]["type"])
    assert time.monotonic() - started < 0.45
    code, payload, headers = await call(gw.url + CHAT, BODY)
    assert (503, "overloaded", "1") == (code, payload["error"]["type"], headers["Retry-After"])
    assert 1 == len(upstream.posts)
    busy.cancel()


async def test_clients_that_leave_the_queue_leave_nothing(gateway_factory, upstream) -> None:
    """A queue whose clients all go away empties, and none of them reaches a backend."""
    upstream.script[CHAT] = slow_json_script(1)
    gw = await gateway_factory(fleet(upstream.url, limit=", max_in_flight: 1"))
    busy = asyncio.create_task(call(gw.url + CHAT, BODY))
    await wait_for(lambda: len(upstream.posts) == 1)
    leavers = [asyncio.create_task(call(gw.url + CHAT, BODY)) for _ in range(5)]
    await wait_for(lambda: gw.state.admission.waiting == 5)
    for task in leavers:
        task.cancel()
    await wait_for(lambda: gw.state.admission.waiting == 0)
    assert 200 == (await busy)[0]
    await wait_for(lambda: gw.state.backends["b0"].in_flight == 0)
    assert 1 == len(upstream.posts)


async def test_a_failing_backend_is_ejected(gateway_factory, upstream_factory) -> None:
    """Consecutive 5xx answers eject a backend: it shows as down, is counted, and the other
    target takes the traffic until its ejection ends."""
    bad, good = await upstream_factory(), await upstream_factory()
    bad.script[CHAT] = json_script(500, {"error": "engine died"})
    extra = "outlier_detection: {consecutive_failures: 2, base_ejection_s: 60}\n"
    gw = await gateway_factory(fleet(bad.url, good.url, policy="weighted", extra=extra))
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    for _ in range(30):
        await call(gw.url + CHAT, BODY)
        if gw.state.fleet["b0"].ejected_until:
            break
    assert 2 == len(bad.posts)
    posts = len(good.posts)
    for _ in range(5):
        assert 200 == (await call(gw.url + CHAT, BODY))[0]
    assert (2, posts + 5) == (len(bad.posts), len(good.posts))
    got = await scrape(gw.url)
    assert 1 == value(got, "proxy_backend_ejections_total", backend="b0")
    assert (0, 1) == (
        value(got, "proxy_backend_up", backend="b0"),
        value(got, "proxy_backend_up", backend="b1"),
    )


ROUTE_FAMILIES = {
    "openai": ("/v1/chat/completions", BODY),
    "anthropic": ("/anthropic/v1/messages", b'{"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'),
    "mlflow": ("/endpoints/m/invocations", b'{"messages": [{"role": "user", "content": "hi"}]}'),
    "oicm": ("/models/m/proxy/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}'),
}  # fmt: skip


@pytest.mark.parametrize("family", ROUTE_FAMILIES)
async def test_every_route_family_counts_its_load(
    gateway_factory, upstream_factory, family
) -> None:
    """On every route family a request in flight counts on its backend (least_loaded sends
    the next one elsewhere) and the count returns to 0 when it ends."""
    path, body = ROUTE_FAMILIES[family]
    slow, fast = await upstream_factory(), await upstream_factory()
    answer = chat_body()
    for fake in (slow, fast):
        fake.script["/v1/chat/completions"] = slow_json_script(0.5, answer)
        fake.script["/v1/messages"] = slow_json_script(0.5, answer)
    config = fleet(slow.url, fast.url).replace("kind: vllm", "kind: tgi")
    gw = await gateway_factory(config)
    first = asyncio.create_task(call(gw.url + path, body))
    await wait_for(lambda: len(slow.posts) + len(fast.posts) == 1)
    busy = "b0" if slow.posts else "b1"
    assert 1 == gw.state.backends[busy].in_flight
    second = asyncio.create_task(call(gw.url + path, body))
    await wait_for(lambda: len(slow.posts) + len(fast.posts) == 2)
    assert 1 == len(slow.posts) == len(fast.posts)  # least_loaded saw the first one's slot
    assert [200, 200] == [(await t)[0] for t in (first, second)]
    await wait_for(lambda: all(b.in_flight == 0 for b in gw.state.backends.values()))


async def test_affinity_keeps_a_session_on_one_replica_in_every_gateway(
    gateway_factory, upstream_factory
) -> None:
    """Requests with the same X-Session-ID go to the same replica, and two gateways in front
    of the same replicas make the same choice without talking to each other."""
    fakes = [await upstream_factory() for _ in range(3)]
    config = fleet(*(f.url for f in fakes), policy="affinity")
    gateways = [await gateway_factory(config) for _ in range(2)]
    for gw in gateways:
        await wait_for(lambda gw=gw: all(h.probed_up for h in gw.state.fleet.values()))
    chosen: dict[str, set[str]] = {}
    for session in ("alice", "bob", "carol", "dave", "erin", "frank"):
        for gw in gateways:
            for _ in range(3):
                assert 200 == (await call(gw.url + CHAT, BODY, {"X-Session-ID": session}))[0]
                backend = json.loads(gw.access_lines()[-1])["backend"]
                chosen.setdefault(session, set()).add(backend)
    assert all(1 == len(backends) for backends in chosen.values()), chosen
    assert len({next(iter(b)) for b in chosen.values()}) > 1  # sessions spread over replicas
    got = await scrape(gateways[0].url)
    assert 18 == sum(
        v for (name, labels), v in got.items()
        if name == "proxy_routing_decisions_total" and dict(labels)["reason"] == "affinity"
    )  # fmt: skip


HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def misbehaving(answer: bytes | None):
    """A backend that passes its health probes and misbehaves on every POST: it sends
    `answer` (not HTTP), or with None never answers until the gateway hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while head := await reader.read(65536):
                if head.startswith(b"GET"):
                    writer.write(HEALTHY)
                elif answer is not None:
                    writer.write(answer)
                    await writer.drain()
                    break
        writer.close()

    return serve


@pytest.mark.parametrize(
    ("answer", "reason"),
    [(None, "timeout"), (b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01garbage", "unreachable")],
    ids=["silent", "garbage"],
)
async def test_a_broken_target_is_passed_over(gateway_factory, upstream, answer, reason) -> None:
    """A target that never answers a stream's head (cut at timeouts.head_s) or answers
    garbage is left for the next one: the client gets its answer, well before its deadline."""
    server = await asyncio.start_server(misbehaving(answer), "127.0.0.1", 0)
    broken = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = (
        "timeouts: {head_s: 0.3}\n"
        "backends:\n"
        f"  broken: {{url: '{broken}', kind: vllm}}\n"
        f"  good: {{url: '{upstream.url}', kind: vllm}}\n"
        "models:\n  m: {targets: [{backend: broken, weight: 1000}, {backend: good, weight: 0.001}],"
        " policy: weighted}\n"
    )
    gw = await gateway_factory(config)
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    try:
        started = time.monotonic()
        stream = b'{"model": "m", "stream": true}'  # head_s bounds streams: their head comes first
        async with aiohttp.ClientSession() as s:
            headers = {"OICM-Request-Timeout": "5"}
            async with s.post(gw.url + CHAT, data=stream, headers=headers) as r:
                assert 200 == r.status
                assert b"data: [DONE]" in await r.read()
        assert time.monotonic() - started < 3
        assert [f"broken:{reason}", "good"] == json.loads(gw.access_lines()[-1])["tries"]
    finally:
        server.close()


async def test_a_stream_cut_after_its_first_byte_is_not_retried(
    gateway_factory, upstream_factory
) -> None:
    """Once a byte reached the client, a backend that dies ends the stream with the error
    event; no other target gets the request."""
    from tests.fakes import stream_script

    dying, other = await upstream_factory(), await upstream_factory()
    dying.script[CHAT] = stream_script(tokens=5, cut_after=2)
    config = (
        f"backends:\n  dying: {{url: '{dying.url}', kind: vllm}}\n"
        f"  other: {{url: '{other.url}', kind: vllm}}\n"
        "models:\n  m: {targets: [{backend: dying, weight: 1000}, {backend: other, weight: 0.001}],"
        " policy: weighted}\n"
    )
    gw = await gateway_factory(config)
    async with aiohttp.ClientSession() as s:
        body = b'{"model": "m", "stream": true}'
        async with s.post(gw.url + CHAT, data=body) as r:
            text = await r.read()
    assert b'"type":"backend_unreachable"' in text
    assert b"[DONE]" not in text
    assert ([], 1) == (other.posts, len(dying.posts))


async def test_least_loaded_reads_the_backends_own_queues(
    gateway_factory, upstream_factory
) -> None:
    """A vLLM that says (in its /metrics, scraped in the background) that it queues many
    requests gets no new ones while an idle replica has room, though the gateway has none in
    flight on either (staleness is unit-tested in test_signals)."""
    queued, idle = await upstream_factory(), await upstream_factory()
    waiting = {"n": 50}

    async def metrics(request, rec):
        return web.Response(text=f'vllm:num_requests_waiting{{model_name="m"}} {waiting["n"]}\n')

    queued.script["/metrics"] = metrics
    idle.script["/metrics"] = json_script(200, {})  # not Prometheus text: no signal
    gw = await gateway_factory(fleet(queued.url, idle.url, extra="health: {interval_s: 0.1}\n"))
    await wait_for(lambda: "b0" in gw.state.signals and gw.state.fleet["b1"].probed_up)
    for _ in range(20):
        assert 200 == (await call(gw.url + CHAT, BODY))[0]
    assert (0, 20) == (len(queued.posts), len(idle.posts))


async def test_a_backend_slow_only_on_its_health_probes(gateway_factory, upstream) -> None:
    """Probes that time out mark the backend down (/ready says so), but a model with no other
    target still sends it requests, which it answers: health steers traffic, never refuses it."""

    async def slow_health(request, rec):
        await asyncio.sleep(1)
        return web.json_response({"status": "ok"})

    upstream.script["/health"] = slow_health
    gw = await gateway_factory(
        fleet(upstream.url, extra="health: {interval_s: 0.05, timeout_s: 0.05}\n")
    )
    await asyncio.sleep(0.4)
    assert not gw.state.fleet["b0"].probed_up
    code, payload, _ = await call(gw.url + "/ready", b"", method="GET")
    assert (503, ["m"]) == (code, payload["unready"])
    assert 200 == (await call(gw.url + CHAT, BODY))[0]


async def test_a_saturated_only_target_is_still_tried_at_once(gateway_factory, upstream) -> None:
    """A backend that just answered 503 is tried after the others for a second; with no other
    target the next request goes to it at once (it does not wait in the queue)."""
    upstream.script[CHAT] = json_script(503, {"error": "server busy"})
    gw = await gateway_factory(fleet(upstream.url))
    assert 503 == (await call(gw.url + CHAT, BODY))[0]
    upstream.script[CHAT] = json_script(200, chat_body())
    started = time.monotonic()
    assert 200 == (await call(gw.url + CHAT, BODY))[0]
    assert time.monotonic() - started < 1
    assert 0 == gw.state.admission.waiting


async def test_two_gateways_with_agreed_placement_split_sessions_alike(
    gateway_factory, upstream_factory
) -> None:
    """`routing.key_placement: agreed`: 24 sessions whose requests a coin sends to one of two
    gateways end on the same replica in both, 8 on each (a hash alone spreads them unevenly),
    and a request of a session's from either gateway reaches that replica."""
    fakes = [await upstream_factory() for _ in range(3)]
    routing = "routing: {key_placement: agreed}\n"
    config = routing + fleet(*(f.url for f in fakes), policy="affinity")
    gateways = [await gateway_factory(config) for _ in range(2)]
    for gw in gateways:
        await wait_for(lambda gw=gw: all(h.probed_up for h in gw.state.fleet.values()))
    coin = random.Random(11)
    sessions = [f"tenant-{i}" for i in range(24)]
    for _ in range(5):
        for session in sessions:
            gw = gateways[coin.randrange(2)]
            assert 200 == (await call(gw.url + CHAT, BODY, {"X-Session-ID": session}))[0]
    for gw in gateways:  # each has seen every session twice at least by now
        for session in sessions:
            for _ in range(2):
                await call(gw.url + CHAT, BODY, {"X-Session-ID": session})
    landed: list[dict[str, str]] = [{}, {}]
    for g, gw in enumerate(gateways):
        for session in sessions:
            assert 200 == (await call(gw.url + CHAT, BODY, {"X-Session-ID": session}))[0]
            landed[g][session] = json.loads(gw.access_lines()[-1])["backend"]
    assert landed[0] == landed[1]
    assert [8, 8, 8] == sorted(Counter(landed[0].values()).values())
    assert {"b0": 8, "b1": 8, "b2": 8} == gateways[0].state.prefix_index.counts
