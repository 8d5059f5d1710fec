"""A hostile review of reload, drain and workers: real processes, real signals, real sockets.

Each test drives `python -m proxy` as an operator or systemd would and says what it proves.
The backends are either `bench.simbackend` processes or small aiohttp servers in this process
(`Fake`), which record what reached them and how many requests they held at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.config import load_config
from proxy.reload import Reloader
from proxy.state import LIVE
from tests.integration.test_operations import ROOT, Notifications, accepts, free_port, sim

__all__ = ["sim"]  # the fixture, shared with test_operations

# -- backends -----------------------------------------------------------------------------


class Fake:
    """An inference server on 127.0.0.1 in this process: `/health` answers 200; a chat
    request waits `head_delay_s`, then answers `status` or streams `max_tokens` events
    `gap_s` apart. It records every chat request and the most it held at once."""

    def __init__(self, *, status: int = 200, head_delay_s: float = 0.0, gap_s: float = 0.05):
        self.status = status
        self.head_delay_s = head_delay_s
        self.gap_s = gap_s
        self.chats: list[dict[str, object]] = []
        self.active = 0
        self.peak = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Fake:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.chats.append(body)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.head_delay_s)
            if self.status != 200:
                return web.json_response({"error": "busy"}, status=self.status)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(int(body.get("max_tokens") or 1)):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(self.gap_s)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.active -= 1


@pytest.fixture
async def fakes() -> AsyncIterator[list[Fake]]:
    """Fake backends a test starts with `fakes.append(await Fake().start())`; closed after."""
    started: list[Fake] = []
    yield started
    for fake in started:
        await fake.close()


async def fake(fakes: list[Fake], **options: float) -> Fake:
    started = await Fake(**options).start()  # type: ignore[arg-type]
    fakes.append(started)
    return started


# -- the gateway --------------------------------------------------------------------------


class Gateway:
    """`python -m proxy ARGS` with a notify socket; its stderr kept in a file, its stdout
    (the access log) in a list of lines when `capture` is set."""

    def __init__(
        self,
        tmp_path: Path,
        port: int,
        text: str | None = None,
        *,
        args: list[str] | None = None,
        capture: bool = False,
        session: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.config = tmp_path / "proxy.yaml"
        if text is not None:
            self.config.write_text(text)
        self.notify = Notifications(tmp_path, port)
        self.log = tmp_path / "stderr.log"
        self.lines: list[bytes] = []
        argv = args if args is not None else ["--config", str(self.config)]
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *argv],
                cwd=ROOT,
                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                stderr=err,
                env={
                    **os.environ,
                    "API_KEYS": "",
                    "NOTIFY_SOCKET": self.notify.path,
                    **(env or {}),
                },
                start_new_session=session,
            )
        self.reader: threading.Thread | None = None
        if capture:
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        self.lines.extend(self.proc.stdout)

    def stderr(self) -> str:
        return self.log.read_text()

    def pids(self) -> dict[int, int]:
        """The newest pid of each worker index, from the supervisor's log."""
        found = re.findall(r"worker (\d+) started \(pid (\d+)\)", self.stderr())
        return {int(index): int(pid) for index, pid in found}

    async def heard(self, key: str, value: str = "", after: int = 0, within_s: float = 30):
        """The first notification from `after` on with `key` starting with `value`."""
        return await asyncio.to_thread(self.notify.wait_for, key, value, after, within_s)

    async def logged(self, text: str, count: int = 1, within_s: float = 20) -> None:
        """Wait until `text` is in the log `count` times."""
        deadline = time.monotonic() + within_s
        while self.stderr().count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} x{count} not in:\n{self.stderr()}"
            await asyncio.sleep(0.05)

    async def reload(self, text: str | None = None) -> dict[str, str]:
        """Write `text` (if any), send SIGHUP and wait for the READY=1 that ends the reload."""
        if text is not None:
            self.config.write_text(text)
        heard = len(self.notify.messages)
        self.proc.send_signal(signal.SIGHUP)
        await self.heard("RELOADING", "1", after=heard)
        return await self.heard("READY", "1", after=heard)

    async def stop(self, within_s: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.proc.wait, within_s)
        if self.reader is not None:
            self.reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.reader is not None:
            self.reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.notify.close()


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    """Gateways a test starts, killed (with their notify sockets closed) after it."""
    started: list[Gateway] = []
    yield started
    for gateway in started:
        gateway.close()


