"""A gateway with `server.workers: 2` in front of three fake backends, under the traffic that
gives every panel of conf/grafana/inference-proxy.json data.

Each round sends: chats and streams (time to first token, gaps, tokens), a stream the backend
cuts, a client that leaves mid-stream (model fickle), requests to a backend that answers 502
(retries, an ejection, a fallback, a 5xx), requests over a model's rpm limit (429s), three slow
requests at once to a backend with max_in_flight 1 (the queue), and one to the spare backend,
which a test may unplug. The backends are fakes in the caller's event loop; the gateway is a real process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fakes import (
    FakeUpstream,
    Received,
    default_script,
    json_script,
    slow_json_script,
    stream_script,
)
from tests.prometheus_fixture import free_port

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
SCENARIOS = {
    "stream": stream_script(tokens=6, first_delay=0.05, gap=0.01),
    "cut": stream_script(tokens=6, gap=0.01, cut_after=3),
    "long": stream_script(tokens=40, gap=0.05),
    "slow": slow_json_script(0.4),
}


async def by_scenario(request: web.Request, rec: Received) -> web.StreamResponse:
    """The behaviour the client asked for in `x-scenario` (the gateway passes it upstream)."""
    script = SCENARIOS.get(request.headers.get("x-scenario", ""), default_script)
    return await script(request, rec)


def config_text(port: int, urls: dict[str, str]) -> str:
    """The gateway's config: backends gpu and narrow (max_in_flight 1) on one fake, bad
    (502s) and spare on their own; quick health checks and ejections."""
    return f"""
server: {{host: 127.0.0.1, port: {port}, workers: 2, access_log: false, queue_timeout_s: 10,
  drain_s: 1}}
health: {{interval_s: 1, timeout_s: 0.5, unhealthy_threshold: 1}}
outlier_detection: {{consecutive_failures: 2, base_ejection_s: 1, max_ejection_s: 2}}
backends:
  gpu: {{url: "{urls["gpu"]}", kind: vllm}}
  narrow: {{url: "{urls["gpu"]}", kind: vllm, max_in_flight: 1}}
  bad: {{url: "{urls["bad"]}", kind: vllm}}
  spare: {{url: "{urls["spare"]}", kind: vllm}}
models:
  m: {{targets: [{{backend: gpu}}]}}
  flaky: {{targets: [{{backend: bad}}, {{backend: gpu}}], policy: weighted}}
  fb: {{targets: [{{backend: bad}}], fallbacks: [m]}}
  broken: {{targets: [{{backend: bad}}]}}
  limited: {{targets: [{{backend: gpu}}], limits: {{rpm: 2}}}}
  q: {{targets: [{{backend: narrow}}]}}
  s: {{targets: [{{backend: spare}}]}}
  fickle: {{targets: [{{backend: gpu}}]}}
"""


@dataclass
class Scene:
    """The running gateway (`url`, `port`) and its fake backends by name."""

    port: int
    servers: dict[str, TestServer]
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def unplug(self, name: str) -> None:
        """Backend `name` goes away: its listener closes and its connections are reset."""
        await self.servers[name].close()

    async def round(self, session: aiohttp.ClientSession) -> None:
        """One round of the traffic described in the module's docstring."""
        calls = [
            *(post(session, self.url, "m") for _ in range(2)),
            *(post(session, self.url, "m", "stream") for _ in range(2)),
            post(session, self.url, "m", "cut"),
            leave_mid_stream(session, self.url),
            *(post(session, self.url, model) for model in ("flaky", "flaky", "fb", "broken")),
            *(post(session, self.url, "limited") for _ in range(2)),
            *(post(session, self.url, "q", "slow") for _ in range(3)),
            post(session, self.url, "s"),
        ]
        await asyncio.gather(*calls)

    async def traffic(self, stop: asyncio.Event, rounds: int = 400) -> int:
        """Rounds, 0.2 s apart, until `stop` is set (at most `rounds`); how many were sent."""
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for sent in range(rounds):
                if stop.is_set():
                    return sent
                await self.round(session)
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
        return rounds


async def post(
    session: aiohttp.ClientSession, url: str, model: str, scenario: str = ""
) -> tuple[int, bytes]:
    """A chat request (a stream for the stream scenarios); its status and whole body."""
    stream = scenario in ("stream", "cut", "long")
    body = f'{{"model": "{model}", "stream": {"true" if stream else "false"}, "messages": []}}'
    headers = {"Content-Type": "application/json", "x-scenario": scenario}
    try:
        async with session.post(url + CHAT, data=body, headers=headers) as r:
            return r.status, await r.read()
    except aiohttp.ClientPayloadError:  # the cut stream, when the gateway's last event is lost
        return 200, b""


async def leave_mid_stream(session: aiohttp.ClientSession, url: str) -> None:
    """Read a long stream's first bytes, then close the connection (model fickle, whose
    clients all do)."""
    body = '{"model": "fickle", "stream": true, "messages": []}'
    headers = {"Content-Type": "application/json", "x-scenario": "long"}
    async with session.post(url + CHAT, data=body, headers=headers) as r:
        await r.content.readany()
        r.close()


@asynccontextmanager
async def scene(directory: Path) -> AsyncIterator[Scene]:
    """Start the fakes and the gateway (`python -m proxy`); stop it by its PID at the end."""
    servers: dict[str, TestServer] = {}
    fakes = {"gpu": FakeUpstream(), "bad": FakeUpstream(), "spare": FakeUpstream()}
    fakes["gpu"].script[CHAT] = by_scenario
    fakes["bad"].script[CHAT] = json_script(502, {"error": {"message": "bad gateway"}})
    process = None
    try:
        for name, fake in fakes.items():
            servers[name] = TestServer(fake.app(), host="127.0.0.1", handler_cancellation=True)
            await servers[name].start_server()
        urls = {name: f"http://127.0.0.1:{server.port}" for name, server in servers.items()}
        port = free_port()
        config = directory / "proxy.yaml"
        config.write_text(config_text(port, urls))
        log = directory / "gateway.log"
        process = spawn(config, log)
        deadline = time.monotonic() + 20
        while not await ready(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the gateway did not start: {log.read_text()}"
            await asyncio.sleep(0.05)
        yield Scene(port, servers, process, log)
    finally:
        if process is not None:
            stop(process)
        for server in servers.values():
            await server.close()


def spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`python -m proxy --config FILE`, no keys, its log in `log`."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "API_KEYS": ""},
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (its workers drain for server.drain_s), then SIGKILL if it is still there."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()  # its workers get SIGTERM when it dies (PR_SET_PDEATHSIG)
        process.wait(timeout=10)


async def ready(port: int) -> bool:
    """Both workers answer: /metrics says 2 of 2 answered, so every series is there."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as r,
        ):
            return b"proxy_workers_answered 2.0" in await r.read()
    except aiohttp.ClientError:
        return False
