"""`server.workers: 2`: one supervisor, two serving processes on one port, real signals.

Which worker holds a client's connection is read from the kernel (/proc/net/tcp and each
worker's open file descriptors), so a test knows which streams a killed worker carried.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_operations import (
    ROOT,
    Notifications,
    accepts,
    config_text,
    done_ok,
    free_port,
    sim,
    stream,
)

__all__ = ["sim"]  # the fixture, shared with test_operations


class Supervised:
    """`python -m proxy --config FILE` with server.workers: 2, its log kept in a file."""

    def __init__(self, tmp_path: Path, text: str, port: int) -> None:
        self.config = tmp_path / "proxy.yaml"
        self.config.write_text(text)
        self.port = port
        self.log = tmp_path / "stderr.log"
        self.notify = Notifications(tmp_path, port)
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--config", str(self.config)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "API_KEYS": "", "NOTIFY_SOCKET": self.notify.path},
            )

    def stderr(self) -> str:
        return self.log.read_text()

    def pids(self) -> dict[int, int]:
        """The newest pid of each worker index, from the supervisor's log."""
        found = re.findall(r"worker (\d+) started \(pid (\d+)\)", self.stderr())
        return {int(index): int(pid) for index, pid in found}

    def finish(self, within_s: float) -> int:
        return self.proc.wait(timeout=within_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # Its workers get SIGTERM when it dies (PR_SET_PDEATHSIG), however it dies.
        self.notify.close()


def holder(client_port: int, server_port: int, pids: list[int]) -> int | None:
    """The pid whose open files hold the server side of the connection from `client_port`."""
    wanted = f"0100007F:{server_port:04X} 0100007F:{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if f"{fields[1]} {fields[2]}" == wanted:
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


async def raw_stream(port: int, tokens: int) -> tuple[socket.socket, asyncio.Task[bytes]]:
    """A stream on a connection of its own; its socket (to find its worker) and its reading."""
    sock = socket.create_connection(("127.0.0.1", port))
    body = f'{{"model": "a", "stream": true, "max_tokens": {tokens}, "messages": []}}'.encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )

    def read() -> bytes:
        sock.settimeout(30)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
        return data

    return sock, asyncio.create_task(asyncio.to_thread(read))


async def test_two_workers_serve_one_port_and_survive_a_sigkill(sim: str, tmp_path: Path) -> None:
    """READY=1 comes once both workers accept. One worker killed with SIGKILL mid-stream:
    every stream the other worker carried completes, the dead one is started again, and
    afterwards both serve."""
    port = free_port()
    gw = Supervised(tmp_path, config_text(port, sim, ["a"], workers=2), port)
    try:
        ready = gw.notify.wait_for("READY", "1")
        assert [True] == gw.notify.ready_while_accepting
        assert ready["MAINPID"] == str(gw.proc.pid)
        assert ready["STATUS"].startswith("2/2 workers serving")
        pids = gw.pids()
        assert [0, 1] == sorted(pids)
        streams = [await raw_stream(port, 40) for _ in range(40)]
        await asyncio.sleep(0.8)
        owners = [holder(s.getsockname()[1], port, list(pids.values())) for s, _ in streams]
        assert set(pids.values()) <= set(owners), owners  # the kernel spread them
        heard = len(gw.notify.messages)
        os.kill(pids[0], signal.SIGKILL)
        results = [await task for _, task in streams]
        for sock, _ in streams:
            sock.close()
        survivors = [r for r, o in zip(results, owners, strict=True) if o == pids[1]]
        complete = [r for r in survivors if b"data: [DONE]" in r and r.endswith(b"\r\n0\r\n\r\n")]
        assert len(survivors) == len(complete) > 0
        gw.notify.wait_for("STATUS", "1/2 workers serving", after=heard)
        gw.notify.wait_for("STATUS", "2/2 workers serving", after=heard)
        assert gw.pids()[0] != pids[0]
        assert "worker 0 (pid " + str(pids[0]) + ") was killed by SIGKILL" in gw.stderr()
        async with aiohttp.ClientSession() as session:  # both serve: every request succeeds
            answers = await asyncio.gather(*(stream(session, port, "a", 1) for _ in range(40)))
        assert 40 == done_ok(list(answers))
        gw.proc.send_signal(signal.SIGTERM)
        assert 0 == gw.finish(within_s=30)
    finally:
        gw.close()


