"""`/metrics` across workers: each worker serves its snapshot on a unix socket, and the one a
scrape lands on gathers its peers' and merges them (`proxy/metrics_merge.py`).

The supervisor of `server.workers: N` starts each worker with $INFERENCE_PROXY_WORKER (its
index), $INFERENCE_PROXY_WORKERS (N) and $INFERENCE_PROXY_RUN_DIR (a directory only the
gateway's user can enter). Worker i listens on `{run dir}/worker-{i}.sock` (mode 0600): a peer
connects, reads the snapshot to the end of the stream, and that is the whole protocol. Without
those variables none of this exists and `/metrics` renders the process's own tallies, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import msgspec
from aiohttp import web

from proxy import metrics_ledger, metrics_merge
from proxy.exposition import render
from proxy.metrics import Metrics
from proxy.metrics_ledger import Ledger
from proxy.metrics_merge import Snapshot

logger = logging.getLogger("proxy.workermetrics")

# What the supervisor tells each worker (proxy/supervisor.py).
WORKER_ENV = "INFERENCE_PROXY_WORKER"  # the worker's index, 0-based
WORKERS_ENV = "INFERENCE_PROXY_WORKERS"  # how many there are
RUN_DIR_ENV = "INFERENCE_PROXY_RUN_DIR"  # a directory private to the gateway's processes

# The whole scrape waits this long for its peers; a worker being restarted must not hang it.
PEER_BUDGET_S = 2.0
# A snapshot larger than this is not a snapshot (100 models with traffic make 140 KB).
MAX_SNAPSHOT_BYTES = 64 * 2**20

# The ledger of every worker's last counts (proxy/metrics_ledger.py), in the run directory.
LEDGER = "metrics-ledger"
# How long a scrape waits for another's hold on the ledger, at least (it takes milliseconds).
MIN_LEDGER_WAIT_S = 0.2

CleanupCtx = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class Worker:
    """Where this worker stands among its peers."""

    index: int
    count: int
    run_dir: str

    def socket_path(self, index: int) -> str:
        return os.path.join(self.run_dir, f"worker-{index}.sock")

    @property
    def peers(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


def worker_from_env(environ: Mapping[str, str]) -> Worker | None:
    """The worker the supervisor started, or None when the gateway runs as one process.

    Raises ValueError when the variables are there but do not make sense together.
    """
    index, count, run_dir = (environ.get(k) for k in (WORKER_ENV, WORKERS_ENV, RUN_DIR_ENV))
    if index is None and count is None and run_dir is None:
        return None
    if index is None or count is None or not run_dir:
        raise ValueError(f"${WORKER_ENV}, ${WORKERS_ENV} and ${RUN_DIR_ENV} go together")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"${WORKER_ENV}={index!r} is not an index below ${WORKERS_ENV}={count!r}")
    return Worker(int(index), int(count), run_dir)


class WorkerMetrics:
    """This worker's metrics socket, and the scrape that merges its peers' snapshots."""

    def __init__(self, worker: Worker, metrics: Metrics, budget_s: float = PEER_BUDGET_S) -> None:
        self.worker = worker
        self.metrics = metrics  # the gateway's, for its life (a reload keeps them)
        self.budget_s = budget_s
        self.started_ns = time.time_ns()  # tells this process from the worker it replaced

    def snapshot(self) -> Snapshot:
        return Snapshot(1, self.started_ns, time.monotonic_ns(), self.metrics.families())

    async def render(self) -> bytes:
        """The text exposition of every worker's tallies, merged with the ledger's counts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget_s
        peers = self.worker.peers
        fetches = asyncio.gather(*(self._fetch(i, deadline) for i in peers))
        await asyncio.sleep(0)  # the connections go out before our own tallies are collected
        answers = {str(self.worker.index): self.snapshot()}
        for index, data in zip(peers, await fetches, strict=True):
            if data is None:
                continue
            try:
                answers[str(index)] = metrics_merge.decode(data)
            except msgspec.DecodeError as exc:
                logger.warning("worker %d sent a metrics snapshot that is not one: %s", index, exc)
        path = os.path.join(self.worker.run_dir, LEDGER)
        wait_s = max(deadline - loop.time(), MIN_LEDGER_WAIT_S)
        ledger = await asyncio.to_thread(_record, path, answers, wait_s)
        fresh = [(worker, answer.families) for worker, answer in answers.items()]
        counted = metrics_ledger.counted(ledger) if ledger else None
        merged = metrics_merge.merge(fresh, self.worker.count, counted)
        for note in merged.left_out:
            logger.warning("metrics scrape left out %s", note)
        return render(merged.families)

    async def _fetch(self, index: int, deadline: float) -> bytes | None:
        path = self.worker.socket_path(index)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_unix_connection(path)
                try:
                    while chunk := await reader.read(2**20):
                        size += len(chunk)
                        if size > MAX_SNAPSHOT_BYTES:
                            logger.warning("worker %d: metrics snapshot over %d bytes", index, size)
                            return None
                        chunks.append(chunk)
                finally:
                    writer.close()
        except TimeoutError:
            logger.warning("worker %d: no metrics snapshot within %.1f s", index, self.budget_s)
            return None
        except OSError as exc:  # absent, or a stale file nobody listens on: being restarted
            logger.info("worker %d: metrics socket %s: %s", index, path, exc.strerror or exc)
            return None
        return b"".join(chunks)

    @contextlib.asynccontextmanager
    async def serving(self, app: web.Application) -> AsyncIterator[None]:
        """Listen on this worker's socket while the app runs."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(metrics_merge.encode(self.snapshot()))
                await writer.drain()
            except ConnectionError:
                pass  # the scraping peer gave up first
            finally:
                writer.close()

        path = self.worker.socket_path(self.worker.index)
        sock, inode = _bind(path)
        server = await asyncio.start_unix_server(answer, sock=sock)
        try:
            yield
        finally:
            server.close()
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:  # not the socket of a worker started since
                    os.unlink(path)


def _bind(path: str) -> tuple[socket.socket, int]:
    """A listening unix socket at `path` with mode 0600, replacing a stale file there.

    Bound under a temporary name, made 0600 and then renamed over `path`, so a peer never
    finds the socket with another mode, nor the path missing while it is replaced.
    """
    temporary = f"{path}.{os.getpid()}.{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        sock.listen(64)
        os.replace(temporary, path)
    except OSError:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    sock.setblocking(False)
    return sock, os.stat(path).st_ino


def _record(path: str, answers: dict[str, Snapshot], wait_s: float) -> Ledger | None:
    """Reconcile the ledger at `path` with this scrape's answers, under an exclusive lock on
    `path.lock` (waited for up to `wait_s`); None when the lock or the file cannot be had, and
    the scrape then goes by the answers alone. Runs in a thread: it may wait, and writes."""
    deadline = time.monotonic() + wait_s
    try:
        lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        logger.warning("metrics ledger %s.lock: %s", path, exc)
        return None
    try:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    logger.warning("metrics ledger: still locked after %.1f s", wait_s)
                    return None
                time.sleep(0.005)
        old: Ledger | None = None
        try:
            with open(path, "rb") as file:
                old = metrics_ledger.decode(file.read())
        except FileNotFoundError:
            pass
        except msgspec.DecodeError as exc:
            logger.warning("metrics ledger %s is not one (%s): starting a new one", path, exc)
        ledger = metrics_ledger.reconcile(old, answers)
        temporary = f"{path}.{os.getpid()}"
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            out.write(metrics_ledger.encode(ledger))
        os.replace(temporary, path)
        return ledger
    except OSError as exc:
        logger.warning("metrics ledger %s: %s", path, exc)
        return None
    finally:
        os.close(lock)  # and with it the lock


def worker_metrics(
    app: web.Application, environ: Mapping[str, str], metrics: Metrics
) -> CleanupCtx:
    """The cleanup context for this worker's metrics socket, or one that does nothing when the
    gateway runs as one process; puts the merging scrape on the app under WORKER_METRICS."""
    worker = worker_from_env(environ)
    if worker is None:
        return _nothing
    app[WORKER_METRICS] = workers = WorkerMetrics(worker, metrics)
    return workers.serving


@contextlib.asynccontextmanager
async def _nothing(app: web.Application) -> AsyncIterator[None]:
    yield


WORKER_METRICS: web.AppKey[WorkerMetrics] = web.AppKey("worker_metrics", WorkerMetrics)
