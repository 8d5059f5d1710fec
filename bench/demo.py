"""`make run`: the simulated backend and the gateway in front of it, until Ctrl-C.

Starts both as child processes, waits until each serves, prints a curl line and an
OpenAI SDK snippet that work as printed, and stops both (by PID) on Ctrl-C or SIGTERM.
The gateway is known to serve when it says `READY=1` on the notify socket this launcher
hands it (systemd's protocol), so another process answering on a taken port never counts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "sim-model"


def wait_listening(proc: subprocess.Popen[bytes]) -> None:
    """The simulated backend's first line says it listens; it exits at once when it cannot."""
    assert proc.stdout is not None
    line = proc.stdout.readline().decode(errors="replace")
    if "listening" not in line:
        proc.wait(timeout=10)
        raise SystemExit(f"the simulated backend exited with status {proc.returncode}")


def wait_ready(
    notify: socket.socket, proc: subprocess.Popen[bytes], within_s: float = 30.0
) -> None:
    """Wait for the child's `READY=1` datagram, or fail if it exited or time ran out."""
    deadline = time.monotonic() + within_s
    notify.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return
        except TimeoutError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with status {proc.returncode}")
    raise SystemExit(f"the gateway did not say it was ready within {within_s:.0f} s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def banner(port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
inference-proxy is running on {base}, in front of a simulated backend serving '{MODEL}'.

Try it with curl:

  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{MODEL}", "stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'

or with the OpenAI SDK (.venv/bin/python):

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="unused")
  for chunk in client.chat.completions.create(
      model="{MODEL}", messages=[{{"role": "user", "content": "Hi"}}], stream=True
  ):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

Metrics: {base}/metrics    Stop: Ctrl-C
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Run the gateway in front of the simulated backend"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backend-port", type=int, default=8001)
    args = parser.parse_args()
    python = sys.executable
    children: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="inference-proxy-run-"))
        notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        address = str(Path(scratch) / "notify")
        notify.bind(address)
        try:
            backend = subprocess.Popen(
                [
                    python, "-m", "bench.simbackend", "--host", "127.0.0.1",
                    "--port", str(args.backend_port), "--model", MODEL,
                    "--ttft-ms", "150", "--tokens-per-s", "30",
                ],
                stdout=subprocess.PIPE,
            )  # fmt: skip
            children.append(backend)
            wait_listening(backend)
            gateway = subprocess.Popen(
                [
                    python, "-m", "proxy", "--backend", f"http://127.0.0.1:{args.backend_port}",
                    "--host", "127.0.0.1", "--port", str(args.port),
                ],
                env={**os.environ, "NOTIFY_SOCKET": address},
            )  # fmt: skip
            children.append(gateway)
            wait_ready(notify, gateway)
            print(banner(args.port), flush=True)
            signal.signal(signal.SIGTERM, _interrupt)
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(child.pid, signal.SIGKILL)
    raise AssertionError("unreachable")  # the block above returns or raises


if __name__ == "__main__":
    sys.exit(main())