def start(gateways: list[Gateway], tmp_path: Path, text: str, **options: object) -> Gateway:
    port = int(re.search(r"port: (\d+)", text).group(1))  # type: ignore[union-attr]
    gateway = Gateway(tmp_path, port, text, **options)  # type: ignore[arg-type]
    gateways.append(gateway)
    return gateway


def yaml(port: int, backends: dict[str, str], models: dict[str, str], **extra: str) -> str:
    """A config: `backends` as NAME: '{flow mapping}', `models` likewise, `extra` sections."""
    server = extra.pop("server", "")
    lines = [
        f"server: {{port: {port}, drain_s: 20{', ' + server if server else ''}}}",
        f"health: {{{extra.pop('health', 'interval_s: 0.5')}}}",
        *(f"{key}: {{{value}}}" for key, value in extra.items()),
        "backends:",
        *(f"  {name}: {{{spec}}}" for name, spec in backends.items()),
    ]
    if models:
        lines += ["models:", *(f"  {name}: {{{spec}}}" for name, spec in models.items())]
    return "\n".join(lines) + "\n"


def chat(model: str, tokens: int = 1, **extra: object) -> bytes:
    return orjson.dumps({"model": model, "stream": True, "max_tokens": tokens, **extra})


async def post(
    session: aiohttp.ClientSession, port: int, model: str, tokens: int = 1, **headers: str
) -> tuple[int, bytes]:
    async with session.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=chat(model, tokens),
        headers={"Content-Type": "application/json", **headers},
    ) as response:
        return response.status, await response.read()


def complete(body: bytes) -> bool:
    return body.rstrip().endswith(b"data: [DONE]")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """What the gateway sends until it closes the connection (or 10 s pass)."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


# -- reload: requests that began on the old config ----------------------------------------


async def test_a_request_whose_body_arrives_across_a_reload_is_served(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """A request whose body is still arriving when a reload renames its backend (same URL)
    began on the old config and must finish on it: 200 and a whole stream, not a 502."""
    port = free_port()
    gw = start(
        gateways, tmp_path, yaml(port, {"old": f"url: '{sim}'"}, {"a": "targets: [{backend: old}]"})
    )
    await gw.heard("READY", "1")
    body = chat("a", 2)
    sock = raw_request(
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body[:5],
    )
    try:
        await asyncio.sleep(0.3)  # the head is in: the request is in flight on the old state
        done = await gw.reload(
            yaml(port, {"new": f"url: '{sim}'"}, {"a": "targets: [{backend: new}]"})
        )
        assert done["STATUS"].startswith("reloaded"), done
        await asyncio.sleep(0.5)  # the retired backend is closed once it looks idle
        sock.sendall(body[5:])
        answer = await asyncio.to_thread(read_answer, sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"data: [DONE]" in answer


async def test_a_fallback_taken_during_a_reload_reaches_its_backend(
    fakes: list[Fake], tmp_path: Path, gateways: list[Gateway]
) -> None:
    """A request on the old config whose first target answers 503 after a reload retired
    its fallback's backend (renamed, same URL) must still be served by the fallback."""
    busy = await fake(fakes, status=503, head_delay_s=1.5)
    good = await fake(fakes)
    port = free_port()

    def text(fallback: str) -> str:
        return yaml(
            port,
            {"busy": f"url: '{busy.url}', kind: vllm", fallback: f"url: '{good.url}', kind: vllm"},
            {
                "m": "targets: [{backend: busy}], fallbacks: [n]",
                "n": f"targets: [{{backend: {fallback}}}]",
            },
        )

    gw = start(gateways, tmp_path, text("y"))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(post(session, port, "m", 2))
        await asyncio.sleep(0.5)  # it waits on `busy`
        assert 1 == len(busy.chats)
        await gw.reload(text("y2"))
        status, body = await request
    assert (200, True) == (status, complete(body)), body[:300]
    assert 1 == len(good.chats)


