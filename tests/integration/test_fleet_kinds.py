"""Four kinds of backend behind one model name, on real sockets: vLLM, TGI, Ollama and a
llama.cpp server, each with its own health route, load gauges and overload answer
(REFERENCE.md section 5). One is unplugged under load; another flaps or is slow only on its
health probes. No request that another target could have served fails, the metrics say what
happened, nothing hangs, and the loop's tasks come back to what they were."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import wait_for
from tests.fakes import chat_body, chunk_event
from tests.integration.test_fleet import CHAT, scrape
from tests.integration.test_metrics import value

KINDS = ("vllm", "tgi", "ollama", "llamacpp")
HEALTH = {"vllm": "/health", "tgi": "/health", "ollama": "/", "llamacpp": "/health"}
# Each kind's own load gauges in its /metrics (Ollama has no /metrics).
GAUGES = {
    "vllm": 'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
    'vllm:kv_cache_usage_perc{{model_name="m"}} 0.1\n',
    "tgi": "tgi_queue_size {waiting}\n",
    "llamacpp": "llamacpp:requests_deferred {waiting}\nllamacpp:kv_cache_usage_ratio 0.1\n",
}
# What each kind answers when it takes no more (vLLM and llama.cpp queue instead).
OVERLOADED = {
    "tgi": (429, {"error": "Model is overloaded", "error_type": "overloaded"}),
    "ollama": (
        503,
        {
            "error": {
                "message": "server busy, please try again.  maximum pending requests exceeded",
                "type": "api_error",
                "param": None,
                "code": None,
            }
        },
    ),
}
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


@dataclass
class KindBackend:
    """A simulated inference server of one kind on 127.0.0.1.

    It streams `tokens` chat events `gap` seconds apart (or answers whole after as long),
    echoing the upstream model id it was sent (each target sends its kind's name, so a client
    sees who answered). Past `capacity` generations at once it gives its kind's overload
    answer. `probe` may replace its health route's handler. `unplug` is a process dying: the
    listening socket closes (new connections are refused) and every open one is reset.
    """

    kind: str
    capacity: int | None = None
    tokens: int = 6
    gap: float = 0.02
    loading: bool = False  # llama.cpp's 503 "Loading model" on /health
    probe: Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]] | None = None
    in_flight: int = 0
    served: int = 0
    probes: int = 0
    dead: bool = False
    transports: set[Any] = field(default_factory=set)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(HEALTH[self.kind], self._health)
        if self.kind in GAUGES:
            app.router.add_get("/metrics", self._metrics)
        app.router.add_post(CHAT, self._chat)
        return app

    def _accept(self, request: web.Request) -> None:
        """Keep hold of the connection, so `unplug` can reset it; once dead, reset it now (a
        connection the dying process had accepted but not yet read from, such as a pooled one
        opened just before, answers nothing either)."""
        transport = request.transport
        assert transport is not None
        if self.dead:
            transport.abort()
            raise ConnectionResetError("unplugged")
        self.transports.add(transport)

    async def unplug(self) -> int:
        """Die at once; how many generations were running."""
        assert self.server is not None and self.server.runner is not None
        self.dead = True
        running = self.in_flight
        for site in list(self.server.runner.sites):
            await site.stop()
        for transport in list(self.transports):
            transport.abort()
        return running

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self._accept(request)
        self.probes += 1
        if self.probe is not None:
            return await self.probe(request)
        if self.kind == "llamacpp" and self.loading:
            return web.json_response(LOADING, status=503)
        if self.kind == "ollama":
            return web.Response(text="Ollama is running")
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self._accept(request)
        return web.Response(text=GAUGES[self.kind].format(waiting=0))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._accept(request)
        payload = orjson.loads(await request.read())
        if self.capacity is not None and self.in_flight >= self.capacity:
            status, answer = OVERLOADED[self.kind]
            return web.json_response(answer, status=status)
        self.in_flight += 1
        self.served += 1
        try:
            model = payload["model"]
            if not payload.get("stream"):
                await asyncio.sleep(self.gap * self.tokens)
                return web.json_response(chat_body(model=model))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(self.tokens):
                await asyncio.sleep(self.gap)
                await response.write(chunk_event(i, model))  # the text names who answered
            await response.write(chunk_event(self.tokens, finish="stop"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1


@pytest.fixture
async def kinds() -> AsyncIterator[Callable[..., Coroutine[Any, Any, KindBackend]]]:
    started: list[KindBackend] = []

    async def make(kind: str, **options: Any) -> KindBackend:
        backend = KindBackend(kind, **options)
        backend.server = TestServer(backend.app(), host="127.0.0.1", handler_cancellation=True)
        await backend.server.start_server()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        assert backend.server is not None
        await backend.server.close()


def fleet_config(fleet: dict[str, KindBackend], policy: str, health: str = "") -> str:
    """One model, `m`, with a target on each backend, sending the kind's name as its model."""
    backends = "".join(
        f"  {k}: {{url: '{b.url}', kind: {k}, keepalive_s: 0.2}}\n" for k, b in fleet.items()
    )
    targets = ", ".join(f"{{backend: {k}, model: {k}}}" for k in fleet)
    return (
        f"health: {{{health or 'interval_s: 0.1, timeout_s: 0.5, unhealthy_threshold: 2'}}}\n"
        "outlier_detection: {consecutive_failures: 3, base_ejection_s: 5}\n"
        f"backends:\n{backends}"
        f"models:\n  m: {{policy: {policy}, targets: [{targets}]}}\n"
    )


