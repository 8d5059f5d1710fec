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

from proxy import __version__

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
    """--check lists every problem of every kind in one run, each with its dotted path, exit 2:
    unknown keys, wrong types, bad values and cross-references together."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server: {prot: 1, port: 99999}\n"
        "timeouts: {idle_s: soon}\n"
        "backends:\n"
        "  a: {url: 'http://127.0.0.1:1', colour: red}\n"
        "  b: {url: 'http://127.0.0.1:2', max_in_flight: many}\n"
        "models:\n"
        "  q: {targets: [{backend: gpu-z}, {backend: b}], fallbacks: [nope]}\n"
    )
    result = run_cli("--config", str(bad), "--check")
    assert 2 == result.returncode
    errors = [line.removeprefix("config error: ") for line in result.stderr.splitlines()]
    assert "server.prot: unknown key" in errors
    assert "backends.a.colour: unknown key" in errors
    assert "server.port: 99999 is not a TCP port (0-65535)" in errors
    assert any(e.startswith("timeouts.idle_s: ") for e in errors)
    assert any(e.startswith("backends.b.max_in_flight: ") for e in errors)
    assert "models.q.targets[0].backend: unknown backend 'gpu-z'" in errors
    assert "models.q.fallbacks[0]: unknown model 'nope'" in errors
    # backend b exists but did not decode: a reference to it is not an error of its own
    assert not any("unknown backend 'b'" in e for e in errors)
    assert 7 == len(errors)


def test_version() -> None:
    """--version prints the package's version and exits 0."""
    result = run_cli("--version")
    assert (0, f"inference-proxy {__version__}\n") == (result.returncode, result.stdout)


def test_log_level_accepts_only_real_levels() -> None:
    """An unknown --log-level is a usage error (exit 2, no traceback); case does not matter."""
    bad = run_cli("--backend", "http://127.0.0.1:9", "--log-level", "verbose", "--check")
    assert 2 == bad.returncode
    assert "--log-level" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = run_cli("--backend", "http://127.0.0.1:9", "--log-level", "debug", "--check")
    assert (0, "config ok\n") == (good.returncode, good.stdout)


def test_taken_port_is_one_line_and_exit_1() -> None:
    """Starting on a port another process holds: one line naming the address and why, exit 1."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("--backend", "http://127.0.0.1:9", "--port", str(port))
    assert 1 == result.returncode
    assert "Traceback" not in result.stderr
    expected = (
        f"inference-proxy: cannot listen on 127.0.0.1:{port}: "
        "the address is already in use (another process listens there)"
    )
    assert expected in result.stderr.splitlines()


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


def health_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_all(sock, within_s=5).startswith(b"HTTP/1.1 200")


def test_sighup_never_kills_a_serving_gateway(sim_process, tmp_path: Path) -> None:
    """SIGHUP reloads a good file and logs every error of a bad one; the gateway keeps
    serving either way."""
    config = tmp_path / "proxy.yaml"
    config.write_text(f"backends:\n  gpu: {{url: '{sim_process}'}}\n")
    gw = Running("--config", str(config))
    try:
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert gw.proc.poll() is None
        assert health_ok(gw.port)
        config.write_text("server: {prot: 1}\n")
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert health_ok(gw.port)
        gw.proc.send_signal(signal.SIGTERM)
        status, stderr = gw.finish()
        assert 0 == status
        assert f"reload: {config} is in force (no model or backend changed)" in stderr
        assert f"reload: {config}: server.prot: unknown key" in stderr
        assert "the previous config still serves" in stderr
    finally:
        gw.stop()