async def test_a_request_queued_after_a_reload_never_goes_to_the_old_url(
    fakes: list[Fake], tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Backend x moves from one URL to another (max_in_flight 1 on both). A request that
    arrives after the reload and waits for x's slot must be sent to the new URL, never be
    handed the old backend's slot as the last old request ends."""
    before, after = await fake(fakes), await fake(fakes)
    port = free_port()

    def text(url: str) -> str:
        return yaml(
            port,
            {"x": f"url: '{url}', kind: vllm, max_in_flight: 1"},
            {"m": "targets: [{backend: x}]"},
        )

    gw = start(gateways, tmp_path, text(before.url))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        old = asyncio.create_task(post(session, port, "m", 30))  # 1.5 s on `before`
        await asyncio.sleep(0.3)
        await gw.reload(text(after.url))
        new = asyncio.create_task(post(session, port, "m", 60))  # 3 s on `after`
        await asyncio.sleep(0.3)
        queued = asyncio.create_task(post(session, port, "m", 1))  # waits for x's slot
        results = await asyncio.gather(old, new, queued)
    assert all(status == 200 and complete(body) for status, body in results), results
    assert (1, 2) == (len(before.chats), len(after.chats))


async def test_max_in_flight_holds_across_a_reload_that_lowers_it(
    fakes: list[Fake], tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Two streams hold backend x (max_in_flight 2); a reload lowers it to 1 at the same URL
    (the operator is shedding load): a new request waits instead of making it 3 at once."""
    backend = await fake(fakes)
    port = free_port()

    def text(limit: int) -> str:
        return yaml(
            port,
            {"x": f"url: '{backend.url}', kind: vllm, max_in_flight: {limit}"},
            {"m": "targets: [{backend: x}]"},
        )

    gw = start(gateways, tmp_path, text(2))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(post(session, port, "m", 30)) for _ in range(2)]
        await asyncio.sleep(0.3)
        assert 2 == backend.active
        await gw.reload(text(1))
        extra = asyncio.create_task(post(session, port, "m", 1))
        results = await asyncio.gather(*held, extra)
    assert all(status == 200 and complete(body) for status, body in results), results
    assert 2 == backend.peak


async def test_a_request_queued_for_a_backend_a_reload_removes_is_served_on_it(
    fakes: list[Fake], tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Backend x (max_in_flight 1) holds a stream and a second request waits for its slot;
    a reload removes x (its model moves to y): both requests finish on x, the next goes to
    y, and x's connections are closed once its last stream is done, not before."""
    x, y = await fake(fakes), await fake(fakes)
    port = free_port()
    both = {
        "x": f"url: '{x.url}', kind: vllm, max_in_flight: 1",
        "y": f"url: '{y.url}', kind: vllm",
    }
    gw = start(gateways, tmp_path, yaml(port, both, {"m": "targets: [{backend: x}]"}))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(post(session, port, "m", 20))  # 1 s
        await asyncio.sleep(0.2)
        queued = asyncio.create_task(post(session, port, "m", 20))
        await asyncio.sleep(0.2)
        await gw.reload(yaml(port, {"y": both["y"]}, {"m": "targets: [{backend: y}]"}))
        after = await post(session, port, "m")
        results = await asyncio.gather(first, queued)
        assert (1, 2) == (x.peak, len(x.chats))  # the queued one waited, then ran on x
        assert 1 == len(y.chats)
        await asyncio.sleep(0.5)
        assert runner_connections(x) == 0  # the retired pool is closed
    assert all(status == 200 and complete(body) for status, body in [*results, after]), results


def runner_connections(backend: Fake) -> int:
    assert backend.runner is not None and backend.runner.server is not None
    return len(backend.runner.server.connections)


# -- reload: health and readiness ---------------------------------------------------------


async def ready_status(session: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, object]]:
    async with session.get(f"http://127.0.0.1:{port}/ready") as response:
        return response.status, await response.json()


async def until_ready(session: aiohttp.ClientSession, port: int, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while (await ready_status(session, port))[0] != 200:
        assert time.monotonic() < deadline, "the gateway never became ready"
        await asyncio.sleep(0.1)


async def test_a_reload_that_only_changes_max_in_flight_keeps_the_gateway_ready(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """With health.healthy_threshold 2, a backend that is up and only gets a new
    max_in_flight (same URL) must not make /ready answer 503 once the reload is done."""
    port = free_port()

    def text(limit: int) -> str:
        return yaml(
            port,
            {"x": f"url: '{sim}', kind: vllm, max_in_flight: {limit}"},
            {"a": "targets: [{backend: x}]"},
            health="interval_s: 1, healthy_threshold: 2",
        )

    gw = start(gateways, tmp_path, text(10))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        await until_ready(session, port)
        await gw.reload(text(20))
        status, body = await ready_status(session, port)
    assert (200, {"status": "ready"}) == (status, body)


async def test_an_ejected_backend_stays_ejected_across_a_reload(
    fakes: list[Fake], sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Health carries over: a backend ejected by a failed request (ejection 30 s) is still
    out after a reload that adds another model, so /ready still names its model."""
    failing = await fake(fakes, status=500)
    port = free_port()
    backends = {"bad": f"url: '{failing.url}', kind: vllm", "sim": f"url: '{sim}', kind: vllm"}
    models = {"m": "targets: [{backend: bad}]", "a": "targets: [{backend: sim}]"}
    outlier = "consecutive_failures: 1, base_ejection_s: 30"
    gw = start(gateways, tmp_path, yaml(port, backends, models, outlier_detection=outlier))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        await until_ready(session, port)
        assert 500 == (await post(session, port, "m"))[0]
        assert (503, ["m"]) == ((s := await ready_status(session, port))[0], s[1]["unready"])
        more = {**models, "b": "targets: [{backend: sim}]"}
        await gw.reload(yaml(port, backends, more, outlier_detection=outlier))
        status, body = await ready_status(session, port)
    assert (503, ["m"]) == (status, body["unready"])


# -- the supervisor -----------------------------------------------------------------------


def workers_text(port: int, url: str, models: tuple[str, ...] = ("a",), **server: str) -> str:
    extra = ", ".join(f"{k}: {v}" for k, v in {"workers": "2", **server}.items())
    return yaml(
        port,
        {"sim": f"url: '{url}', kind: vllm"},
        {m: "targets: [{backend: sim}]" for m in models},
        server=extra,
    )


async def test_sighup_while_workers_start_sends_no_ready_before_they_accept(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """A SIGHUP to the supervisor before its workers serve must not tell systemd READY=1:
    every READY=1 it sends comes when the port accepts connections."""
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim))
    await gw.logged("starting 2 workers")  # its signal handlers are in place
    gw.proc.send_signal(signal.SIGHUP)
    await gw.heard("STATUS", "2/2 workers serving")
    await asyncio.sleep(0.5)
    assert all(gw.notify.ready_while_accepting), gw.notify.messages


async def spread(port: int, model: str, count: int) -> list[int]:
    """`count` requests for `model`, each on a new connection (so the kernel spreads them
    over the workers); their statuses."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        answers = await asyncio.gather(*(post(session, port, model) for _ in range(count)))
    return [status for status, _ in answers]


async def test_a_restarted_worker_serves_the_config_in_force_not_the_file_on_disk(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """The file is edited (model c added) but not reloaded; a worker dies and is started
    again. Every worker must go on serving the config in force: c is 404 on all of them,
    not 200 or 404 by the luck of which worker the kernel picks."""
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim))
    await gw.heard("READY", "1")
    gw.config.write_text(workers_text(port, sim, ("a", "c")))
    first = gw.pids()
    heard = len(gw.notify.messages)
    os.kill(first[0], signal.SIGKILL)
    await gw.heard("STATUS", "1/2 workers serving", after=heard)
    await gw.heard("STATUS", "2/2 workers serving", after=heard)
    statuses = await spread(port, "c", 40)
    assert [404] * 40 == statuses, sorted(statuses)
    assert 0 == await gw.stop()


async def test_a_restarted_worker_ignores_a_file_that_went_bad_on_disk(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """The file on disk turned bad (no SIGHUP) and a worker dies: it starts again on the
    config in force (the supervisor's copy), serves, and SIGTERM ends it all with exit 0."""
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim))
    await gw.heard("READY", "1")
    gw.config.write_text("server: {workers: 2, prot: 1}\n")
    os.kill(gw.pids()[0], signal.SIGKILL)
    await gw.logged("worker 0 started", count=2)
    heard = len(gw.notify.messages)
    await gw.heard("STATUS", "2/2 workers serving", after=heard)
    assert "prot" not in gw.stderr()
    assert gw.proc.poll() is None
    assert [200] * 20 == await spread(port, "a", 20)
    assert 0 == await gw.stop()


async def streams_on(port: int, count: int, tokens: int) -> list[asyncio.Task[tuple[int, bytes]]]:
    """`count` streams of `tokens` tokens (50 ms each on the sim), each on its own connection."""

    async def one() -> tuple[int, bytes]:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            return await post(session, port, "a", tokens)

    return [asyncio.create_task(one()) for _ in range(count)]


async def test_ctrl_c_to_the_process_group_drains_every_worker_and_exits_0(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Ctrl-C in a terminal sends SIGINT to the supervisor and its workers at once: every
    stream in flight completes, each worker says it stopped, no traceback, exit 0."""
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim), session=True)
    await gw.heard("READY", "1")
    streams = await streams_on(port, 20, 30)
    await asyncio.sleep(0.5)
    os.killpg(gw.proc.pid, signal.SIGINT)
    results = await asyncio.gather(*streams, return_exceptions=True)
    assert 0 == await asyncio.to_thread(gw.proc.wait, 30)
    assert all(not isinstance(r, BaseException) and complete(r[1]) for r in results), results[:3]
    assert 2 == gw.stderr().count("stopped\n")
    assert "Traceback" not in gw.stderr()


async def test_workers_of_a_sigkilled_supervisor_finish_their_streams_and_exit(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """SIGKILL to the supervisor: no worker is left orphaned serving the port; each drains
    (its streams complete) and exits."""
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim))
    await gw.heard("READY", "1")
    pids = list(gw.pids().values())
    streams = await streams_on(port, 10, 30)
    await asyncio.sleep(0.5)
    gw.proc.kill()
    results = await asyncio.gather(*streams, return_exceptions=True)
    assert all(not isinstance(r, BaseException) and complete(r[1]) for r in results), results[:3]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, [p for p in pids if alive(p)]
        await asyncio.sleep(0.1)
    assert not accepts(port)


async def test_sigterm_while_a_worker_waits_to_restart_stops_everything(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """SIGTERM during a worker's back-off, and again while a worker is starting: the
    supervisor exits 0 promptly and leaves no worker behind."""
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim))
    await gw.heard("READY", "1")
    pids = gw.pids()
    os.kill(pids[0], signal.SIGKILL)
    await gw.logged("starting it again in 0.5 s")
    assert 0 == await gw.stop(within_s=15)
    assert not any(alive(pid) for pid in pids.values())
    assert 1 == gw.stderr().count("worker 0 started")

    (tmp_path / "again").mkdir()
    again = start(gateways, tmp_path / "again", workers_text(port, sim))
    await again.heard("READY", "1")
    os.kill(again.pids()[1], signal.SIGKILL)
    await again.logged("worker 1 started", count=2)  # the new one has not served yet
    assert 0 == await again.stop(within_s=15)
    assert not any(alive(pid) for pid in again.pids().values())


async def test_a_stale_run_directory_does_not_stop_the_workers(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """RUNTIME_DIRECTORY still holds a SIGKILLed run's notify.sock and worker sockets (and
    a stray file): the supervisor starts, READY=1 comes once both workers serve, and their
    metrics sockets answer (one scrape sees both workers)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("notify.sock", "worker-0.sock", "worker-1.sock"):
        stale = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM if name == "notify.sock" else socket.SOCK_STREAM
        )
        stale.bind(str(run / name))
        stale.close()  # the file stays, nobody listens: what a SIGKILL leaves
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim), env={"RUNTIME_DIRECTORY": str(run)})
    ready = await gw.heard("READY", "1")
    assert ready["STATUS"].startswith("2/2 workers serving")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    assert re.search(r"^proxy_workers_answered 2\.0$", text, re.M), text[-1500:]
    assert 0 == await gw.stop()


