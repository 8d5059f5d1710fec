"""The README's "Managed keys" examples run as printed (the config, the CLI, the admin API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.test_cli import free_port
from tests.integration.test_operations import accepts
from tests.integration.test_readme import blocks

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "readme-admin-key-" + "z" * 20


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Managed keys\n", 1)[1].split("\n## ", 1)[0]


def setup(tmp_path: Path, port: int) -> Path:
    """The section's YAML with a backend and a port, its store moved into tmp_path."""
    (yaml,) = blocks(section(), "yaml")
    yaml = yaml.replace("/var/lib/inference-proxy/keys.db", str(tmp_path / "keys.db"))
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"server: {{port: {port}}}\nbackends: {{gpu: {{url: 'http://127.0.0.1:9'}}}}\n" + yaml
    )
    return config


def run_lines(block: str, tmp_path: Path, port: int) -> list[str]:
    """Each command of a bash block, as printed but for the program, config and port."""
    commands = block.replace("\\\n", "").strip().splitlines()
    outputs = []
    for command in commands:
        command = command.replace("inference-proxy ", f"{sys.executable} -m proxy ")
        command = command.replace("proxy.yaml", str(tmp_path / "proxy.yaml"))
        command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "ADMIN_KEY": ADMIN_KEY},
        )
        assert 0 == result.returncode, (command, result.stderr)
        outputs.append(result.stdout)
    return outputs


def test_readme_managed_keys_examples(tmp_path: Path) -> None:
    """The CLI lines make, list, revoke and report; the curl lines do the same over the admin
    API of a gateway running with the section's config."""
    port = free_port()
    setup(tmp_path, port)
    cli, admin = blocks(section(), "bash")
    made, as_json, listed, _revoked, usage = run_lines(cli, tmp_path, port)
    assert made.startswith("ipk_")
    assert "team-b" == json.loads(as_json)["name"]
    assert ["NAME", "team-a", "team-b"] == [line.split()[0] for line in listed.splitlines()]
    assert "KEY" in usage
    gateway = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(tmp_path / "proxy.yaml")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "ADMIN_KEY": ADMIN_KEY},
    )
    try:
        deadline = time.monotonic() + 30
        while not accepts(port):
            assert gateway.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        created, listing, revoked, report = run_lines(admin, tmp_path, port)
        assert json.loads(created)["key"].startswith("ipk_")
        assert ["team-a", "team-b", "team-c"] == [k["name"] for k in json.loads(listing)["keys"]]
        assert json.loads(revoked)["revoked"] is not None
        assert [] == json.loads(report)["usage"]
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
