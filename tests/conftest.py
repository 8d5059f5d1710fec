"""Fixtures: fake upstreams and gateways on 127.0.0.1, torn down after each test."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from aiohttp.test_utils import TestServer

from proxy.app import Serving, create_app, serve_app
from proxy.config import Config, load_config
from proxy.state import LIVE, GatewayState
from tests.fakes import FakeUpstream

pytest_plugins = ["tests.real_backend.fixtures", "tests.redis_fixture"]


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    """Tests run on uvloop, as the gateway does in production."""
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class Upstream:
    fake: FakeUpstream
    url: str

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fake, name)


@dataclass
class Gateway:
    url: str
    state: GatewayState
    serving: Serving
    access_log: io.BytesIO

    def access_lines(self) -> list[bytes]:
        """The access-log lines written so far (what the gateway still holds is written first)."""
        self.state.access_log.flush()
        return self.access_log.getvalue().splitlines()


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[[], Coroutine[Any, Any, Upstream]]]:
    servers: list[TestServer] = []

    async def make() -> Upstream:
        fake = FakeUpstream()
        server = TestServer(fake.app(), host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return Upstream(fake, f"http://127.0.0.1:{server.port}")

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def upstream(upstream_factory: Callable[[], Coroutine[Any, Any, Upstream]]) -> Upstream:
    return await upstream_factory()


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Callable[..., Coroutine[Any, Any, Gateway]]]:
    started: list[Gateway] = []

    async def make(config: Config | str, env: dict[str, str] | None = None) -> Gateway:
        if isinstance(config, str):
            config = load_config(config)
        log = io.BytesIO()
        app = create_app(config, env or {}, access_log=log)
        serving = await serve_app(app, config, "127.0.0.1", 0)
        port = serving.addresses[0][1]
        gateway = Gateway(f"http://127.0.0.1:{port}", app[LIVE].state, serving, log)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.serving.close(gateway.state.config.server.drain_s)


MLFLOW_KEY = "sk-mlflow"


@pytest.fixture
def mlflow_env(monkeypatch):
    """The client's key from MLFLOW_TRACKING_TOKEN (sent as Bearer), no retries, no other
    MLflow or Databricks settings leaking in from the environment."""
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "DATABRICKS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", MLFLOW_KEY)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def one_backend(url: str, *, models: str = "", extra: str = "") -> str:
    """A config text with one backend 'gpu' at `url`, optional models and extra sections."""
    return f"backends:\n  gpu: {{url: '{url}', kind: vllm}}\n{models}{extra}"


@pytest.fixture
async def gateway(
    upstream: Upstream, gateway_factory: Callable[..., Coroutine[Any, Any, Gateway]]
) -> Gateway:
    """A gateway with no models section in front of the fake upstream."""
    return await gateway_factory(one_backend(upstream.url))


async def wait_for(predicate: Callable[[], bool], within_s: float = 3.0) -> float:
    """Poll until `predicate()` holds; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < within_s, "condition not met in time"
        await asyncio.sleep(0.002)
    return time.monotonic() - start
