"""Start and stop the real llama-server that tests/real_backend/build.sh built, on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
MODEL_ALIAS = "gemma-3-270m"
HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 60.0

# The flags of REFERENCE-real-backend.md §1b. `--no-jinja --chat-template gemma` picks the built-in gemma
# template: with Jinja on, "gemma" would be taken as a literal template (the GGUF ships none).
CHAT_ARGS: tuple[str, ...] = ("-c", "4096", "-np", "2", "-t", "2", "--metrics", "-a", MODEL_ALIAS)
CHAT_ARGS += ("--no-jinja", "--chat-template", "gemma")
EMBED_ARGS = ("-c", "2048", "-t", "2", "--embeddings", "--pooling", "mean", "-a", MODEL_ALIAS)


class RealBackendMissing(RuntimeError):
    """build.sh has not completed here (no READY stamp, or it points at nothing)."""


class RealBackendStartError(RuntimeError):
    """llama-server exited or did not answer GET /health with 200 in time."""


def backend_dir() -> Path:
    """Where build.sh put the venv, the model and the READY stamp."""
    override = os.environ.get("INFERENCE_PROXY_REAL_BACKEND_DIR")
    return Path(override) if override else REPO_ROOT / ".cache" / "real-backend"


def find_backend() -> tuple[Path, Path]:
    """(llama-server binary, model) as recorded by build.sh; RealBackendMissing if not built."""
    stamp = backend_dir() / "READY"
    if not stamp.is_file():
        raise RealBackendMissing(f"{stamp} does not exist")
    lines = stamp.read_text(encoding="utf-8").splitlines()
    binary = Path(lines[0].strip()) if lines else Path()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise RealBackendMissing(f"{stamp} names {binary}, which is not an executable file")
    model = backend_dir() / MODEL_NAME
    if not model.is_file():
        raise RealBackendMissing(f"{model} does not exist")
    return binary, model


@dataclass
class RealServer:
    """One llama-server process that this test run started."""

    url: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    _log_file: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM this PID (SIGKILL after `timeout`), wait for it, return its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""


def free_port() -> int:
    """A port the kernel says is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _health_status(port: int) -> int | None:
    """GET /health; the status, or None if nothing answers. http.client: no proxy variables apply."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


def _server_env() -> dict[str, str]:
    # llama-server reads LLAMA_ARG_* as defaults for its flags: keep a developer's shell out of the tests.
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}


def _launch(
    binary: Path, model: Path, port: int, args: tuple[str, ...], log_path: Path
) -> RealServer:
    log_file = log_path.open("wb")
    cmd = [str(binary), "-m", str(model), "--host", HOST, "--port", str(port), *args]
    try:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_server_env(),
        )
    except OSError:
        log_file.close()
        raise
    return RealServer(f"http://{HOST}:{port}", port, log_path, process, log_file)


def _wait_healthy(server: RealServer, deadline: float) -> bool:
    """True once /health is 200 (it is 503 while the model loads); False if the process exits."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        if _health_status(server.port) == 200:
            return True
        time.sleep(0.1)
    return False


def start_llama_server(
    port: int | None = None,
    *,
    embeddings: bool = False,
    extra_args: tuple[str, ...] = (),
    log_dir: Path | None = None,
    health_timeout: float = HEALTH_TIMEOUT_S,
) -> RealServer:
    """Start llama-server on 127.0.0.1 and wait (bounded) for GET /health == 200.

    With port=None a free port is picked, and picked again if the server could not bind it.
    embeddings=True starts the `--embeddings --pooling mean` variant (its own process).
    Raises RealBackendMissing if build.sh has not run, RealBackendStartError if it does not come up.
    """
    binary, model = find_backend()
    args = (*(EMBED_ARGS if embeddings else CHAT_ARGS), *extra_args)
    log_root = log_dir or Path(tempfile.gettempdir())
    attempts = 1 if port is not None else 3
    failures: list[str] = []
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        kind = "embed" if embeddings else "chat"
        log_path = log_root / f"llama-server-{kind}-{chosen}.log"
        server = _launch(binary, model, chosen, args, log_path)
        if _wait_healthy(server, time.monotonic() + health_timeout):
            return server
        exited = server.process.poll() is not None
        code = server.stop()
        if exited:
            failures.append(
                f"port {chosen}: exited with {code}; log {log_path}:\n{server.log_tail()}"
            )
            continue  # e.g. the port was taken meanwhile: try another
        failures.append(
            f"port {chosen}: no GET /health 200 within {health_timeout:.0f}s; "
            f"log {log_path}:\n{server.log_tail()}"
        )
        break
    raise RealBackendStartError(
        f"llama-server ({binary}) did not become healthy:\n" + "\n---\n".join(failures)
    )
