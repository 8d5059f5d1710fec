"""Run wrk with bench/wrk_post.lua (POST bodies) and read the JSON line its script prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench.processes import pinned

SCRIPT = Path(__file__).with_name("wrk_post.lua")
MARK = "WRK_JSON "


def run_wrk(
    url: str, body: bytes, *, connections: int, duration_s: float, cpu: int | None
) -> dict[str, Any]:
    """One wrk run; requests/s, latency percentiles in ms and error counts."""
    binary = shutil.which("wrk")
    if binary is None:
        raise FileNotFoundError("wrk is not installed: run bench/ensure_tools.sh")
    argv = [
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(SCRIPT),
        url,
    ]
    # From a file: a body past 128 KiB does not fit in one environment string.
    with tempfile.NamedTemporaryFile(prefix="wrk-body-", suffix=".json") as body_file:
        body_file.write(body)
        body_file.flush()
        done = subprocess.run(
            pinned(argv, cpu),
            capture_output=True,
            text=True,
            env={**os.environ, "WRK_BODY_FILE": body_file.name},
            timeout=duration_s + 30,
            check=False,
        )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary (exit {done.returncode}): {done.stderr[-500:]}")
    raw = orjson.loads(line[len(MARK) :])
    seconds = raw["duration_us"] / 1e6
    errors = raw["errors"]
    return {
        "requests": raw["requests"],
        "window_s": round(seconds, 3),
        "requests_per_s": round(raw["requests"] / seconds, 1) if seconds else 0.0,
        "latency_ms": {k: round(v / 1000.0, 3) for k, v in raw["latency_us"].items()},
        "errors": sum(errors.values()),
        "error_kinds": {k: v for k, v in errors.items() if v},
    }
