"""The command line as an operator uses it: --check, --backend, real signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_check_accepts_the_example_config() -> None:
    """conf/proxy.yaml, the documented example, passes --check."""
    result = run_cli("--config", "conf/proxy.yaml", "--check")
    assert (0, "config ok\n") == (result.returncode, result.stdout)


def test_check_reports_every_error(tmp_path: Path) -> None:
    """--check lists each problem with its dotted path and exits 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server: {prot: 1}\nbackends: {a: {url: 'http://127.0.0.1:1'}}\n"
        "models:\n  q: {targets: [{backend: gpu-z}], fallbacks: [nope]}\n"
    )
    first = run_cli("--config", str(bad), "--check")
    assert 2 == first.returncode
    assert "server.prot: unknown key" in first.stderr
    bad.write_text(
        "backends: {a: {url: 'http://127.0.0.1:1'}}\n"
        "models:\n  q: {targets: [{backend: gpu-z}], fallbacks: [nope]}\n"
    )
    second = run_cli("--config", str(bad), "--check")
    assert 2 == second.returncode
    assert "models.q.targets[0].backend: unknown backend 'gpu-z'" in second.stderr
    assert "models.q.fallbacks[0]: unknown model 'nope'" in second.stderr


def test_unparsable_yaml_exits_2(tmp_path: Path) -> None:
    """YAML that does not parse is exit 2 with a message."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    result = run_cli("--config", str(bad), "--check")
    assert 2 == result.returncode
    assert "invalid YAML" in result.stderr


class Running:
    """A gateway subprocess started from the command line."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args, "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "API_KEYS": ""},
        )
        self.wait_listening()

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
                time.sleep(0.05)
        raise AssertionError("gateway did not start listening")

    def finish(self, within_s: float = 15) -> tuple[int, str]:
        """Wait for the exit; the exit status and everything written to stderr."""
        _, err = self.proc.communicate(timeout=within_s)
        return self.proc.returncode, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def sim_process():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.simbackend", "--port", str(port), "--chunk-delay-ms", "100"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert "listening" in proc.stdout.readline()
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.communicate(timeout=10)


def post_stream(port: int, tokens: int) -> socket.socket:
    body = f'{{"model": "sim-model", "stream": true, "max_tokens": {tokens}}}'.encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_all(sock: socket.socket, within_s: float = 20) -> bytes:
    sock.settimeout(within_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if data.endswith(b"0\r\n\r\n"):
            break
    return data


def test_backend_mode_serves_and_sigterm_drains(sim_process) -> None:
    """--backend needs no file; SIGTERM lets a stream in flight finish, then exits 0."""
    gw = Running("--backend", sim_process)
    try:
        with post_stream(gw.port, tokens=8) as sock:  # ~0.8 s of tokens
            time.sleep(0.3)
            gw.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(OSError):  # no new connections while draining
                socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
            data = read_all(sock)
        assert b"data: [DONE]" in data
        status, stderr = gw.finish()
        assert 0 == status
        assert "auth OFF" in stderr
        assert re.search(r"listening on http://127\.0\.0\.1:\d+", stderr)
    finally:
        gw.stop()


def test_ctrl_c_stops_cleanly(sim_process) -> None:
    """SIGINT (Ctrl-C) stops the gateway with exit status 0."""
    gw = Running("--backend", sim_process)
    try:
        gw.proc.send_signal(signal.SIGINT)
        assert 0 == gw.finish()[0]
    finally:
        gw.stop()
