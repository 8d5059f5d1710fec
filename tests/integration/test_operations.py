"""The gateway as systemd runs it: real processes, real signals, a real notify socket.

Readiness only once the port accepts; SIGTERM drains 200 slow streams; SIGHUP swaps the config
under 200 streams; a bad file keeps the old one serving; workers on one port, one killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
STREAMS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class Notifications:
    """A datagram socket standing in for systemd's: every message, and whether the port
    accepted connections at the moment a READY=1 arrived."""

    def __init__(self, directory: Path, port: int) -> None:
        self.path = str(directory / "notify.sock")
        self.port = port
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self.ready_while_accepting: list[bool] = []
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if fields.get("READY") == "1":
                self.ready_while_accepting.append(accepts(self.port))
            self.messages.append(fields)

    def wait_for(self, key: str, value: str | None = None, after: int = 0, within_s: float = 30):
        """The first message from index `after` on that has `key` (whose value starts with
        `value`)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for message in self.messages[after:]:
                if key in message and message[key].startswith(value or ""):
                    return message
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} in {self.messages[after:]}")

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()


class Gateway:
    """`python -m proxy --config FILE` with a notify socket, as systemd starts it."""

    def __init__(self, config: Path, port: int, notify: Notifications) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "API_KEYS": "", "NOTIFY_SOCKET": notify.path},
        )
        self.notify = notify
        self.stderr = ""

    def finish(self, within_s: float) -> int:
        _, self.stderr = self.proc.communicate(timeout=within_s)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def sim() -> Iterator[str]:
    """A simulated backend serving models a, b and c, a token every 50 ms."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "bench.simbackend", "--port", str(port),
            "--chunk-delay-ms", "50", "--model", "a,b,c",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert "listening" in proc.stdout.readline()
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.communicate(timeout=10)


def config_text(port: int, backend: str, models: list[str], workers: int = 1) -> str:
    lines = [
        f"server: {{port: {port}, workers: {workers}, drain_s: 20, max_connections: 2000}}",
        "health: {interval_s: 0.5}",
        f"backends:\n  sim: {{url: '{backend}', kind: vllm}}",
        "models:",
        *(f"  {m}: {{targets: [{{backend: sim}}]}}" for m in models),
    ]
    return "\n".join(lines) + "\n"


async def stream(session: aiohttp.ClientSession, port: int, model: str, tokens: int) -> bytes:
    body = {"model": model, "stream": True, "max_tokens": tokens, "messages": []}
    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
        assert 200 == response.status, await response.text()
        return await response.read()


def done_ok(results: list[bytes | BaseException]) -> int:
    return sum(isinstance(r, bytes) and r.rstrip().endswith(b"data: [DONE]") for r in results)


def start(tmp_path: Path, text: str, port: int) -> tuple[Gateway, Notifications, Path]:
    config = tmp_path / "proxy.yaml"
    config.write_text(text)
    notify = Notifications(tmp_path, port)
    gateway = Gateway(config, port, notify)
    notify.wait_for("READY", "1")
    return gateway, notify, config


async def test_ready_comes_only_once_the_port_accepts(sim: str, tmp_path: Path) -> None:
    """READY=1 reaches $NOTIFY_SOCKET only when a connection to the port succeeds; SIGTERM
    sends STOPPING=1, and STATUS lines say what the gateway does."""
    port = free_port()
    gateway, notify, _ = start(tmp_path, config_text(port, sim, ["a"]), port)
    try:
        assert [True] == notify.ready_while_accepting
        ready = notify.wait_for("READY", "1")
        assert ready["MAINPID"] == str(gateway.proc.pid)
        assert ready["STATUS"].startswith("serving: 0 request(s) in flight")
        gateway.proc.send_signal(signal.SIGTERM)
        assert 0 == gateway.finish(within_s=30)
        notify.wait_for("STOPPING", "1")
    finally:
        gateway.kill()
        notify.close()


async def test_sigterm_during_200_slow_streams_lets_every_one_finish(
    sim: str, tmp_path: Path
) -> None:
    """SIGTERM under 200 streams of 2 s: /ready says draining at once, new connections are
    refused, every stream completes, and the process exits 0 well within drain_s."""
    port = free_port()
    gateway, notify, _ = start(tmp_path, config_text(port, sim, ["a"]), port)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            streams = [asyncio.create_task(stream(session, port, "a", 40)) for _ in range(STREAMS)]
            await asyncio.sleep(1.0)  # every stream is under way (40 tokens take 2 s)
            assert not any(t.done() for t in streams)
            stopped_at = time.monotonic()
            gateway.proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING", "1", within_s=5)
            await asyncio.sleep(0.3)
            assert not accepts(port)
            results = await asyncio.gather(*streams, return_exceptions=True)
        assert STREAMS == done_ok(results), [r for r in results if not isinstance(r, bytes)][:3]
        assert 0 == await asyncio.to_thread(gateway.finish, 30)
        assert time.monotonic() - stopped_at < 20
        assert "draining: " in gateway.stderr
        assert "cut" not in gateway.stderr
    finally:
        gateway.kill()
        notify.close()


async def test_sighup_under_200_streams_swaps_models_and_drops_none(
    sim: str, tmp_path: Path
) -> None:
    """A new file that removes model b and adds model c, applied under 200 streams on a and b:
    every stream completes, c is served as soon as READY=1 says the reload is done, b is gone,
    and systemd heard RELOADING=1 (with MONOTONIC_USEC) and then READY=1."""
    port = free_port()
    gateway, notify, config = start(tmp_path, config_text(port, sim, ["a", "b"]), port)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            streams = [
                asyncio.create_task(stream(session, port, "ab"[i % 2], 40)) for i in range(STREAMS)
            ]
            await asyncio.sleep(1.0)
            config.write_text(config_text(port, sim, ["a", "c"]))
            heard = len(notify.messages)
            gateway.proc.send_signal(signal.SIGHUP)
            reloading = notify.wait_for("RELOADING", "1", after=heard)
            assert int(reloading["MONOTONIC_USEC"]) > 0
            done = notify.wait_for("READY", "1", after=heard)
            assert done["STATUS"].startswith("reloaded ")
            assert "models added: c" in done["STATUS"]
            assert "models removed: b" in done["STATUS"]
            assert b"data: [DONE]" in await stream(session, port, "c", 2)  # at once
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "b"}
            ) as gone:
                assert 404 == gone.status
            assert not any(t.done() for t in streams)  # the reload did not wait for them
            results = await asyncio.gather(*streams, return_exceptions=True)
        assert STREAMS == done_ok(results)
        gateway.proc.send_signal(signal.SIGTERM)
        assert 0 == await asyncio.to_thread(gateway.finish, 30)
    finally:
        gateway.kill()
        notify.close()


async def test_a_bad_file_on_sighup_keeps_the_old_config_serving(sim: str, tmp_path: Path) -> None:
    """Every error of the bad file is logged, the notify socket says the reload failed and
    the old config serves on."""
    port = free_port()
    gateway, notify, config = start(tmp_path, config_text(port, sim, ["a"]), port)
    try:
        config.write_text("server: {prot: 1}\nmodels: {z: {targets: [{backend: nope}]}}\n")
        heard = len(notify.messages)
        gateway.proc.send_signal(signal.SIGHUP)
        done = notify.wait_for("READY", "1", after=heard)
        assert done["STATUS"].startswith("reload failed: ")
        assert "the previous config still serves" in done["STATUS"]
        async with aiohttp.ClientSession() as session:
            assert b"data: [DONE]" in await stream(session, port, "a", 2)
        gateway.proc.send_signal(signal.SIGTERM)
        assert 0 == await asyncio.to_thread(gateway.finish, 30)
        assert "server.prot: unknown key" in gateway.stderr
        assert "unknown backend 'nope'" in gateway.stderr
    finally:
        gateway.kill()
        notify.close()


def launch(config: Path, out: Path, err: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The gateway at debug level, its standard output and error in files."""
    with out.open("w") as stdout, err.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config), "--log-level", "debug"],
            cwd=ROOT,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, **env},
        )


