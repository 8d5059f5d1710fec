"""The command line: load and check the config, then serve on uvloop until a signal."""

from __future__ import annotations

import signal

# SIGHUP's default action kills: from the first line until serving installs the reload
# handler (the imports below take a while), one sent early is ignored, not fatal.
signal.signal(signal.SIGHUP, signal.SIG_IGN)

import argparse
import asyncio
import ctypes
import errno
import gc
import logging
import os
import resource
import sys
from collections.abc import Mapping
from pathlib import Path

import uvloop

from proxy import __version__
from proxy.app import create_app, serve_app
from proxy.config import Config, ConfigError, backend_only_config, load_config, with_listen
from proxy.keys import StoreError
from proxy.keys.cli import add_keys_parser, check_store, run_keys
from proxy.notify import notify
from proxy.reload import Reloader
from proxy.state import LIVE, Live
from proxy.supervisor import SUPERVISOR_ENV, Supervisor, worker_count
from proxy.tls import check_files
from proxy.workermetrics import WORKER_ENV

logger = logging.getLogger("proxy")
EXIT_CONFIG = 2
EXIT_START = 1  # the gateway could not start serving (its port is taken, say)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
STATUS_EVERY_S = 5.0
PR_SET_PDEATHSIG = 1  # prctl(2)
# Collections of the youngest generation every 20,000 allocations (Python: 700), and of the
# middle one every 2nd of those (Python: 10th): what survives two young collections is mostly
# open streams, and a middle generation left to gather 50 collections' survivors held a
# million objects with 8,000 streams open, one pass over them stalling every stream for
# 208 ms (bench/RESULTS.md, "Issue 12"). See settle_heap.
GC_THRESHOLDS = (20_000, 2, 100)


class CannotListen(Exception):
    """The listening socket could not be opened; the message names the address and why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="inference-proxy",
        description="A streaming gateway in front of self-hosted inference servers.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="YAML configuration file")
    source.add_argument("--backend", help="no config file: one OpenAI-compatible backend URL")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument(
        "--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper, help="log level"
    )
    parser.add_argument("--version", action="version", version=f"inference-proxy {__version__}")
    # A worker reads the supervisor's copy of the config in force; logs name the operator's.
    parser.add_argument("--config-source", help=argparse.SUPPRESS)
    add_keys_parser(parser.add_subparsers(dest="command", metavar="{keys}"))
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config the arguments name, with --host/--port applied and every TLS file it names
    loaded once; raises ConfigError."""
    if args.backend is not None:
        return backend_only_config(args.backend, args.host, args.port)
    try:
        text = args.config.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{args.config}: {exc.strerror}"]) from exc
    config = with_listen(load_config(text), args.host, args.port)
    check_files(config)
    return config


def setup_logging(level: str, environ: Mapping[str, str]) -> None:
    """Logs (not the access log) on standard error; a worker names itself in each line."""
    worker = environ.get(WORKER_ENV)
    who = f"[worker {worker}] " if worker is not None else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s %(name)s: {who}%(message)s",
        stream=sys.stderr,
    )