# -- many reloads, drains -----------------------------------------------------------------


async def test_fifty_reloads_leak_no_file_descriptors(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """50 reloads, each rebuilding backend x (its keepalive_s flips) with a request on the
    new one after each: the gateway's open descriptors stay where they were."""
    port = free_port()

    def text(i: int) -> str:
        return yaml(
            port,
            {"x": f"url: '{sim}', kind: vllm, keepalive_s: {4 + i % 2}"},
            {"a": "targets: [{backend: x}]"},
            health="interval_s: 30",
        )

    gw = start(gateways, tmp_path, text(0))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        for i in range(1, 53):
            done = await gw.reload(text(i))
            assert "backends changed: x" in done["STATUS"], done
            status, body = await post(session, port, "a", 1)
            assert (200, True) == (status, complete(body))
            if i == 2:
                await asyncio.sleep(0.3)  # the retired backends have closed
                before = fd_count(gw.proc.pid)
        await asyncio.sleep(0.3)
        after = fd_count(gw.proc.pid)
    assert after - before <= 2, (before, after)
    assert 0 == await gw.stop()


async def test_fifty_reloads_leave_no_task_behind(fakes: list[Fake], gateway_factory) -> None:
    """In one process: 50 reloads through the Reloader, each rebuilding the backend, with a
    request after each: the loop runs as many tasks as before and every retired backend's
    pool is closed."""
    backend = await fake(fakes)

    def text(i: int) -> str:
        return yaml(
            0,
            {"x": f"url: '{backend.url}', kind: vllm, keepalive_s: {4 + i % 2}"},
            {"m": "targets: [{backend: x}]"},
            health="interval_s: 30",
        )

    gw = await gateway_factory(text(0))
    live = gw.serving.runner.app[LIVE]
    count = iter(range(1, 1000))
    reloader = Reloader(live, lambda: load_config(text(next(count))), "test", {})
    retired = []
    async with aiohttp.ClientSession() as session:
        for i in range(50):
            old = live.state.backends["x"]
            assert await reloader.once()
            retired.append(old)
            async with session.post(f"{gw.url}/v1/chat/completions", data=chat("m")) as response:
                assert 200 == response.status
                await response.read()
            if i == 1:
                await asyncio.sleep(0.3)
                tasks = len(asyncio.all_tasks())
        await asyncio.sleep(0.3)
        assert (0, tasks) == (len(live.tasks), len(asyncio.all_tasks()))
    assert all(b.pool.closing and not b.pool.open for b in retired)


async def test_access_log_lines_of_two_workers_never_cut_into_one_another(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """800 requests over new connections on two workers sharing one stdout pipe, each
    with a 128-byte request id: every line on stdout is one whole JSON object, one per
    request, none lost when both drain."""
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim), capture=True)
    await gw.heard("READY", "1")
    connector = aiohttp.TCPConnector(force_close=True, limit=50)
    ids = [f"{i:06d}" + "r" * 122 for i in range(800)]
    async with aiohttp.ClientSession(connector=connector) as session:
        answers = await asyncio.gather(
            *(post(session, port, "a", 1, **{"X-Request-ID": rid}) for rid in ids)
        )
    assert all(status == 200 for status, _ in answers)
    assert 0 == await gw.stop()
    records = [orjson.loads(line) for line in gw.lines]  # raises on a cut or joined line
    logged = sorted(r["request_id"] for r in records if r["path"] == "/v1/chat/completions")
    assert ids == logged
    assert 2 == len(set(re.findall(r"\[worker (\d)\] stopped", gw.stderr())))


