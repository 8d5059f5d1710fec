"""A real Prometheus (Debian's `prometheus` package) on a free 127.0.0.1 port.

It scrapes the targets it is given every second, evaluates its rule files every second, keeps
its data in a directory of its own and is killed by its PID. `make test` installs the package
when it is missing; the service apt may start is stopped there and never used.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

JOB = "inference-proxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str:
    """The path of `prometheus` or `promtool`, or the test fails saying how to get it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: `make test` installs it (apt-get install prometheus)",
            pytrace=False,
        )
    return found


def config_text(targets: list[str], rule_files: list[Path]) -> str:
    """prometheus.yml: a 1 s scrape of `targets` as job inference-proxy, the rules every 1 s."""
    return json.dumps(
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }
    )  # JSON is YAML


class Prometheus:
    """One prometheus process (started here; `await ready()` before use); `query()` and
    `get()` read its HTTP API."""

    def __init__(self, directory: Path, targets: list[str], rule_files: list[Path]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(config_text(targets, rule_files))
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    async def get(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        """The `data` of a successful API answer (an error answer fails the test)."""
        async with session.get(self.url + path, params=params) as r:
            answer = await r.json()
        assert "success" == answer["status"], answer
        return answer["data"]

    async def query(self, session: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        """An instant query's result now (a vector's samples)."""
        return list((await self.get(session, "/api/v1/query", query=expr))["result"])

    async def ready(self, session: aiohttp.ClientSession, within_s: float = 20) -> None:
        """Wait until it answers /-/ready (it has read its config and rules)."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                async with session.get(self.url + "/-/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
