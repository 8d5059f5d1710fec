"""Several workers with a sticky `affinity` index: each keeps its own, so the gateway says so
(`agreed` placement, which `auto` picks for `server.workers` above 1, needs no warning)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from proxy.app import create_app
from proxy.config import load_config
from proxy.workermetrics import RUN_DIR_ENV, WORKER_ENV, WORKERS_ENV

FLEET = """
backends:
  a: {url: 'http://127.0.0.1:1'}
  b: {url: 'http://127.0.0.1:2'}
models:
  m: {policy: affinity, targets: [{backend: a}, {backend: b}]}
"""


@pytest.mark.parametrize(
    ("extra", "workers", "warned"),
    [
        ("", "2", True),
        ("", "1", False),
        ("routing: {prefix_index_size: 0}\n", "2", False),
        ("routing: {key_placement: sticky}\n", "2", True),
        ("routing: {key_placement: agreed}\n", "2", False),
        ("server: {workers: 2}\n", "2", False),
    ],
)
def test_a_worker_of_several_warns_that_its_index_is_its_own(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, extra: str, workers: str, warned: bool
) -> None:
    config = load_config(FLEET + extra)
    with caplog.at_level(logging.WARNING, logger="proxy"):
        create_app(config, environ=_worker_env(workers, tmp_path))
    said = [r.getMessage() for r in caplog.records if "affinity index" in r.getMessage()]
    assert bool(said) is warned
    if warned:
        assert said[0].startswith("routing: 2 workers each keep their own sticky affinity index")
        assert "routing.key_placement: agreed" in said[0]


def test_no_affinity_model_no_warning(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    config = load_config(FLEET.replace("policy: affinity", "policy: least_loaded"))
    with caplog.at_level(logging.WARNING, logger="proxy"):
        create_app(config, environ=_worker_env("4", tmp_path))
    assert not [r for r in caplog.records if "affinity index" in r.getMessage()]


def _worker_env(workers: str, run_dir: Path) -> dict[str, str]:
    """What the supervisor gives its first worker."""
    return {WORKER_ENV: "0", WORKERS_ENV: workers, RUN_DIR_ENV: str(run_dir)}
