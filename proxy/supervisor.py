"""`server.workers` above 1: a supervisor and N serving processes (workers) on one port.

The supervisor serves nothing itself. It reserves the port with a socket bound with
SO_REUSEPORT that never listens (the kernel hands connections only to listening sockets, and
no other program can take the port while a worker restarts), then starts N workers: the same
command line with the port made exact, each told its index in `INFERENCE_PROXY_WORKER`. Each
worker listens on the port with SO_REUSEPORT, so the kernel spreads connections among them.

- Workers speak sd_notify to the supervisor's own datagram socket (their `$NOTIFY_SOCKET`);
  the sender's credentials say which worker spoke. systemd hears `READY=1` once every worker
  is ready, and `STATUS=` lines that say what each worker said last.
- A worker that dies is started again after a back-off (`backoff_s`); one that fails before it
  was ever ready with the exit code of a bad config or a port it cannot open stops them all:
  the supervisor exits non-zero only when the gateway cannot serve.
- SIGTERM or SIGINT: every worker gets SIGTERM and drains (`server.drain_s`); exit 0.
- SIGHUP: the supervisor checks the file first. With errors, they are logged and no worker is
  touched; else every worker gets SIGHUP, and systemd hears `READY=1` once each has reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import yaml

from proxy.config import Config, ConfigError
from proxy.notify import notify
from proxy.workermetrics import RUN_DIR_ENV, WORKER_ENV, WORKERS_ENV

logger = logging.getLogger("proxy.supervisor")

SUPERVISOR_ENV = "INFERENCE_PROXY_SUPERVISOR"  # the supervisor's pid

EXIT_CANNOT_SERVE = (1, 2)  # a worker's exit codes that no restart can mend (see __main__)
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 30.0  # a worker up this long resets the back-off
RELOAD_WAIT_S = 60.0  # longest wait for every worker to say it reloaded
STOP_MARGIN_S = 5.0  # beyond server.drain_s before a worker that will not stop is killed

_UCRED = struct.Struct("3i")  # pid, uid, gid


def worker_count(workers: int, cpus: int | None) -> int:
    """`server.workers`, with 0 meaning one per core."""
    return workers if workers > 0 else max(1, cpus or 1)


def backoff_s(previous_s: float, ran_s: float) -> float:
    """The wait before starting a worker again: doubling while workers die young."""
    if ran_s >= HEALTHY_RUN_S or previous_s <= 0:
        return BACKOFF_FIRST_S
    return min(BACKOFF_MAX_S, previous_s * 2)


def config_text(config: Config) -> str:
    """A checked config as YAML that `load_config` reads back as the same config."""
    return str(yaml.safe_dump(msgspec.to_builtins(config), sort_keys=False))


def parse_notify(datagram: bytes) -> dict[str, str]:
    """sd_notify's `KEY=VALUE` lines (a line without `=` is ignored)."""
    fields: dict[str, str] = {}
    for line in datagram.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


