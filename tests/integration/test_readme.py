"""The README's and `make run`'s examples work as printed."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_cli import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo():
    """`make run`'s launcher on free ports; yields its port and the banner it printed."""
    port, backend_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.demo",
            "--port",
            str(port),
            "--backend-port",
            str(backend_port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "the launcher exited before printing its banner"
        lines.append(line)
        if line.startswith("Metrics:"):
            break
    yield port, "".join(lines)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert 0 == proc.returncode


def run_shell(command: str) -> str:
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_make_run_banner_examples_work_as_printed(demo) -> None:
    """The curl line and SDK snippet `make run` prints stream tokens when pasted."""
    _port, banner = demo
    curl = re.search(r"(  curl .*?)\n\n", banner, flags=re.DOTALL)
    assert curl is not None
    out = run_shell(curl.group(1))
    assert "data: [DONE]" in out
    snippet = banner.split("(.venv/bin/python):\n\n", 1)[1].split("\n\nMetrics:")[0]
    code = "\n".join(line[2:] for line in snippet.splitlines())
    assert len(run_python(code).strip()) > 0


def test_readme_quick_start_examples(demo) -> None:
    """The README's curl and Python examples run against the gateway `make run` starts."""
    port, _ = demo
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    curl = [b for b in blocks(quick, "sh") if b.startswith("curl")]
    python = blocks(quick, "python")
    assert curl and python
    out = run_shell(curl[0].replace("8000", str(port)))
    assert out.rstrip().endswith("data: [DONE]")
    assert run_python(python[0].replace("8000", str(port))).strip()


def test_make_run_on_a_taken_port_prints_no_banner() -> None:
    """When another process holds the port, `make run`'s launcher says so and exits 1, with
    no banner: the other process's answers never count as its own gateway's."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable, "-m", "bench.demo",
                "--port", str(port), "--backend-port", str(free_port()),
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert 1 == result.returncode
    assert "inference-proxy is running" not in result.stdout
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_workers_example_passes_check(tmp_path: Path) -> None:
    """The Workers section's YAML, with a backend added, is a valid config."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Workers: every core on one port", 1)[1]
    example = blocks(section, "yaml")[0]
    config = tmp_path / "proxy.yaml"
    config.write_text(example + "backends:\n  gpu: {url: 'http://127.0.0.1:9'}\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(config), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (0, "config ok\n") == (result.returncode, result.stdout)
