"""Review findings on the fleet code (forward, admission, balance, fleet), each a failing test
on real sockets: what a demanding operator or a hostile client would hit."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.conftest import wait_for
from tests.fakes import json_script, slow_json_script
from tests.integration.test_bad_input import call
from tests.integration.test_fleet import BODY, CHAT, fleet, scrape
from tests.integration.test_metrics import value

EMBEDDINGS = "/v1/embeddings"
MESSAGES = "/anthropic/v1/messages"
ANTHROPIC_BODY = b'{"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'


async def test_a_target_that_lacks_the_route_passes_the_request_on(
    gateway_factory, upstream_factory
) -> None:
    """A model whose targets mix a kind without /v1/embeddings (tgi) and one with it (vllm)
    answers every embeddings request from the one that serves it, never a 501."""
    tgi, vllm = await upstream_factory(), await upstream_factory()
    vllm.script[EMBEDDINGS] = json_script(200, {"object": "list", "data": []})
    config = (
        "backends:\n"
        f"  tgi: {{url: '{tgi.url}', kind: tgi}}\n"
        f"  gpu: {{url: '{vllm.url}', kind: vllm}}\n"
        "models:\n"
        "  m: {targets: [{backend: tgi, weight: 1000}, {backend: gpu, weight: 0.001}],"
        " policy: weighted}\n"
    )
    gw = await gateway_factory(config)
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    body = b'{"model": "m", "input": "hello"}'
    codes = [(await call(gw.url + EMBEDDINGS, body))[0] for _ in range(3)]
    assert [200, 200, 200] == codes


async def test_head_s_does_not_cut_a_non_streaming_generation(
    gateway_factory, upstream_factory
) -> None:
    """timeouts.head_s (meant to pass over a silent backend) does not fail a non-streaming
    request whose backend sends its head only when the whole answer is done, nor run that
    one generation on every target in turn."""
    first, second = await upstream_factory(), await upstream_factory()
    for fake in (first, second):
        fake.script[CHAT] = slow_json_script(0.8)  # a 0.8 s generation, no head before it
    gw = await gateway_factory(fleet(first.url, second.url, extra="timeouts: {head_s: 0.3}\n"))
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    code, _, _ = await call(gw.url + CHAT, BODY, {"OICM-Request-Timeout": "10"})
    assert (200, 1) == (code, len(first.posts) + len(second.posts))


async def test_every_target_down_still_spreads_the_load(gateway_factory, upstream_factory) -> None:
    """When every target's probes fail (probes that time out under load, a wrong health
    route), least_loaded still spreads concurrent requests over the replicas instead of
    sending every one to the first in the config."""
    fakes = [await upstream_factory() for _ in range(2)]
    for fake in fakes:
        fake.script["/health"] = json_script(500, {"status": "sick"})
        fake.script[CHAT] = slow_json_script(0.5)
    gw = await gateway_factory(fleet(*(f.url for f in fakes)))
    await wait_for(lambda: all(any(r.path == "/health" for r in f.received) for f in fakes))
    assert not any(h.probed_up for h in gw.state.fleet.values())
    codes = await asyncio.gather(*(call(gw.url + CHAT, BODY) for _ in range(10)))
    assert [200] * 10 == [c for c, _, _ in codes]
    assert min(len(f.posts) for f in fakes) >= 3, [len(f.posts) for f in fakes]


async def test_a_translated_request_is_not_retried_on_a_500(
    gateway_factory, upstream_factory
) -> None:
    """A 500 is a status the backend meant: the translated path (Anthropic on a chat-only
    backend) does not run the request again on the next target, as the forwarded path
    does not."""
    first, second = await upstream_factory(), await upstream_factory()
    for fake in (first, second):
        fake.script[CHAT] = json_script(500, {"error": {"message": "template failed"}})
    config = fleet(first.url, second.url).replace("kind: vllm", "kind: tgi")
    gw = await gateway_factory(config)
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    await call(gw.url + MESSAGES, ANTHROPIC_BODY)
    assert 1 == len(first.posts) + len(second.posts)


async def test_waiters_that_leave_leave_no_heap_entries(gateway_factory, upstream) -> None:
    """Clients that join the queue and leave (here with the longest deadline a client may
    ask for) take their heap entries with them: the per-backend heaps never hold more
    entries than there are requests waiting, however many clients came and went."""
    upstream.script[CHAT] = slow_json_script(3)
    gw = await gateway_factory(fleet(upstream.url, limit=", max_in_flight: 1"))
    busy = asyncio.create_task(call(gw.url + CHAT, BODY))
    await wait_for(lambda: len(upstream.posts) == 1)
    for _ in range(4):  # four waves of 25 clients that queue and hang up
        leavers = [
            asyncio.create_task(call(gw.url + CHAT, BODY, {"OICM-Request-Timeout": "3600"}))
            for _ in range(25)
        ]
        await wait_for(lambda: gw.state.admission.waiting == 25)
        for task in leavers:
            task.cancel()
        await wait_for(lambda: gw.state.admission.waiting == 0)
    heap = gw.state.admission.queues.get(gw.state.backends["b0"], [])
    try:
        assert gw.state.admission.waiting >= len(heap)
    finally:
        busy.cancel()


async def test_a_last_target_s_503_is_saturation_not_a_failure(
    gateway_factory, upstream_factory
) -> None:
    """A 503 says the backend is busy: it puts the backend last for a second and never
    ejects it, whether or not it was the last target left (an overloaded fleet is not
    made smaller by ejecting the replicas that shed load)."""
    first, second = await upstream_factory(), await upstream_factory()
    for fake in (first, second):
        fake.script[CHAT] = json_script(503, {"error": "server busy"})
    extra = "outlier_detection: {consecutive_failures: 2, base_ejection_s: 60}\n"
    gw = await gateway_factory(fleet(first.url, second.url, extra=extra))
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    for _ in range(6):
        assert 503 == (await call(gw.url + CHAT, BODY))[0]
    got = await scrape(gw.url)
    ejections = sum(value(got, "proxy_backend_ejections_total", backend=b) for b in ("b0", "b1"))
    assert 0 == ejections


async def test_a_slot_freed_while_other_targets_are_tried_is_not_waited_for(
    gateway_factory, upstream_factory
) -> None:
    """A target found full, then freed while the request tried the others, serves the
    request at once: it does not wait in the queue for a slot nobody will give back."""
    roomy, slow = await upstream_factory(), await upstream_factory()
    roomy.script[CHAT] = slow_json_script(0.2)  # holds its one slot for 0.2 s
    config = (
        "server: {queue_timeout_s: 3}\n"
        "backends:\n"
        f"  a: {{url: '{roomy.url}', kind: vllm, max_in_flight: 1}}\n"
        f"  b: {{url: '{slow.url}', kind: vllm}}\n"
        "models:\n"
        "  m: {targets: [{backend: a, weight: 1000}, {backend: b, weight: 0.001}],"
        " policy: weighted}\n"
    )

    async def busy_after(request, rec):  # b answers 503 only after a's slot came free
        await asyncio.sleep(0.6)
        return web.json_response({"error": "busy"}, status=503)

    slow.script[CHAT] = busy_after
    gw = await gateway_factory(config)
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    holder = asyncio.create_task(call(gw.url + CHAT, BODY))
    await wait_for(lambda: len(roomy.posts) == 1)
    started = asyncio.get_running_loop().time()
    code, _, _ = await call(gw.url + CHAT, BODY)
    waited = asyncio.get_running_loop().time() - started
    assert 200 == (await holder)[0]
    assert (200, True) == (code, waited < 1.5), waited
