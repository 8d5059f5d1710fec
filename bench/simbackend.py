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

    python -m bench.simbackend --port 8001 --ttft-ms 150 --tokens-per-s 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, cast

import orjson

try:
    import uvloop
except ImportError:  # the simulator also runs on asyncio's own loop, only slower
    uvloop = None

from bench import simresponses as sr
from bench.httpparse import BadRequest, Request, RequestParser

ABORTS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class SimOptions:
    """How the simulated server behaves by default; see the module docstring for the timing."""

    models: tuple[str, ...] = ("sim-model",)
    ttft_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    header_delay_ms: float = 0.0
    tokens: int = 16
    keepalive_s: float = 5.0


@dataclass(slots=True)
class SimStats:
    """Counters, and the recent requests whose peer closed before their response was done."""

    requests: int = 0
    completed: int = 0
    aborted: int = 0
    last_abort_ns: int | None = None
    connections: int = 0
    open_connections: int = 0
    aborts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=ABORTS_KEPT))

    def record_abort(self, request_id: str, path: str, phase: str, events: int) -> None:
        now = time.monotonic_ns()
        self.aborted += 1
        self.last_abort_ns = now
        self.aborts.append(
            {
                "request_id": request_id,
                "t_closed_ns": now,
                "path": path,
                "phase": phase,
                "events_sent": events,
            }
        )

    def reset(self) -> None:
        self.requests = self.completed = self.aborted = self.connections = 0
        self.last_abort_ns = None
        self.aborts.clear()

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "aborted": self.aborted,
            "last_abort_ns": self.last_abort_ns,
            "connections": self.connections,
            "open_connections": self.open_connections,
            "aborts": list(self.aborts),
        }


def _header_ms(request: Request, name: str, default: float) -> float:
    value = request.headers.get(name)
    if value is None:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        return default


class _Generation:
    """The state of one chat/completions response in progress on a connection."""

    __slots__ = (
        "completion",
        "events",
        "first_token_ms",
        "gap_ms",
        "header_ms",
        "keep_alive",
        "path",
        "phase",
        "request_id",
        "sent",
        "stream",
    )

    def __init__(
        self, request: Request, completion: sr.Completion, stream: bool, options: SimOptions
    ) -> None:
        self.completion = completion
        self.stream = stream
        self.events = sr.StreamEvents(completion) if stream else None
        self.path = request.path
        self.keep_alive = request.keep_alive
        self.request_id = request.headers.get("x-request-id", completion.request_id)
        self.header_ms = _header_ms(request, "x-sim-header-delay-ms", options.header_delay_ms)
        self.first_token_ms = _header_ms(request, "x-sim-ttft-ms", options.ttft_ms)
        self.gap_ms = _header_ms(request, "x-sim-chunk-delay-ms", options.chunk_delay_ms)
        self.phase = "headers"  # -> "first_token" once the head is out -> "streaming"
        self.sent = 0  # tokens sent


