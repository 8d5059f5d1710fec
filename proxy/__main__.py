"""The command line: load and check the config, then serve on uvloop until a signal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from proxy.app import create_app, make_runner
from proxy.config import Config, ConfigError, backend_only_config, load_config, with_listen

logger = logging.getLogger("proxy")
EXIT_CONFIG = 2


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
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
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
        level=level.upper(),
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


async def serve(config: Config) -> None:
    """Run the gateway until SIGTERM or SIGINT, then let requests in flight finish."""
    runner = make_runner(create_app(config, access_log=sys.stdout.buffer), config)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for address in runner.addresses:
        host, port = address[0], address[1]
        logger.info("inference-proxy listening on http://%s:%s", _host(host), port)
    models = ", ".join(config.models) if config.models else "as the backends list them"
    backends = ", ".join(f"{n}={b.url}" for n, b in config.backends.items())
    logger.info("backends: %s; models: %s", backends, models)
    await stop.wait()
    logger.info("stopping: letting requests in flight finish (up to %ss)", config.server.drain_s)
    await runner.cleanup()
    logger.info("stopped")


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
    uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