@dataclass
class Outcome:
    status: int = 0
    stream: bool = False
    complete: bool = False  # [DONE] (a stream) or a whole JSON answer
    cut: bool = False  # the stream ended with the gateway's error event
    answered_by: set[str] = field(default_factory=set)
    seconds: float = 0.0


async def send(session: aiohttp.ClientSession, url: str, i: int) -> Outcome:
    """Request `i` of the mix: three streams in four, each with one of 16 sessions."""
    out = Outcome(stream=i % 4 != 3)
    body = orjson.dumps(
        {"model": "m", "stream": out.stream, "messages": [{"role": "user", "content": f"q{i}"}]}
    )
    started = time.monotonic()
    async with (
        asyncio.timeout(10),
        session.post(url + CHAT, data=body, headers={"X-Session-ID": f"s{i % 16}"}) as r,
    ):
        out.status = r.status
        raw = await r.read()
    out.seconds = time.monotonic() - started
    out.answered_by = {k for k in KINDS if k.encode() in raw}  # the model id, or its text
    if out.stream:
        out.cut = b'data: {"error":' in raw
        out.complete = raw.endswith(b"data: [DONE]\n\n")
    else:
        out.complete = r.status == 200 and b'"chat.completion"' in raw
    return out


async def load(
    gw_url: str, count: int, concurrency: int, on_done: Callable[[int], None] = lambda n: None
) -> list[Outcome]:
    """`count` requests, `concurrency` at a time; `on_done(n)` after each one ends."""
    outcomes: list[Outcome] = []
    numbers = iter(range(count))
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for i in numbers:
                outcomes.append(await send(session, gw_url, i))
                on_done(len(outcomes))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


def by_reason(got: dict, name: str) -> dict[str, float]:
    """A counter's samples summed by their `reason` label."""
    out: dict[str, float] = {}
    for (sample, labels), v in got.items():
        if sample == name:
            reason = dict(labels)["reason"]
            out[reason] = out.get(reason, 0.0) + v
    return out


async def task_count(samples: int = 20) -> int:
    """The fewest tasks on the loop over a few health intervals (probes come and go)."""
    seen = []
    for _ in range(samples):
        seen.append(len(asyncio.all_tasks()))
        await asyncio.sleep(0.02)
    return min(seen)


async def settled(gw, fleet: dict[str, KindBackend], tasks: int) -> None:
    """Every slot given back, here and in the backends, and within a few health intervals
    (the pool closes connections idle past keepalive_s, and with them their backends'
    handlers) no more tasks on the loop than `tasks`."""
    await wait_for(lambda: all(b.in_flight == 0 for b in gw.state.backends.values()))
    await wait_for(lambda: all(b.in_flight == 0 for b in fleet.values()))
    deadline = time.monotonic() + 3
    while (now := await task_count()) > tasks:
        assert time.monotonic() < deadline, f"{now} tasks, {tasks} before the load"


