"""pytest fixtures for the real llama-server: `llama_server` (chat) and `llama_embed_server` (embeddings).

Load with `pytest_plugins = ["tests.real_backend.fixtures"]` in tests/conftest.py. Each fixture starts its
server once per session, on a free port of 127.0.0.1, and stops that PID at the end.

When `make real-backend` has not run, a test that uses them FAILS, so that CI cannot pass by skipping.
Only a developer who sets INFERENCE_PROXY_SKIP_REAL_BACKEND=1 (and is not under CI=... or
INFERENCE_PROXY_REQUIRE_REAL_BACKEND=...) gets them skipped instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.real_backend.server import (
    RealBackendMissing,
    RealBackendStartError,
    RealServer,
    backend_dir,
    find_backend,
    start_llama_server,
)

_FALSY = {"", "0", "false", "no", "off"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in _FALSY


def real_backend_required() -> bool:
    """CI and INFERENCE_PROXY_REQUIRE_REAL_BACKEND forbid skipping."""
    return _env_flag("CI") or _env_flag("INFERENCE_PROXY_REQUIRE_REAL_BACKEND")


def real_backend_skipped() -> bool:
    """The developer's explicit switch; never honoured where the real backend is required."""
    return (
        not real_backend_required() and os.environ.get("INFERENCE_PROXY_SKIP_REAL_BACKEND") == "1"
    )


def _start(tmp_path_factory: pytest.TempPathFactory, *, embeddings: bool) -> RealServer:
    if real_backend_skipped():
        pytest.skip(
            "INFERENCE_PROXY_SKIP_REAL_BACKEND=1: real llama-server tests skipped on purpose"
        )
    try:
        find_backend()
    except RealBackendMissing as exc:
        pytest.fail(
            f"the real llama-server is not built ({exc}). Run `make real-backend` "
            f"(tests/real_backend/build.sh; it builds into {backend_dir()}). "
            "To skip these tests on a developer machine on purpose, set "
            "INFERENCE_PROXY_SKIP_REAL_BACKEND=1 (ignored under CI).",
            pytrace=False,
        )
    log_dir = tmp_path_factory.mktemp("llama-server")
    try:
        return start_llama_server(embeddings=embeddings, log_dir=log_dir)
    except RealBackendStartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """A real llama-server (chat instance: -c 4096 -np 2, gemma template, --metrics) for the session."""
    server = _start(tmp_path_factory, embeddings=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama_embed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """A second real llama-server with --embeddings --pooling mean (OpenAI /v1/embeddings)."""
    server = _start(tmp_path_factory, embeddings=True)
    try:
        yield server
    finally:
        server.stop()
