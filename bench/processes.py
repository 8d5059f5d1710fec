"""Start the benchmark's processes pinned to a CPU, wait until they serve, stop them by PID."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class StartError(RuntimeError):
    """A process under test did not come up (its log tail is in the message)."""


@dataclass
class Service:
    """A process we started: its name, URL, PID and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """`argv` run under `taskset -c CPU` (taskset execs, so the PID stays the command's)."""
    if cpu is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


def start(
    name: str,
    argv: list[str],
    *,
    port: int,
    cpu: int | None,
    log_dir: Path,
    health_path: str = "/health",
    timeout_s: float = 20.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Service:
    """Start `argv` pinned to `cpu`, logging to `log_dir/name.log`; return once it answers 2xx."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            pinned(argv, cpu),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
    service = Service(name, popen, "127.0.0.1", port, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise StartError(f"{name} exited with {popen.returncode}:\n{service.log_tail()}")
        if http_status(service.host, port, health_path) // 100 == 2:
            return service
        time.sleep(0.05)
    stop(service)
    raise StartError(
        f"{name} did not answer {health_path} in {timeout_s:.0f} s:\n{service.log_tail()}"
    )


def http_status(host: str, port: int, path: str, timeout_s: float = 1.0) -> int:
    """The status of GET `path`, or 0 when nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def http_get(host: str, port: int, path: str, timeout_s: float = 2.0) -> bytes:
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def stop(service: Service, timeout_s: float = 10.0) -> None:
    """SIGTERM the service's own PID, then SIGKILL it if it has not exited in time."""
    popen = service.popen
    if popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=5)