@dataclass
class Worker:
    """One serving process, and what it last told the supervisor."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    ever_ready: bool = False
    reloading: bool = False
    reload_pending: bool = False  # a reload came before it was ready
    status: str = ""
    backoff_s: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """Runs and watches N workers until a stop signal or a failure to serve."""

    def __init__(
        self,
        worker_args: Sequence[str],
        config: Config,
        count: int,
        load: Callable[[], Config],
        source: str,
        environ: Mapping[str, str],
    ) -> None:
        self.worker_args = list(worker_args)  # the command line but --config and --port
        self.config = config
        self.load = load  # reads and checks the config file; raises ConfigError
        self.source = source  # the operator's file, as the logs name it
        self.environ = environ
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self.exit_code = 0
        self.announced_ready = False
        self.reload_started = 0.0
        self.stopped = asyncio.Event()
        self.run_dir = ""
        self.own_run_dir = False
        self.port = config.server.port

    # -- the life of the supervisor ---------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; the exit code."""
        host = self.config.server.host
        reservation = _reserve(host, self.port)  # raises OSError: the caller says why
        self.port = reservation.getsockname()[1]
        self._make_run_dir()
        self._write_config(self.config)
        listener = self._listen_for_workers()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        logger.info(
            "supervisor %d: starting %d workers on %s:%d",
            os.getpid(),
            len(self.workers),
            host,
            self.port,
        )
        watchers = [asyncio.create_task(self._keep(w)) for w in self.workers]
        try:
            await self.stopped.wait()
            await self._stop_all()
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            loop.remove_reader(listener.fileno())
            listener.close()
            reservation.close()
            if self.own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.exit_code

    def stop(self) -> None:
        """SIGTERM or SIGINT: drain every worker, then exit."""
        if not self.stopping:
            self.stopping = True
            notify(self.environ, "STOPPING=1")
            logger.info("supervisor: stopping; every worker drains (up to %ss)", self._drain_s)
            self.stopped.set()

    @property
    def _drain_s(self) -> float:
        return self.config.server.drain_s

    async def _stop_all(self) -> None:
        for worker in self.workers:
            _signal(worker, signal.SIGTERM)
        running = [w.done.wait() for w in self.workers if w.process is not None]
        try:
            grace_s = self.config.server.drain_grace_s
            async with asyncio.timeout(grace_s + self._drain_s + STOP_MARGIN_S):
                await asyncio.gather(*running)
        except TimeoutError:
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    logger.error("worker %d would not stop; killing it", worker.index)
                    _signal(worker, signal.SIGKILL)
            await asyncio.gather(*(w.done.wait() for w in self.workers if w.process))

    # -- one worker, kept running ------------------------------------------------------------

    async def _keep(self, worker: Worker) -> None:
        while not self.stopping:
            worker.done.clear()
            worker.ready = worker.reloading = False
            worker.started_at = time.monotonic()
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                *self.worker_args,
                "--config",
                self._config_path,
                "--config-source",
                self.source,
                "--port",
                str(self.port),
                env=self._worker_env(worker.index),
            )
            logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)
            if self.stopping:  # the stop came while it was starting
                _signal(worker, signal.SIGTERM)
            code = await worker.process.wait()
            worker.done.set()
            worker.ready = False
            worker.status = ""  # what it said last no longer holds
            if self.stopping:
                return
            ran_s = time.monotonic() - worker.started_at
            if not worker.ever_ready and code in EXIT_CANNOT_SERVE:
                logger.error(
                    "worker %d exited with %d before it could serve; stopping", worker.index, code
                )
                self.exit_code = code
                self.stop()
                return
            worker.backoff_s = backoff_s(worker.backoff_s, ran_s)
            logger.error(
                "worker %d (pid %d) %s after %.1f s; starting it again in %.1f s",
                worker.index,
                worker.process.pid,
                _how_it_ended(code),
                ran_s,
                worker.backoff_s,
            )
            self._tell_status()
            await asyncio.sleep(worker.backoff_s)

    def _worker_env(self, index: int) -> dict[str, str]:
        env = dict(self.environ)
        env.update(
            {
                WORKER_ENV: str(index),
                WORKERS_ENV: str(len(self.workers)),
                RUN_DIR_ENV: self.run_dir,
                SUPERVISOR_ENV: str(os.getpid()),
                "NOTIFY_SOCKET": os.path.join(self.run_dir, "notify.sock"),
            }
        )
        return env

    # -- what workers say --------------------------------------------------------------------

    def _listen_for_workers(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(os.path.join(self.run_dir, "notify.sock"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read_notify, sock)
        return sock

    def _read_notify(self, sock: socket.socket) -> None:
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            pid = _sender_pid(ancillary)
            worker = next(
                (w for w in self.workers if w.process is not None and w.process.pid == pid),
                None,
            )
            if worker is not None:  # anything else on the socket is not ours to hear
                self._heard(worker, parse_notify(data))

    def _heard(self, worker: Worker, fields: dict[str, str]) -> None:
        if "STATUS" in fields:
            worker.status = fields["STATUS"]
        if fields.get("RELOADING") == "1":
            worker.reloading = True
        if fields.get("READY") == "1":
            worker.ready = worker.ever_ready = True
            worker.reloading = False
            if worker.reload_pending:
                worker.reload_pending = False
                _signal(worker, signal.SIGHUP)
        self._tell_status()

    def _tell_status(self) -> None:
        ready = [w for w in self.workers if w.ready]
        if not self.announced_ready and len(ready) == len(self.workers):
            self.announced_ready = True
            logger.info("supervisor: all %d workers are serving", len(self.workers))
            notify(self.environ, "READY=1", f"MAINPID={os.getpid()}", self._status_line())
            return
        if (
            self.announced_ready
            and self.reload_started
            and not any(w.reloading or w.reload_pending for w in self.workers)
        ):
            self.reload_started = 0.0
            notify(self.environ, "READY=1", self._status_line())
            return
        notify(self.environ, self._status_line())

    def _status_line(self) -> str:
        ready = sum(w.ready for w in self.workers)
        said = "; ".join(f"worker {w.index}: {w.status}" for w in self.workers if w.status)
        return f"STATUS={ready}/{len(self.workers)} workers serving" + (f"; {said}" if said else "")

    # -- reload ------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: check the file, then have every worker reload it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify(self.environ, "RELOADING=1", f"MONOTONIC_USEC={usec}")
        try:
            config = self.load()
        except ConfigError as exc:
            for error in exc.errors:
                logger.error("reload: %s", error)
            status = (
                f"reload failed: {len(exc.errors)} error(s) in the config (see the log); "
                "the previous config still serves"
            )
            logger.error("%s", status)
            notify(self.environ, "READY=1", f"STATUS={status}")
            return
        if config.server != self.config.server:
            logger.warning("reload: the server section changed; it applies at the next restart")
        # The server section in force changes only at a restart; a worker started again
        # later serves this config too, not whatever the file on disk says by then.
        self.config = msgspec.structs.replace(config, server=self.config.server)
        self._write_config(self.config)
        self.reload_started = time.monotonic()
        for worker in self.workers:
            if worker.ready:
                worker.reloading = True
                _signal(worker, signal.SIGHUP)
            elif worker.process is not None and worker.process.returncode is None:
                worker.reload_pending = True
        asyncio.get_running_loop().call_later(RELOAD_WAIT_S, self._reload_overdue)
        self._tell_status()

    def _reload_overdue(self) -> None:
        if self.reload_started and time.monotonic() - self.reload_started >= RELOAD_WAIT_S:
            late = [w.index for w in self.workers if w.reloading]
            logger.error("reload: workers %s did not say they reloaded", late)
            for worker in self.workers:
                worker.reloading = False
            self._tell_status()

    @property
    def _config_path(self) -> str:
        return os.path.join(self.run_dir, "config.yaml")

    def _write_config(self, config: Config) -> None:
        """The config in force, where workers read it (written whole, then renamed)."""
        partial = self._config_path + ".new"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(f"# the config in force, from {self.source}; written by the supervisor\n")
            out.write(config_text(config))
        os.replace(partial, self._config_path)

    def _make_run_dir(self) -> None:
        runtime = self.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if runtime:
            self.run_dir = runtime
        else:
            self.run_dir = tempfile.mkdtemp(prefix="inference-proxy-")
            self.own_run_dir = True
        os.chmod(self.run_dir, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.run_dir, "notify.sock"))


def _reserve(host: str, port: int) -> socket.socket:
    """The port, held. A first bind without SO_REUSEPORT fails if anything listens there
    (another gateway's workers would otherwise be let in beside ours, splitting clients)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # past TIME_WAIT, not a listener
        probe.bind((host, port))
        port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return int(_UCRED.unpack(data[: _UCRED.size])[0])
    return None


def _signal(worker: Worker, sig: signal.Signals) -> None:
    if worker.process is not None and worker.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(sig)


def _how_it_ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"
