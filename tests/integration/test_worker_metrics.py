"""`/metrics` across workers: gateways started as workers of one run directory, each scraped
after known traffic, with peers that answer, are gone, hang or talk garbage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.workermetrics import WORKER_METRICS
from tests.conftest import one_backend, wait_for

MODELS = "models:\n  m: {targets: [{backend: gpu}]}\n"
ROUTE = (("model", "m"), ("route", "/v1/chat/completions"))
REQUESTS = (("backend", "gpu"), *ROUTE, ("status", "200"))

README = Path(__file__).resolve().parents[2] / "README.md"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def run_dir() -> Iterator[str]:
    """A private run directory with a short path (a unix socket path has at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="ipm-", dir="/tmp")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def worker_env(index: int, count: int, run_dir: str) -> dict[str, str]:
    return {
        "INFERENCE_PROXY_WORKER": str(index),
        "INFERENCE_PROXY_WORKERS": str(count),
        "INFERENCE_PROXY_RUN_DIR": run_dir,
    }


async def chat(session: aiohttp.ClientSession, url: str, times: int) -> None:
    for _ in range(times):
        async with session.post(url + "/v1/chat/completions", data=b'{"model": "m"}') as r:
            assert 200 == r.status
            await r.read()


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[Samples, float]:
    """The parsed scrape and the seconds it took."""
    start = time.monotonic()
    async with session.get(url + "/metrics") as r:
        assert 200 == r.status
        text = await r.text()
    return parse(text), time.monotonic() - start


async def test_totals_of_two_workers_on_either(gateway_factory, upstream, run_dir) -> None:
    """7 requests to worker 0 and 5 to worker 1 read as 12 on either worker's /metrics, with
    histograms summed bucket by bucket and per-worker series for probes and processes."""
    config = one_backend(upstream.url, models=MODELS)
    workers = [await gateway_factory(config, worker_env(i, 2, run_dir)) for i in range(2)]
    async with aiohttp.ClientSession() as s:
        await chat(s, workers[0].url, 7)
        await chat(s, workers[1].url, 5)
        alone = [parse(w.state.metrics.render().decode()) for w in workers]
        scrapes = [(await scrape(s, w.url))[0] for w in workers]
    buckets = [k for k in alone[0] if k[0] == "proxy_request_duration_seconds_bucket"]
    assert len(buckets) > 10
    for got in scrapes:
        assert 12 == got["proxy_requests_total", REQUESTS]
        assert 12 == got["proxy_request_duration_seconds_count", ROUTE]
        for key in buckets:
            assert alone[0][key] + alone[1][key] == got[key]
        assert 12 * 5 == got["proxy_tokens_total", (("kind", "prompt"), ("model", "m"))]
        assert 0 == got["proxy_in_flight_requests", (("backend", "gpu"),)]
        for worker in ("0", "1"):
            assert got["proxy_backend_up", (("backend", "gpu"), ("worker", worker))] in (0, 1)
            assert got["process_resident_memory_bytes", (("worker", worker),)] > 0
            assert got["process_open_fds", (("worker", worker),)] > 0
        assert ("process_open_fds", ()) not in got
        assert ("proxy_backend_up", (("backend", "gpu"),)) not in got
        assert 2 == got["proxy_workers", ()]
        assert 2 == got["proxy_workers_answered", ()]


async def test_metrics_socket_is_private_and_removed(gateway_factory, upstream, run_dir) -> None:
    """Each worker's socket has mode 0600 while it serves and is gone once it stops."""
    gw = await gateway_factory(one_backend(upstream.url), worker_env(0, 1, run_dir))
    path = os.path.join(run_dir, "worker-0.sock")
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert 0o600 == stat.S_IMODE(mode)
    await gw.serving.close(0)
    assert [] == os.listdir(run_dir)


async def test_totals_hold_while_a_worker_restarts(gateway_factory, upstream, run_dir) -> None:
    """Worker 1's 5 requests stay in the total while it is gone and once a new process has
    taken its place, so Prometheus never sees the counter fall (and reads no reset)."""
    config = one_backend(upstream.url, models=MODELS)
    w0 = await gateway_factory(config, worker_env(0, 2, run_dir))
    w1 = await gateway_factory(config, worker_env(1, 2, run_dir))
    async with aiohttp.ClientSession() as s:
        await chat(s, w0.url, 7)
        await chat(s, w1.url, 5)
        before, _ = await scrape(s, w0.url)
        await w1.serving.close(0)
        gone, _ = await scrape(s, w0.url)
        again = await gateway_factory(config, worker_env(1, 2, run_dir))
        await chat(s, again.url, 3)
        after, _ = await scrape(s, again.url)
    assert 12 == before["proxy_requests_total", REQUESTS]
    assert (12, 1) == (gone["proxy_requests_total", REQUESTS], gone["proxy_workers_answered", ()])
    assert 12 == gone["proxy_request_duration_seconds_count", ROUTE]
    assert ("proxy_backend_up", (("backend", "gpu"), ("worker", "1"))) not in gone
    assert 15 == after["proxy_requests_total", REQUESTS]
    assert 2 == after["proxy_workers_answered", ()]
    assert 0o600 == stat.S_IMODE(os.stat(os.path.join(run_dir, "metrics-ledger")).st_mode)