def one_model(port: int, url: str, models: tuple[str, ...] = ("a",), **sections: str) -> str:
    return yaml(
        port,
        {"sim": f"url: '{url}', kind: vllm"},
        {m: "targets: [{backend: sim}]" for m in models},
        **sections,
    )


READY_HEAD = b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"


def answer_on(sock: socket.socket) -> bytes:
    """One answer with a Content-Length body on a kept-alive connection (b"" if closed)."""
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        if b"\r\n\r\n" not in data:
            return data  # closed before an answer
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"Content-Length: (\d+)", head, re.I)
        while length and len(body) < int(length.group(1)) and (chunk := sock.recv(65536)):
            body += chunk
        return head + b"\r\n\r\n" + body
    return data


async def test_a_load_balancer_probing_ready_on_a_kept_alive_connection_hears_draining(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """With server.drain_grace_s, a probe that keeps its connection to /ready open (as load
    balancers do) asks again after SIGTERM, while a stream still drains: it hears 503
    {"status": "draining"} with Connection: close, and so does a probe on a new connection."""
    port = free_port()
    gw = start(gateways, tmp_path, one_model(port, sim, server="drain_grace_s: 1"))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        await until_ready(session, port)
        probe = raw_request(port, READY_HEAD)
        try:
            assert answer_on(probe).startswith(b"HTTP/1.1 200")
            streaming = asyncio.create_task(post(session, port, "a", 40))  # 2 s
            await asyncio.sleep(0.5)
            gw.proc.send_signal(signal.SIGTERM)
            await gw.heard("STOPPING", "1")
            with contextlib.suppress(OSError):
                probe.sendall(READY_HEAD)
            answer = await asyncio.to_thread(answer_on, probe)
        finally:
            probe.close()
        status, body = await streaming
    assert (200, True) == (status, complete(body))
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b'"draining"' in answer
    assert b"connection: close" in answer.lower()


async def test_drain_s_zero_cuts_what_is_left_and_exits_0_at_once(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """server.drain_s: 0 with a long stream in flight: SIGTERM ends the process with exit 0
    within a couple of seconds, the stream is cut, and the log says how many were cut."""
    port = free_port()
    gw = start(gateways, tmp_path, one_model(port, sim).replace("drain_s: 20", "drain_s: 0"))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        streaming = asyncio.create_task(post(session, port, "a", 200))  # 10 s
        await asyncio.sleep(0.5)
        began = time.monotonic()
        code = await gw.stop(within_s=10)
        took = time.monotonic() - began
        result = await asyncio.gather(streaming, return_exceptions=True)
    assert 0 == code
    assert took < 3, took
    assert isinstance(result[0], BaseException) or not complete(result[0][1])
    assert "drain time is up (server.drain_s): 1 request(s) cut" in gw.stderr()


async def test_a_reload_during_the_drain_neither_breaks_nor_extends_it(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """SIGHUP (with a file that adds a model) while SIGTERM drains 20 streams: every stream
    completes, the port stays closed, exit 0 and no traceback."""
    port = free_port()
    gw = start(gateways, tmp_path, one_model(port, sim))
    await gw.heard("READY", "1")
    streams = await streams_on(port, 20, 30)
    await asyncio.sleep(0.5)
    gw.proc.send_signal(signal.SIGTERM)
    await gw.heard("STOPPING", "1")
    gw.config.write_text(one_model(port, sim, ("a", "c")))
    gw.proc.send_signal(signal.SIGHUP)
    results = await asyncio.gather(*streams, return_exceptions=True)
    assert 0 == await asyncio.to_thread(gw.proc.wait, 30)
    assert all(not isinstance(r, BaseException) and complete(r[1]) for r in results), results[:3]
    assert not accepts(port)
    assert "Traceback" not in gw.stderr()


async def test_a_reload_during_a_reload_ends_with_the_last_file_in_force(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """A first reload waits on a new backend's probe (it accepts and never answers); a
    second SIGHUP with another file comes meanwhile: afterwards the second file is in
    force (c served, b gone) and systemd heard a READY=1 after each RELOADING=1."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # connections complete in the kernel; nothing ever answers
    port = free_port()
    health = "interval_s: 30, timeout_s: 1"
    base = {"sim": f"url: '{sim}', kind: vllm"}
    gw = start(
        gateways, tmp_path, yaml(port, base, {"a": "targets: [{backend: sim}]"}, health=health)
    )
    try:
        await gw.heard("READY", "1")
        heard = len(gw.notify.messages)
        slow = {**base, "hole": f"url: 'http://127.0.0.1:{hole.getsockname()[1]}', kind: vllm"}
        gw.config.write_text(
            yaml(
                port,
                slow,
                {"a": "targets: [{backend: sim}]", "b": "targets: [{backend: hole}]"},
                health=health,
            )
        )
        gw.proc.send_signal(signal.SIGHUP)
        await gw.heard("RELOADING", "1", after=heard)
        gw.config.write_text(
            yaml(
                port,
                base,
                {"a": "targets: [{backend: sim}]", "c": "targets: [{backend: sim}]"},
                health=health,
            )
        )
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while [m.get("READY") for m in gw.notify.messages[heard:] if "READY" in m] != ["1", "1"]:
            assert time.monotonic() < deadline, gw.notify.messages[heard:]
            await asyncio.sleep(0.05)
        said = [k for m in gw.notify.messages[heard:] for k in ("RELOADING", "READY") if k in m]
        assert ["RELOADING", "READY", "RELOADING", "READY"] == said
        async with aiohttp.ClientSession() as session:
            assert 200 == (await post(session, port, "c"))[0]
            assert 404 == (await post(session, port, "b"))[0]
        assert 0 == await gw.stop()
    finally:
        hole.close()


async def test_sighup_with_backend_only_is_logged_and_serving_goes_on(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """`--backend URL` has no file to reload: SIGHUP is logged, systemd hears no RELOADING=1
    it would wait on, and requests are served before and after."""
    port = free_port()
    gw = Gateway(tmp_path, port, args=["--backend", sim, "--port", str(port)])
    gateways.append(gw)
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        await until_ready(session, port)
        assert 200 == (await post(session, port, "a"))[0]
        gw.proc.send_signal(signal.SIGHUP)
        await gw.logged("nothing to reload")
        assert 200 == (await post(session, port, "b"))[0]
    assert not any("RELOADING" in m for m in gw.notify.messages)
    assert 0 == await gw.stop()


async def test_no_models_mode_reloads_into_models_and_back(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """A file without models (every model the backend lists) reloads into one with only a,
    where b is a 404, and back again, where b is served; a stream under way on the first
    file completes across both."""
    port = free_port()
    none = yaml(port, {"sim": f"url: '{sim}', kind: vllm"}, {})
    gw = start(gateways, tmp_path, none)
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        await until_ready(session, port)
        under_way = asyncio.Event()

        async def long_stream() -> tuple[int, bytes]:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=chat("b", 40),
                headers={"Content-Type": "application/json"},
            ) as response:
                under_way.set()  # its head came: the first file's state serves it
                return response.status, await response.read()

        long = asyncio.create_task(long_stream())
        await asyncio.wait_for(under_way.wait(), 10)  # not reloaded before it even arrived
        assert 200 == (await post(session, port, "b"))[0]
        await gw.reload(one_model(port, sim))
        assert (200, 404) == (
            (await post(session, port, "a"))[0],
            (await post(session, port, "b"))[0],
        )
        await gw.reload(none)
        assert 200 == (await post(session, port, "b"))[0]
        status, body = await long
    assert (200, True) == (status, complete(body))
    assert 0 == await gw.stop()


async def test_max_in_flight_of_an_unchanged_backend_holds_across_a_reload(
    fakes: list[Fake], tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Backend x (max_in_flight 2) is kept by a reload that adds a model on it: with two
    streams on it, a request for the new model waits for a slot (never a third at once)
    and is served once one frees."""
    backend = await fake(fakes)
    port = free_port()
    spec = {"x": f"url: '{backend.url}', kind: vllm, max_in_flight: 2"}
    gw = start(gateways, tmp_path, yaml(port, spec, {"m": "targets: [{backend: x}]"}))
    await gw.heard("READY", "1")
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(post(session, port, "m", 30)) for _ in range(2)]
        await asyncio.sleep(0.3)
        done = await gw.reload(
            yaml(port, spec, {"m": "targets: [{backend: x}]", "n": "targets: [{backend: x}]"})
        )
        assert "models added: n" in done["STATUS"]
        extra = asyncio.create_task(post(session, port, "n", 1))
        results = await asyncio.gather(*held, extra)
    assert all(status == 200 and complete(body) for status, body in results), results
    assert 2 == backend.peak


# -- signals and ports at the edges -------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_sighup_while_the_gateway_starts_does_not_kill_it(
    sim: str, tmp_path: Path, gateways: list[Gateway], workers: int
) -> None:
    """SIGHUP 0.2 s after start (a `kill -HUP` from a deploy script racing the start): the
    gateway (one process, or the supervisor) must not die of it, and comes up serving."""
    port = free_port()
    gw = start(gateways, tmp_path, one_model(port, sim, server=f"workers: {workers}"))
    await asyncio.sleep(0.2)
    gw.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.3)
    assert gw.proc.poll() is None, (gw.proc.returncode, gw.stderr())
    await gw.heard("READY", "1")
    assert 0 == await gw.stop()


async def test_the_status_line_does_not_repeat_a_dead_workers_last_words(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Once worker 0 is killed, the STATUS line systemd shows says 1/2 serving and does not
    still quote worker 0 as "serving: ..." from before it died."""
    port = free_port()
    gw = start(gateways, tmp_path, workers_text(port, sim))
    await gw.heard("READY", "1")
    heard = len(gw.notify.messages)
    os.kill(gw.pids()[0], signal.SIGKILL)
    status = (await gw.heard("STATUS", "1/2 workers serving", after=heard))["STATUS"]
    assert "worker 0: serving" not in status, status
    assert 0 == await gw.stop()


async def test_a_second_supervisor_on_the_same_port_refuses_to_start(
    sim: str, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """A gateway with workers already holds the port; a second one (another config, same
    user) must exit 1 saying the address is in use, not silently share the port so that the
    kernel splits clients between two configs."""
    port = free_port()
    first = start(gateways, tmp_path, workers_text(port, sim))
    await first.heard("READY", "1")
    (tmp_path / "second").mkdir()
    second = start(gateways, tmp_path / "second", workers_text(port, sim, ("a", "c")))
    deadline = time.monotonic() + 10
    while second.proc.poll() is None and not any("READY" in m for m in second.notify.messages):
        assert time.monotonic() < deadline, second.stderr()
        await asyncio.sleep(0.05)
    shared = await spread(port, "c", 20) if second.proc.poll() is None else []
    assert 1 == second.proc.poll(), f"both serve the port; model c answered {sorted(shared)}"
    assert "the address is already in use" in second.stderr()