@pytest.mark.parametrize("policy", ["least_loaded", "weighted", "affinity"])
async def test_a_kind_unplugged_under_load_fails_no_request_another_could_serve(
    gateway_factory, kinds, policy
) -> None:
    """Four kinds behind `m`; TGI and Ollama shed load past 3 generations (429, 503); the vLLM
    one is unplugged after 60 of 200 requests, 20 at a time. Every request gets a 200; the
    only ones that fail are streams that vLLM had begun (cut, with the error event), and the
    metrics count the retries, each target tried and why, and vLLM down."""
    fleet = {
        "vllm": await kinds("vllm"),
        "tgi": await kinds("tgi", capacity=3),
        "ollama": await kinds("ollama", capacity=3),
        "llamacpp": await kinds("llamacpp", loading=True),
    }
    gw = await gateway_factory(fleet_config(fleet, policy))
    await wait_for(lambda: sum(h.probed_up for h in gw.state.fleet.values()) == 3)
    assert not gw.state.fleet["llamacpp"].probed_up  # "Loading model" is not ready
    fleet["llamacpp"].loading = False
    await wait_for(lambda: gw.state.fleet["llamacpp"].probed_up)
    before = await task_count()
    killing: list[asyncio.Task[int]] = []

    def on_done(n: int) -> None:
        if n == 60:
            killing.append(asyncio.create_task(fleet["vllm"].unplug()))  # awaited below

    outcomes = await load(gw.url, 200, 20, on_done)
    running_at_kill = await killing[0]
    await wait_for(lambda: not gw.state.fleet["vllm"].probed_up)

    assert [200] * 200 == [o.status for o in outcomes]
    failed = [o for o in outcomes if not o.complete]
    assert all(o.stream and o.cut and o.answered_by <= {"vllm"} for o in failed), failed
    assert len(failed) <= running_at_kill
    assert all(o.complete for o in outcomes if not o.stream)
    served = {k: b.served for k, b in fleet.items()}
    assert all(n > 0 for n in served.values()), served
    got = await scrape(gw.url)
    retries = by_reason(got, "proxy_retries_total")
    decisions = by_reason(got, "proxy_routing_decisions_total")
    assert retries.get("unreachable", 0) >= 1  # a request sent to the dead vLLM went on
    assert retries.get("429", 0) >= 1 and retries.get("503", 0) >= 1  # TGI's, Ollama's
    assert sum(retries.values()) == decisions.pop("retry", 0)  # each retry was one more try
    assert 200 == sum(decisions.values())  # one first choice per request
    assert {"vllm": 0, "tgi": 1, "ollama": 1, "llamacpp": 1} == {
        k: value(got, "proxy_backend_up", backend=k) for k in KINDS
    }
    assert 200 == sum(
        value(got, "proxy_requests_total", route=CHAT, model="m", backend=k, status="200")
        for k in KINDS
    )  # a stream cut after its head is a 200 too
    await settled(gw, fleet, before)


def alternating(passes_first: int) -> Callable[[web.Request], Coroutine[Any, Any, web.Response]]:
    """A health route that passes `passes_first` times, then fails and passes by turns."""
    answers = itertools.chain([True] * passes_first, itertools.cycle([False, True]))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({}, status=200 if next(answers) else 503)

    return health


@pytest.mark.parametrize(
    ("thresholds", "steady"),
    [("healthy_threshold: 2, unhealthy_threshold: 2", True), ("unhealthy_threshold: 1", False)],
)
async def test_a_flapping_health_route_is_held_as_the_thresholds_say(
    gateway_factory, kinds, thresholds, steady
) -> None:
    """TGI's /health passes three times, then fails and passes by turns. With two failures
    needed to take it down it stays up and in the rotation throughout; with one it goes down
    and up again with the probes. Either way every request is answered, and nothing is left
    running."""
    fleet = {k: await kinds(k, probe=alternating(3) if k == "tgi" else None) for k in KINDS}
    health = f"interval_s: 0.05, timeout_s: 0.5, {thresholds}"
    gw = await gateway_factory(fleet_config(fleet, "least_loaded", health))
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    before = await task_count()
    flips: list[bool] = []

    async def watch() -> None:
        state = gw.state.fleet["tgi"].probed_up
        while True:
            await asyncio.sleep(0.005)
            if gw.state.fleet["tgi"].probed_up != state:
                state = not state
                flips.append(state)

    watcher = asyncio.create_task(watch())  # cancelled below
    probes = fleet["tgi"].probes
    outcomes = await load(gw.url, 120, 10)
    await wait_for(lambda: fleet["tgi"].probes >= probes + 16, within_s=5)  # 8 failures
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher

    assert all(o.status == 200 and o.complete for o in outcomes)
    if steady:
        assert [] == flips
        assert fleet["tgi"].served > 0
    else:
        assert len(flips) >= 6
    await settled(gw, fleet, before)


async def test_a_backend_slow_only_on_its_probes_is_down_and_costs_nobody_time(
    gateway_factory, kinds
) -> None:
    """Ollama answers requests at once but its `GET /` only after 2 s: its probes time out
    (0.1 s), so it is down (proxy_backend_up 0, the model still ready through the others) and
    gets no requests while the others can take them; no request waits on a probe, and the
    probes that time out leave no task behind."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="Ollama is running")

    fleet = {k: await kinds(k, probe=slow if k == "ollama" else None) for k in KINDS}
    health = "interval_s: 0.05, timeout_s: 0.1, unhealthy_threshold: 2"
    gw = await gateway_factory(fleet_config(fleet, "least_loaded", health))
    await wait_for(lambda: sum(h.probed_up for h in gw.state.fleet.values()) == 3)
    await asyncio.sleep(0.3)  # a few more probes of Ollama time out
    assert not gw.state.fleet["ollama"].probed_up
    before = await task_count()

    outcomes = await load(gw.url, 100, 10)
    assert all(o.status == 200 and o.complete for o in outcomes)
    assert max(o.seconds for o in outcomes) < 1.5  # a generation is 0.12 s; a probe 2 s
    assert 0 == fleet["ollama"].served
    got = await scrape(gw.url)
    assert 0 == value(got, "proxy_backend_up", backend="ollama")
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/ready") as r:
        assert 200 == r.status
    await settled(gw, fleet, before)
