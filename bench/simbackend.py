"""A simulated OpenAI-compatible inference server ("simulated vLLM") on a raw asyncio.Protocol.

Fast enough never to be the bottleneck of a benchmark: no HTTP framework, one protocol object
per connection, timers instead of tasks, bytes prebuilt per request. It serves /health,
/v1/models, /v1/chat/completions, /v1/completions (streaming or not) and /v1/embeddings, and
records every request whose client went away before the response was complete, with the
`time.monotonic_ns()` at which it noticed (GET /sim/stats), so a benchmark can measure how fast
a proxy passes a client's disconnect on.

Timing of one generation (every delay may be overridden per request by a header):
  request in -> header delay (`x-sim-header-delay-ms`) -> response head (streams)
  -> time to first token (`--ttft-ms`, `x-sim-ttft-ms`) -> role event + token 1
  -> one token every chunk delay (`--chunk-delay-ms`, `--tokens-per-s`, `x-sim-chunk-delay-ms`)
  -> finish event, usage event (with stream_options.include_usage), `data: [DONE]`.
A non-streaming response is sent whole once the same total time has passed.
With the prefix KV cache model on (`--prefix-cache-blocks`, `--prefill-ms-per-block`, `--slots`),
a generation first waits for one of the slots, and its time to first token grows by the cost of
each prompt block not in the cache (bench/simcache.py); /sim/stats then reports hits and misses.

    python -m bench.simbackend --port 8001 --ttft-ms 150 --tokens-per-s 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
from dataclasses import replace
from typing import Any

from bench.aio import run
from bench.simprotocol import SimOptions, SimProtocol, SimShared, SimStats

__all__ = ["SimBackend", "SimOptions", "SimStats", "main", "start_simbackend"]


class SimBackend:
    """A running simulated server: `.port`, `.url`, `.stats`, and `await close()`."""

    def __init__(self, options: SimOptions) -> None:
        self.shared = SimShared(options)
        self.server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def options(self) -> SimOptions:
        return self.shared.options

    @property
    def stats(self) -> SimStats:
        return self.shared.stats

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SimProtocol(self.shared), host, port, backlog=8192, reuse_address=True
        )
        self.host = host
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for transport in list(self.shared.transports):
            transport.abort()
        await self.server.wait_closed()
        self.server = None


async def start_simbackend(host: str = "127.0.0.1", port: int = 0, **options: Any) -> SimBackend:
    """Start a simulated backend on the running loop; `options` are `SimOptions` fields."""
    if isinstance(options.get("models"), str):
        options["models"] = (options["models"],)
    backend = SimBackend(replace(SimOptions(), **options))
    await backend.start(host, port)
    return backend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.simbackend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--model", action="append", help="served model id (repeat or comma-separate)"
    )
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--tokens-per-s", type=float, default=0.0, help="0: no delay")
    pace.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between tokens")
    parser.add_argument("--header-delay-ms", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=16, help="tokens when max_tokens is unset")
    parser.add_argument("--keepalive-s", type=float, default=5.0, help="idle keep-alive timeout")
    cache = parser.add_argument_group("prefix KV cache model (bench/simcache.py; off by default)")
    cache.add_argument(
        "--prefix-cache-blocks", type=int, default=0, help="LRU capacity in prompt blocks; 0: off"
    )
    cache.add_argument("--block-bytes", type=int, default=256, help="prompt bytes per block")
    cache.add_argument(
        "--prefill-ms-per-block", type=float, default=0.0, help="TTFT added per uncached block"
    )
    cache.add_argument(
        "--slots", type=int, default=0, help="generations at once, the rest queue; 0: no limit"
    )
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> SimOptions:
    models = tuple(m.strip() for arg in args.model or ["sim-model"] for m in arg.split(","))
    delay = 1000.0 / args.tokens_per_s if args.tokens_per_s > 0 else args.chunk_delay_ms
    return SimOptions(
        models=tuple(m for m in models if m) or ("sim-model",),
        ttft_ms=args.ttft_ms,
        chunk_delay_ms=delay,
        header_delay_ms=args.header_delay_ms,
        tokens=args.tokens,
        keepalive_s=args.keepalive_s,
        prefix_cache_blocks=max(0, args.prefix_cache_blocks),
        block_bytes=max(1, args.block_bytes),
        prefill_ms_per_block=max(0.0, args.prefill_ms_per_block),
        slots=max(0, args.slots),
    )


async def serve(host: str, port: int, options: SimOptions) -> None:
    """Run until SIGINT or SIGTERM."""
    # Fewer, later collections: the simulator's latency should not jitter with the collector.
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)
    backend = SimBackend(options)
    await backend.start(host, port)
    print(f"simbackend listening on {backend.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await backend.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run(serve(args.host, args.port, options_from_args(args)))
    except OSError as exc:
        raise SystemExit(f"simbackend: cannot listen on {args.host}:{args.port}: {exc}") from None


if __name__ == "__main__":
    main()
