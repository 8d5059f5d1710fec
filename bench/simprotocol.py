"""The simulated backend's connection protocol: parse requests, answer them, watch for hang-ups.

One `SimProtocol` per connection, timers instead of tasks, bytes prebuilt per request (see
bench/simresponses.py). bench/simbackend.py runs it as a server; its docstring has the timing.
With `prefix_cache_blocks` or `slots` set, a generation first waits for a slot and pays for its
uncached prompt blocks before its first token (bench/simcache.py); both are off by default.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from bench import simresponses as sr
from bench.httpparse import BadRequest, Request, RequestParser
from bench.simcache import BLOCK_BYTES, PrefixCache, Slots, prompt_text

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
    prefix_cache_blocks: int = 0  # LRU capacity in prompt blocks; 0: no cache model
    block_bytes: int = BLOCK_BYTES  # prompt bytes per block
    prefill_ms_per_block: float = 0.0  # added to the TTFT per uncached block
    slots: int = 0  # generations at once, the rest queue; 0: no limit


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


class SimShared:
    """What every connection of one simulated server shares: options, counters, open transports."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.stats = SimStats()
        self.created = sr.now_s()
        self.serial = 0  # numbers the completions' ids
        self.transports: set[asyncio.Transport] = set()
        self.cache = PrefixCache(options.prefix_cache_blocks, options.block_bytes)
        self.slots = Slots(options.slots)

    @property
    def scheduled(self) -> bool:
        """Whether generations go through the slot and prefix-cache model at all."""
        return self.cache.enabled or self.slots.limit > 0 or self.options.prefill_ms_per_block > 0

    def stats_dict(self) -> dict[str, Any]:
        out = self.stats.as_dict()
        if self.scheduled:
            out["prefix_cache"] = self.cache.as_dict()
            out["slots"] = self.slots.as_dict()
        return out

    def reset(self) -> None:
        """Counters to zero; the prefix cache emptied (a fresh start for the next run)."""
        self.stats.reset()
        self.cache.clear()
        self.slots.reset()


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
        "holds_slot",
        "keep_alive",
        "path",
        "phase",
        "prompt",
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
        self.prompt = b""  # what the prefix cache looks up (only when it is on)
        self.holds_slot = False


class SimProtocol(asyncio.Protocol):
    """One client connection: parse requests in order, answer each, watch for the peer leaving."""

    def __init__(self, shared: SimShared) -> None:
        self.shared = shared
        self.loop = asyncio.get_running_loop()
        self.parser = RequestParser()
        self.transport: asyncio.Transport | None = None
        self.generation: _Generation | None = None
        self.timer: asyncio.Handle | None = None  # a TimerHandle, or call_soon's Handle
        self.paused: Callable[[], None] | None = None  # continuation while writes are paused
        self.writing_paused = False
        self.continue_sent = False
        self.serving = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.shared.transports.add(self.transport)
        self.shared.stats.connections += 1
        self.shared.stats.open_connections += 1
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
        if self.transport is not None:
            self.shared.transports.discard(self.transport)
        self.shared.stats.open_connections -= 1
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
        shared = self.shared
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
                self._reply(request, 200, orjson.dumps(shared.stats_dict()))
                return
        elif path == "/sim/reset":
            if method == "POST":
                shared.reset()
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
        models, created = self.shared.options.models, self.shared.created
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
        if model is not None and model not in self.shared.options.models:
            self._reply(request, 404, _error(404, f"The model `{model}` does not exist."))
            return None
        return payload

    def _embeddings(self, request: Request) -> None:
        self.shared.stats.requests += 1
        payload = self._decode(request)
        if payload is None:
            return
        model = payload.get("model") or self.shared.options.models[0]
        try:
            body = sr.embeddings_body(payload, model)
        except ValueError as exc:
            self._reply(request, 400, _error(400, str(exc)))
            return
        self.shared.stats.completed += 1
        self._reply(request, 200, body)

    # -- generation ------------------------------------------------------------------------
    def _start_generation(self, request: Request, *, chat: bool) -> None:
        shared = self.shared
        shared.stats.requests += 1
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
            tokens, reason = shared.options.tokens, "stop"
        shared.serial += 1
        stream_options = payload.get("stream_options")
        completion = sr.Completion(
            chat=chat,
            request_id=f"{'chatcmpl' if chat else 'cmpl'}-sim-{shared.serial}",
            model=payload.get("model") or shared.options.models[0],
            created=sr.now_s(),
            tokens=tokens,
            finish_reason=reason,
            prompt_tokens=sr.count_prompt_tokens(payload),
            include_usage=isinstance(stream_options, dict)
            and stream_options.get("include_usage") is True,
        )
        gen = _Generation(request, completion, payload.get("stream") is True, shared.options)
        if shared.cache.enabled:
            gen.prompt = prompt_text(payload)
        self.generation = gen
        if gen.stream:
            self._after(gen.header_ms, self._send_head)
        elif shared.scheduled:
            self._after(gen.header_ms, lambda: self._admit(gen, self._whole_after))
        else:
            total = gen.header_ms + gen.first_token_ms + gen.gap_ms * max(0, tokens - 1)
            self._after(total, self._send_whole)

    def _admit(self, gen: _Generation, then: Callable[[_Generation, float], None]) -> None:
        """Wait for a slot, then look the prompt up: `then(gen, prefill_ms)` (bench/simcache.py)."""
        self.timer = None

        def grant() -> bool:
            if self.generation is not gen or self.transport is None:
                return False  # the client left while it waited: the slot goes to the next
            gen.holds_slot = True
            shared = self.shared
            uncached = shared.cache.admit(gen.prompt) if shared.cache.enabled else 0
            prefill_ms = uncached * shared.options.prefill_ms_per_block
            # Never run on from inside another connection's release: schedule it.
            self.timer = self.loop.call_soon(then, gen, prefill_ms)
            return True

        self.shared.slots.acquire(grant)

    def _whole_after(self, gen: _Generation, prefill_ms: float) -> None:
        if self.generation is not gen:
            return
        tokens = gen.completion.tokens
        self._after(
            gen.first_token_ms + prefill_ms + gen.gap_ms * max(0, tokens - 1), self._send_whole
        )

    def _first_token_after(self, gen: _Generation, prefill_ms: float) -> None:
        if self.generation is not gen:
            return
        self._after(gen.first_token_ms + prefill_ms, self._send_first_token)

    def _release(self, gen: _Generation) -> None:
        if gen.holds_slot:
            gen.holds_slot = False
            self.shared.slots.release()

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
        if self.shared.scheduled:
            self._admit(gen, self._first_token_after)
        else:
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
        self._release(gen)
        self.shared.stats.completed += 1
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
        keepalive = self.shared.options.keepalive_s
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
            self._release(gen)
            self.shared.stats.record_abort(gen.request_id, gen.path, gen.phase, gen.sent)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def _error(status: int, message: str) -> bytes:
    err_type = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError"}
    return sr.error_body(status, message, err_type.get(status, "InternalServerError"))