async def test_no_key_or_prompt_text_reaches_any_log(sim: str, tmp_path: Path) -> None:
    """Keys (good and bad) and prompt text never appear in the access log (stdout) or the
    other logs (stderr), through requests, refusals, a good and a bad reload and a drain."""
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(config_text(port, sim, ["a"], workers=2))
    notify = Notifications(tmp_path, port)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    proc = launch(config, out, err, {"API_KEYS": "sk-good-4711", "NOTIFY_SOCKET": notify.path})
    try:
        notify.wait_for("READY", "1")
        prompt = "the-secret-prompt-0815"
        body = {"model": "a", "messages": [{"role": "user", "content": prompt}]}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            for key in ("sk-good-4711", "sk-bad-1234", None):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                for payload in (body, {**body, "stream": True}, {**body, "model": prompt}):
                    async with session.post(url, json=payload, headers=headers) as response:
                        await response.read()
            async with session.post(url, data=b"{" + prompt.encode(), headers=headers) as r:
                assert 401 == r.status
        heard = len(notify.messages)
        config.write_text(config_text(port, sim, ["a", "b"], workers=2))
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY", "1", after=heard)
        heard = len(notify.messages)
        config.write_text("server: {workers: 2}\nbogus: 1\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY", "1", after=heard)
        proc.send_signal(signal.SIGTERM)
        assert 0 == await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        notify.close()
    logs = out.read_text() + err.read_text()
    assert out.read_text().count("\n") >= 9  # the access log did write
    for secret in ("sk-good-4711", "sk-bad-1234", "the-secret-prompt"):
        assert secret not in logs