async def test_sigterm_drains_every_worker_and_metrics_add_up(sim: str, tmp_path: Path) -> None:
    """Known traffic over two workers: one scrape of the shared port has the exact total;
    then SIGTERM under streams on both workers: every stream completes, exit 0."""
    port = free_port()
    gw = Supervised(tmp_path, config_text(port, sim, ["a"], workers=2), port)
    try:
        gw.notify.wait_for("READY", "1")
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection, a new worker
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(stream(session, port, "a", 1) for _ in range(60)))
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            total = sum(
                float(m.group(1))
                for m in re.finditer(
                    r'^proxy_requests_total\{[^}]*route="/v1/chat/completions"[^}]*\} (\S+)$',
                    text,
                    re.M,
                )
            )
            assert 60 == total
            assert re.search(r"^proxy_workers_answered 2\.0$", text, re.M), text[-2000:]
            streams = [asyncio.create_task(stream(session, port, "a", 40)) for _ in range(60)]
            await asyncio.sleep(1.0)
            gw.proc.send_signal(signal.SIGTERM)
            gw.notify.wait_for("STOPPING", "1", within_s=5)
            results = await asyncio.gather(*streams, return_exceptions=True)
        assert 60 == done_ok(results)
        assert 0 == await asyncio.to_thread(gw.finish, 30)
        assert 2 == gw.stderr().count("stopped\n")
    finally:
        gw.close()


async def test_sighup_reloads_every_worker_and_a_bad_file_touches_none(
    sim: str, tmp_path: Path
) -> None:
    """A good file: READY=1 once both workers reloaded, the new model served by both. A bad
    file: the supervisor refuses it, no worker reloads, the notify socket says so."""
    port = free_port()
    gw = Supervised(tmp_path, config_text(port, sim, ["a"], workers=2), port)
    try:
        gw.notify.wait_for("READY", "1")
        gw.config.write_text(config_text(port, sim, ["a", "c"], workers=2))
        heard = len(gw.notify.messages)
        gw.proc.send_signal(signal.SIGHUP)
        gw.notify.wait_for("RELOADING", "1", after=heard)
        gw.notify.wait_for("READY", "1", after=heard)
        assert 2 == gw.stderr().count("is in force (models added: c)")
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            answers = await asyncio.gather(*(stream(session, port, "c", 1) for _ in range(30)))
        assert 30 == done_ok(list(answers))
        gw.config.write_text("server: {workers: 2, prot: 1}\n")
        heard = len(gw.notify.messages)
        gw.proc.send_signal(signal.SIGHUP)
        failed = gw.notify.wait_for("READY", "1", after=heard)
        assert failed["STATUS"].startswith("reload failed: ")
        await asyncio.sleep(0.5)
        assert 2 == gw.stderr().count("is in force")  # no worker saw the bad file
        assert "server.prot: unknown key" in gw.stderr()
        async with aiohttp.ClientSession() as session:
            assert b"data: [DONE]" in await stream(session, port, "c", 1)
        gw.proc.send_signal(signal.SIGTERM)
        assert 0 == gw.finish(within_s=30)
    finally:
        gw.close()


def test_a_port_no_worker_can_open_exits_1(tmp_path: Path) -> None:
    """Another program listens on the port: the supervisor says so and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "proxy.yaml"
        config.write_text(config_text(port, "http://127.0.0.1:9", ["a"], workers=2))
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert 1 == result.returncode
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in result.stderr
    assert not accepts(port)


@pytest.mark.parametrize("workers", [0])
def test_zero_workers_means_one_per_core(tmp_path: Path, workers: int) -> None:
    """server.workers: 0 passes --check (the count is the machine's cores at start)."""
    config = tmp_path / "proxy.yaml"
    config.write_text(config_text(free_port(), "http://127.0.0.1:9", ["a"], workers=workers))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(config), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (0, "config ok\n") == (result.returncode, result.stdout)
