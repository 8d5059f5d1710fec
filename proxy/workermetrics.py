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
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import msgspec
from aiohttp import web

from proxy import metrics_merge
from proxy.exposition import render
from proxy.metrics import Metrics

logger = logging.getLogger("proxy.workermetrics")

WORKER_ENV = "INFERENCE_PROXY_WORKER"
WORKERS_ENV = "INFERENCE_PROXY_WORKERS"
RUN_DIR_ENV = "INFERENCE_PROXY_RUN_DIR"

# The whole scrape waits this long for its peers; a worker being restarted must not hang it.
PEER_BUDGET_S = 2.0
# A snapshot larger than this is not a snapshot (100 models with traffic make 140 KB).
MAX_SNAPSHOT_BYTES = 64 * 2**20

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

    async def render(self) -> bytes:
        """The text exposition of every worker's tallies that arrived within the budget."""
        deadline = asyncio.get_running_loop().time() + self.budget_s
        peers = self.worker.peers
        fetches = asyncio.gather(*(self._fetch(i, deadline) for i in peers))
        await asyncio.sleep(0)  # the connections go out before our own tallies are collected
        snapshots = [(str(self.worker.index), self.metrics.families())]
        for index, data in zip(peers, await fetches, strict=True):
            if data is None:
                continue
            try:
                snapshots.append((str(index), metrics_merge.decode(data)))
            except msgspec.DecodeError as exc:
                logger.warning("worker %d sent a metrics snapshot that is not one: %s", index, exc)
        merged = metrics_merge.merge(snapshots, self.worker.count)
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
                writer.write(metrics_merge.encode(self.metrics.families()))
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