class SimProtocol(asyncio.Protocol):
    """One client connection: parse requests in order, answer each, watch for the peer leaving."""

    def __init__(self, backend: SimBackend) -> None:
        self.backend = backend
        self.loop = asyncio.get_running_loop()
        self.parser = RequestParser()
        self.transport: asyncio.Transport | None = None
        self.generation: _Generation | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused: Callable[[], None] | None = None  # continuation while writes are paused
        self.writing_paused = False
        self.continue_sent = False
        self.serving = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.backend.transports.add(self.transport)
        self.backend.stats.connections += 1
        self.backend.stats.open_connections += 1
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        if self.generation is None and self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.parser.feed(data)
        if self.generation is None:
            self._serve_buffered()

    def eof_received(self) -> bool | None:
        self._peer_gone()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._peer_gone()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.backend.transports.discard(self.transport)  # type: ignore[arg-type]
        self.backend.stats.open_connections -= 1
        self.transport = None

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        resume, self.paused = self.paused, None
        if resume is not None:
            resume()

    # -- requests --------------------------------------------------------------------------
    def _serve_buffered(self) -> None:
        """Answer every complete request in the buffer, stopping at a generation in progress."""
        if self.serving:
            return  # an outer call is already draining the buffer
        self.serving = True
        try:
            self._serve_loop()
        finally:
            self.serving = False

    def _serve_loop(self) -> None:
        while (
            self.generation is None
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            try:
                request = self.parser.next_request()
            except BadRequest as exc:
                self._write(sr.json_response(400, _error(400, str(exc)), keep_alive=False))
                self.transport.close()
                return
            if request is None:
                if self.parser.wants_continue() and not self.continue_sent:
                    self.continue_sent = True
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            self.continue_sent = False
            self._route(request)

    def _route(self, request: Request) -> None:
        backend = self.backend
        path, method = request.path, request.method
        if path in ("/v1/chat/completions", "/v1/completions"):
            if method == "POST":
                self._start_generation(request, chat=path == "/v1/chat/completions")
                return
        elif path == "/v1/embeddings":
            if method == "POST":
                self._embeddings(request)
                return
        elif path == "/health":
            if method == "GET":
                self._reply(request, 200, b'{"status":"ok"}')
                return
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            if method == "GET":
                self._models(request)
                return
        elif path == "/sim/stats":
            if method == "GET":
                self._reply(request, 200, orjson.dumps(backend.stats.as_dict()))
                return
        elif path == "/sim/reset":
            if method == "POST":
                backend.stats.reset()
                self._reply(request, 200, b'{"status":"ok"}')
                return
        else:
            self._reply(request, 404, _error(404, f"Not Found: {path}"))
            return
        self._reply(request, 405, _error(405, f"Method {method} not allowed on {path}"))

    def _reply(self, request: Request, status: int, body: bytes) -> None:
        self._write(sr.json_response(status, body, keep_alive=request.keep_alive))
        self._after_response(request.keep_alive)

    def _models(self, request: Request) -> None:
        models, created = self.backend.options.models, self.backend.created
        if request.path == "/v1/models":
            self._reply(request, 200, sr.models_body(models, created))
            return
        wanted = request.path.removeprefix("/v1/models/")
        if wanted not in models:
            self._reply(request, 404, _error(404, f"The model `{wanted}` does not exist."))
            return
        model = {"id": wanted, "object": "model", "created": created, "owned_by": "simbackend"}
        self._reply(request, 200, orjson.dumps(model))

    def _decode(self, request: Request) -> dict[str, Any] | None:
        """The JSON object in the body, or None after answering 400 or 404 for it."""
        try:
            payload = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            self._reply(request, 400, _error(400, f"Invalid JSON body: {exc}"))
            return None
        if not isinstance(payload, dict):
            self._reply(request, 400, _error(400, "The request body must be a JSON object."))
            return None
        model = payload.get("model")
        if model is not None and model not in self.backend.options.models:
            self._reply(request, 404, _error(404, f"The model `{model}` does not exist."))
            return None
        return payload

    def _embeddings(self, request: Request) -> None:
        self.backend.stats.requests += 1
        payload = self._decode(request)
        if payload is None:
            return
        model = payload.get("model") or self.backend.options.models[0]
        try:
            body = sr.embeddings_body(payload, model)
        except ValueError as exc:
            self._reply(request, 400, _error(400, str(exc)))
            return
        self.backend.stats.completed += 1
        self._reply(request, 200, body)

    # -- generation ------------------------------------------------------------------------
    def _start_generation(self, request: Request, *, chat: bool) -> None:
        backend = self.backend
        backend.stats.requests += 1
        payload = self._decode(request)
        if payload is None:
            return
        limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
        override = request.headers.get("x-sim-tokens")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            self._reply(request, 400, _error(400, "max_tokens must be a non-negative integer."))
            return
        if override is not None and override.isdigit():
            tokens, reason = int(override), "length"
        elif limit is not None:
            tokens, reason = limit, "length"
        else:
            tokens, reason = backend.options.tokens, "stop"
        backend.serial += 1
        stream_options = payload.get("stream_options")
        completion = sr.Completion(
            chat=chat,
            request_id=f"{'chatcmpl' if chat else 'cmpl'}-sim-{backend.serial}",
            model=payload.get("model") or backend.options.models[0],
            created=sr.now_s(),
            tokens=tokens,
            finish_reason=reason,
            prompt_tokens=sr.count_prompt_tokens(payload),
            include_usage=isinstance(stream_options, dict)
            and stream_options.get("include_usage") is True,
        )
        gen = _Generation(request, completion, payload.get("stream") is True, backend.options)
        self.generation = gen
        if gen.stream:
            self._after(gen.header_ms, self._send_head)
        else:
            total = gen.header_ms + gen.first_token_ms + gen.gap_ms * max(0, tokens - 1)
            self._after(total, self._send_whole)

    def _after(self, delay_ms: float, step: Callable[[], None]) -> None:
        if delay_ms > 0:
            self.timer = self.loop.call_later(delay_ms / 1000.0, step)
        else:
            step()

    def _send_whole(self) -> None:
        gen = self.generation
        if gen is None or self.transport is None:
            return
        self.timer = None
        self._write(sr.json_response(200, gen.completion.body(), keep_alive=gen.keep_alive))
        self._finish(gen)

    def _send_head(self) -> None:
        gen = self.generation
        if gen is None or self.transport is None:
            return
        self.timer = None
        self._write(sr.SSE_HEAD)
        gen.phase = "first_token"
        self._after(gen.first_token_ms, self._send_first_token)

    def _send_first_token(self) -> None:
        gen = self.generation
        if gen is None or gen.events is None or self.transport is None:
            return
        self.timer = None
        out = gen.events.opening()
        if gen.completion.tokens > 0:
            out += gen.events.token(0)
            gen.sent = 1
        gen.phase = "streaming"
        self._stream_on(gen, out)

    def _send_next_token(self) -> None:
        gen = self.generation
        if gen is None or gen.events is None or self.transport is None:
            return
        self.timer = None
        out = gen.events.token(gen.sent)
        gen.sent += 1
        self._stream_on(gen, out)

    def _stream_on(self, gen: _Generation, out: bytes) -> None:
        """Write `out`, then schedule the next token, or the closing events when all are out."""
        assert gen.events is not None
        total = gen.completion.tokens
        if gen.gap_ms <= 0 and gen.sent < total:
            # No delay: every remaining token goes in this one write, one HTTP chunk each.
            out += b"".join(gen.events.token(i) for i in range(gen.sent, total))
            gen.sent = total
        if gen.sent >= total:
            self._write(out + gen.events.closing())
            self._finish(gen)
            return
        self._write(out)
        if self.writing_paused:
            self.paused = lambda: self._after(gen.gap_ms, self._send_next_token)
        else:
            self._after(gen.gap_ms, self._send_next_token)

    def _finish(self, gen: _Generation) -> None:
        self.generation = None
        self.backend.stats.completed += 1
        self._after_response(gen.keep_alive)
        if self.transport is not None and gen.keep_alive:
            self._serve_buffered()

    def _after_response(self, keep_alive: bool) -> None:
        if self.transport is None:
            return
        if not keep_alive:
            self.transport.close()
        elif self.generation is None:
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        keepalive = self.backend.options.keepalive_s
        self.timer = self.loop.call_later(keepalive, self._idle_close) if keepalive > 0 else None

    def _idle_close(self) -> None:
        self.timer = None
        if self.transport is not None and self.generation is None:
            self.transport.close()

    def _peer_gone(self) -> None:
        """The client closed: stop the generation at once and record when we noticed."""
        gen, self.generation = self.generation, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.paused = None
        if gen is not None:
            self.backend.stats.record_abort(gen.request_id, gen.path, gen.phase, gen.sent)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def _error(status: int, message: str) -> bytes:
    err_type = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError"}
    return sr.error_body(status, message, err_type.get(status, "InternalServerError"))


class SimBackend:
    """A running simulated server: `.port`, `.url`, `.stats`, and `await close()`."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.stats = SimStats()
        self.created = sr.now_s()
        self.serial = 0
        self.transports: set[asyncio.Transport] = set()
        self.server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SimProtocol(self), host, port, backlog=8192, reuse_address=True
        )
        self.host = host
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for transport in list(self.transports):
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
    parser = argparse.ArgumentParser(prog="python -m bench.simbackend", description=__doc__)
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


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop when it is installed, else on asyncio's own loop."""
    if uvloop is None:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port, options_from_args(args)))


if __name__ == "__main__":
    main()