def stale_socket(path: str) -> None:
    """A socket file nobody listens on, as a worker killed with SIGKILL leaves behind."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)


@pytest.mark.parametrize("peer", ["absent", "stale"])
async def test_a_peer_that_is_down_is_counted_missing(
    gateway_factory, upstream, run_dir, peer
) -> None:
    """With worker 1 gone (no socket, or a stale one), worker 0 answers at once with its own
    tallies and says 1 of 2 workers answered."""
    if peer == "stale":
        stale_socket(os.path.join(run_dir, "worker-1.sock"))
    gw = await gateway_factory(one_backend(upstream.url, models=MODELS), worker_env(0, 2, run_dir))
    async with aiohttp.ClientSession() as s:
        await chat(s, gw.url, 7)
        got, took = await scrape(s, gw.url)
    assert took < 1.0
    assert 7 == got["proxy_requests_total", REQUESTS]
    assert 2 == got["proxy_workers", ()]
    assert 1 == got["proxy_workers_answered", ()]


async def test_a_worker_replaces_its_stale_socket(gateway_factory, upstream, run_dir) -> None:
    """A worker restarted after a kill takes over the socket file its predecessor left."""
    stale_socket(os.path.join(run_dir, "worker-1.sock"))
    config = one_backend(upstream.url)
    w0 = await gateway_factory(config, worker_env(0, 2, run_dir))
    await gateway_factory(config, worker_env(1, 2, run_dir))
    async with aiohttp.ClientSession() as s:
        got, _ = await scrape(s, w0.url)
    assert 2 == got["proxy_workers_answered", ()]


@contextlib.asynccontextmanager
async def fake_peer(path: str, answer: bytes | None) -> AsyncIterator[None]:
    """A socket at `path` that sends `answer`, or (None) accepts and never answers."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if answer is None:
            await done.wait()
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path)
    try:
        yield
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_a_hung_peer_costs_the_budget_only(
    gateway_factory, upstream, run_dir, caplog
) -> None:
    """A peer that accepts and never answers is given up after the scrape's budget."""
    gw = await gateway_factory(one_backend(upstream.url, models=MODELS), worker_env(0, 2, run_dir))
    gw.serving.runner.app[WORKER_METRICS].budget_s = 0.3
    async with fake_peer(os.path.join(run_dir, "worker-1.sock"), None):
        async with aiohttp.ClientSession() as s:
            await chat(s, gw.url, 3)
            got, took = await scrape(s, gw.url)
    assert 0.3 <= took < 1.5
    assert 3 == got["proxy_requests_total", REQUESTS]
    assert 1 == got["proxy_workers_answered", ()]
    assert "worker 1: no metrics snapshot within 0.3 s" in caplog.text


@pytest.mark.parametrize(
    "answer",
    [b"garbage", b"", msgspec.msgpack.encode([1, [["bad name", "gauge", "h", []]]])],
    ids=["garbage", "empty", "bad-name"],
)
async def test_a_garbage_peer_is_ignored_with_a_log_line(
    gateway_factory, upstream, run_dir, caplog, answer
) -> None:
    """A peer answering something that is not a snapshot is left out and logged; the scrape
    is still a 200 with the other workers' totals."""
    gw = await gateway_factory(one_backend(upstream.url, models=MODELS), worker_env(0, 3, run_dir))
    second = await gateway_factory(
        one_backend(upstream.url, models=MODELS), worker_env(2, 3, run_dir)
    )
    with caplog.at_level(logging.WARNING, logger="proxy.workermetrics"):
        async with fake_peer(os.path.join(run_dir, "worker-1.sock"), answer):
            async with aiohttp.ClientSession() as s:
                await chat(s, gw.url, 2)
                await chat(s, second.url, 4)
                got, _ = await scrape(s, gw.url)
    assert 6 == got["proxy_requests_total", REQUESTS]
    assert 3 == got["proxy_workers", ()]
    assert 2 == got["proxy_workers_answered", ()]
    assert "worker 1 sent a metrics snapshot that is not one" in caplog.text


async def test_one_process_renders_as_before(gateway, run_dir) -> None:
    """Without the worker variables nothing listens and /metrics has no worker series."""
    async with aiohttp.ClientSession() as s:
        got, _ = await scrape(s, gateway.url)
    assert ("proxy_workers", ()) not in got
    assert ("process_open_fds", ()) in got
    assert WORKER_METRICS not in gateway.serving.runner.app


async def test_readme_example_is_what_two_workers_say(gateway_factory, upstream, run_dir) -> None:
    """The README's example scrape: the same series after its traffic, the same values but
    for the process's own figures."""
    section = README.read_text().split("### Metrics across workers", 1)[1]
    example = parse(section.split("```text\n", 1)[1].split("```", 1)[0])
    config = one_backend(upstream.url, models=MODELS)
    workers = [await gateway_factory(config, worker_env(i, 2, run_dir)) for i in range(2)]
    for w in workers:
        await wait_for(lambda w=w: all(w.state.healthy(asyncio.get_running_loop().time()).values()))
    async with aiohttp.ClientSession() as s:
        await chat(s, workers[0].url, 7)
        await chat(s, workers[1].url, 5)
        got, _ = await scrape(s, workers[1].url)
    assert example.keys() <= got.keys()
    for key, value in example.items():
        if not key[0].startswith("process_"):
            assert value == got[key], key
