"""The command line: load and check the config, then serve on uvloop until a signal."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import resource
import signal
import sys
from pathlib import Path

import uvloop

from proxy import __version__
from proxy.app import create_app, serve_app
from proxy.config import Config, ConfigError, backend_only_config, load_config, with_listen
from proxy.notify import notify

logger = logging.getLogger("proxy")
EXIT_CONFIG = 2
EXIT_START = 1  # the gateway could not start serving (its port is taken, say)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config the arguments name, with --host/--port applied; raises ConfigError."""
    if args.backend is not None:
        return backend_only_config(args.backend, args.host, args.port)
    try:
        text = args.config.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{args.config}: {exc.strerror}"]) from exc
    return with_listen(load_config(text), args.host, args.port)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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


async def serve(config: Config, config_path: Path | None) -> None:
    """Run the gateway until SIGTERM or SIGINT, then let requests in flight finish."""
    app = create_app(config, access_log=sys.stdout.buffer)
    host, port = config.server.host, config.server.port
    try:
        serving = await serve_app(app, config, host, port)
    except OSError as exc:
        raise CannotListen(listen_failure(host, port, exc)) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup, config_path)
    for address in serving.addresses:
        logger.info("inference-proxy listening on http://%s:%s", _host(address[0]), address[1])
    models = ", ".join(config.models) if config.models else "as the backends list them"
    backends = ", ".join(f"{n}={b.url}" for n, b in config.backends.items())
    logger.info("backends: %s; models: %s", backends, models)
    notify(os.environ, "READY=1", f"MAINPID={os.getpid()}")
    await stop.wait()
    notify(os.environ, "STOPPING=1")
    logger.info("stopping: letting requests in flight finish (up to %ss)", config.server.drain_s)
    await serving.close(config.server.drain_s)
    logger.info("stopped")


def listen_failure(host: str, port: int, exc: OSError) -> str:
    """One line naming the address and the cause of a failed listen."""
    causes = {
        errno.EADDRINUSE: "the address is already in use (another process listens there)",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
        errno.EADDRNOTAVAIL: "no local interface has that address",
    }
    cause = causes.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot listen on {_host(host)}:{port}: {cause}"


def on_hangup(config_path: Path | None) -> None:
    """SIGHUP must never kill a serving gateway. Applying a new config to a running one is
    not built yet, so the file is checked (its errors logged) and the running config kept."""
    if config_path is None:
        logger.warning("SIGHUP: running without a config file; nothing to reload")
        return
    try:
        load_config(config_path.read_bytes())
    except OSError as exc:
        logger.error("SIGHUP: cannot read %s: %s; the running config stays", config_path, exc)
        return
    except ConfigError as exc:
        for error in exc.errors:
            logger.error("SIGHUP: %s: %s", config_path, error)
        logger.error("SIGHUP: %s has errors; the running config stays", config_path)
        return
    logger.warning(
        "SIGHUP: %s is valid, but a live reload is not supported in this version; "
        "restart the gateway to apply it (the running config stays)",
        config_path,
    )


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = build_config(args)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print("config ok")
        return 0
    raise_open_files_limit()
    try:
        uvloop.run(serve(config, args.config))
    except CannotListen as exc:
        print(f"inference-proxy: {exc}", file=sys.stderr)
        return EXIT_START
    return 0


if __name__ == "__main__":
    sys.exit(main())
