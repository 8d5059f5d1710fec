"""`make run`: the simulated backend and the gateway in front of it, until Ctrl-C.

Starts both as child processes, waits until each answers, prints a curl line and an
OpenAI SDK snippet that work as printed, and stops both (by PID) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

MODEL = "sim-model"


def wait_healthy(url: str, proc: subprocess.Popen[bytes], within_s: float = 30.0) -> None:
    """Poll `url` until it answers 200, or fail if the process died or time ran out."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310  (our own loopback URL)
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not become healthy within {within_s:.0f} s")


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
    backend = subprocess.Popen(
        [
            python,
            "-m",
            "bench.simbackend",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.backend_port),
            "--model",
            MODEL,
            "--ttft-ms",
            "150",
            "--tokens-per-s",
            "30",
        ],
    )
    children = [backend]
    try:
        wait_healthy(f"http://127.0.0.1:{args.backend_port}/health", backend)
        gateway = subprocess.Popen(
            [
                python,
                "-m",
                "proxy",
                "--backend",
                f"http://127.0.0.1:{args.backend_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.port),
            ],
        )
        children.append(gateway)
        wait_healthy(f"http://127.0.0.1:{args.port}/health", gateway)
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


if __name__ == "__main__":
    sys.exit(main())