def die_with_supervisor(environ: Mapping[str, str]) -> None:
    """A worker gets SIGTERM (and drains) when its supervisor dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("could not ask to be told of the supervisor's death")
    if str(os.getppid()) != environ.get(SUPERVISOR_ENV):
        os.kill(os.getpid(), signal.SIGTERM)  # it died before the request took


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: each stream holds two sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit from %d: %s", soft, exc)
            return
    logger.info("open-files limit: %d", hard)


def settle_heap() -> None:
    """Take what start-up built (modules, config, app, pools) out of the cycle collector's
    sight for good, and let it run less often: a request's garbage is nearly all freed by
    reference counting, and with thousands of streams open each full collection would walk
    every one of their objects, stalling the loop for all of them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(config: Config, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Run the gateway until SIGTERM or SIGINT, then let requests in flight finish; SIGHUP
    reloads the config file."""
    app = create_app(config, environ=environ, access_log=sys.stdout.buffer)
    host, port = config.server.host, config.server.port
    worker = WORKER_ENV in environ
    try:
        serving = await serve_app(app, config, host, port, reuse_port=worker)
    except OSError as exc:
        raise CannotListen(listen_failure(host, port, exc)) from exc
    live = app[LIVE]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.config is not None:
        reloader = Reloader(live, lambda: build_config(args), source_of(args), environ)
        loop.add_signal_handler(signal.SIGHUP, reloader.requested)
    else:
        loop.add_signal_handler(signal.SIGHUP, _nothing_to_reload)
    for address in serving.addresses:
        scheme = "https" if config.server.tls else "http"
        logger.info(
            "inference-proxy listening on %s://%s:%s", scheme, _host(address[0]), address[1]
        )
    models = ", ".join(config.models) if config.models else "as the backends list them"
    backends = ", ".join(f"{n}={b.url}" for n, b in config.backends.items())
    logger.info("backends: %s; models: %s", backends, models)
    settle_heap()
    notify(environ, "READY=1", f"MAINPID={os.getpid()}", status_line(live))
    reporting = asyncio.create_task(report_status(live, environ), name="status")
    await stop.wait()
    reporting.cancel()
    notify(environ, "STOPPING=1")
    logger.info("stopping: letting requests in flight finish (up to %ss)", config.server.drain_s)
    await serving.close(config.server.drain_s, config.server.drain_grace_s)
    logger.info("stopped")


def status_line(live: Live) -> str:
    """sd_notify's STATUS: what the gateway is doing now, in a few words."""
    state = live.state
    busy = len(state.clients.busy) if state.clients is not None else 0
    up = sum(state.healthy(asyncio.get_running_loop().time()).values())
    return f"STATUS=serving: {busy} request(s) in flight, {up}/{len(state.backends)} backends up"


async def report_status(live: Live, environ: Mapping[str, str]) -> None:
    """A STATUS line for `systemctl status` every few seconds (nothing without a manager)."""
    if "NOTIFY_SOCKET" not in environ:
        return
    while True:
        await asyncio.sleep(STATUS_EVERY_S)
        notify(environ, status_line(live))


def _nothing_to_reload() -> None:
    logger.warning("SIGHUP: running without a config file (--backend); nothing to reload")


def listen_failure(host: str, port: int, exc: OSError) -> str:
    """One line naming the address and the cause of a failed listen."""
    causes = {
        errno.EADDRINUSE: "the address is already in use (another process listens there)",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
        errno.EADDRNOTAVAIL: "no local interface has that address",
    }
    cause = causes.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot listen on {_host(host)}:{port}: {cause}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def source_of(args: argparse.Namespace) -> str:
    """The config file as logs name it."""
    return str(args.config_source or args.config)


def worker_args(args: argparse.Namespace) -> list[str]:
    """A worker's command line, but for the config and port the supervisor gives it."""
    return ["--log-level", args.log_level] + (["--host", args.host] if args.host else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, os.environ)
    try:
        config = build_config(args)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "keys":
        return run_keys(args, config, os.environ)
    if args.check:
        print("config ok")
        return 0
    store_problem = check_store(config, os.environ)  # never serve without the key store
    if store_problem is not None:
        print(f"inference-proxy: {store_problem[1]}", file=sys.stderr)
        return store_problem[0]
    raise_open_files_limit()
    count = worker_count(config.server.workers, os.cpu_count())
    if count > 1 and WORKER_ENV not in os.environ:
        supervisor = Supervisor(
            worker_args(args),
            config,
            count,
            lambda: build_config(args),
            source_of(args),
            os.environ,
        )
        try:
            return uvloop.run(supervisor.run())
        except OSError as exc:
            host, port = config.server.host, config.server.port
            print(f"inference-proxy: {listen_failure(host, port, exc)}", file=sys.stderr)
            return EXIT_START
    if WORKER_ENV in os.environ:
        die_with_supervisor(os.environ)
    try:
        uvloop.run(serve(config, args, os.environ))
    except (CannotListen, StoreError) as exc:
        print(f"inference-proxy: {exc}", file=sys.stderr)
        return EXIT_START
    return 0


if __name__ == "__main__":
    sys.exit(main())
