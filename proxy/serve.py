"""Serving one model request: route, then for each target forward as is or translate.

Every surface (OpenAI, MLflow, OICM, Anthropic, Gemini) ends here: `serve_openai` for bodies in
OpenAI's shapes, `serve_model` under it for any of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Literal

import msgspec
import orjson
from aiohttp import web

from proxy.adapters import ChatTemplateAdapter, ResponsesAdapter
from proxy.auth import check_scope
from proxy.balance import affinity_key
from proxy.chain import Call
from proxy.config import OptionalApi, serves
from proxy.errors import Unsupported
from proxy.forward import exchange, try_plan
from proxy.ratelimit import limited
from proxy.routing import Plan, Target
from proxy.state import STATE, GatewayState
from proxy.stream_usage import Edit, apply, options_span, request_edit
from proxy.translated import Adapter, exchange_translated
from proxy.upstream import Backend
from proxy.view import decode_object, prompt_head, prompt_of, set_model

NEVER: Literal["never"] = "never"  # no backend serves the route natively: always translate
SESSION_HEADER = "X-Session-ID"  # requests that share it go to the same replica (`affinity`)


async def serve_model(
    call: Call,
    model: str,
    *,
    native_path: str,
    native_api: OptionalApi | Literal["never"] | None = None,
    adapter: Callable[[], Adapter] | None = None,
    force_model: bool = False,
    model_at: tuple[int, int] | None = None,
    usage: Edit | None = None,
) -> web.StreamResponse:
    """Route `model`, then serve it from the first target that answers.

    A target whose backend serves `native_api` (None: every backend does) gets the body as
    is at `native_path`, with `model` set to the target's upstream id where it differs (or
    always, with `force_model`, for bodies addressed by endpoint rather than by model). The
    others get the `adapter`'s translation, or a 501 when there is none. `model_at` is the
    span of `model` in the body when `peek` found it; `usage`, the edit that asks a stream's
    backend for usage, made for backends that take it (`stream_usage`).
    """
    state = call.state
    route = state.plan(model)
    call.ex.model_label = route.model_label
    check_scope(call.ex.principal, model)
    to = _Targets(call, model, native_path, native_api, adapter, force_model, model_at, usage)
    if adapter is None and native_api is not None:  # only targets that serve it can take it
        route = _only(route, to.serves, native_path, state)
    key_path = native_path if native_api != NEVER else ""  # a Gemini body is not chat's
    async with limited(call, model):  # 429 past a limit; settled however the request ends
        return await try_plan(call, route, to.run, affinity_of(call, route, key_path))


class _Targets:
    """How `serve_model`'s request goes to each target it tries: as is where the backend
    serves the route, else translated (the translation made once, for the first such one).
    An object rather than closures: it is held for the life of every stream, and a closure's
    cells and functions took about 700 bytes of each."""

    __slots__ = (
        "adapter",
        "call",
        "force_model",
        "model",
        "model_at",
        "native_api",
        "native_path",
        "translation",
        "usage",
    )

    def __init__(
        self,
        call: Call,
        model: str,
        native_path: str,
        native_api: OptionalApi | Literal["never"] | None,
        adapter: Callable[[], Adapter] | None,
        force_model: bool,
        model_at: tuple[int, int] | None,
        usage: Edit | None,
    ) -> None:
        self.call = call
        self.model = model
        self.native_path = native_path
        self.native_api = native_api
        self.adapter = adapter
        self.force_model = force_model
        self.model_at = model_at
        self.usage = usage
        self.translation: Adapter | None = None

    def native(self, backend: Backend) -> bool:
        api = self.native_api
        return api is None or (api != NEVER and serves(backend.config, api))

    def serves(self, name: str) -> bool:
        return self.native(self.call.state.backends[name])

    def run(
        self, backend: Backend, target: Target, may_retry: bool
    ) -> Coroutine[None, None, web.StreamResponse]:
        """The try on `backend`, to be awaited at once: `exchange`'s own coroutine where the
        body goes as is (one frame fewer held for the life of each stream), else one that
        translates it first."""
        call = self.call
        if not self.native(backend):
            return self._translated(backend, target, may_retry)
        body, usage, ex = call.body, self.usage, call.ex
        upstream_model = target.upstream_model or (self.model if self.force_model else None)
        ex.strip_usage = usage is not None and backend.config.stream_usage
        if ex.strip_usage:
            assert usage is not None
            payload = apply(body, usage, upstream_model, self.model_at)
        elif upstream_model is not None:
            payload = set_model(body, upstream_model, self.model_at)
        else:
            payload = body
        return exchange(call, backend, self.native_path, payload, may_retry)

    async def _translated(
        self, backend: Backend, target: Target, may_retry: bool
    ) -> web.StreamResponse:
        assert self.adapter is not None  # `_only` left no target without the route
        translation = self.translation
        if translation is None:
            translation = self.translation = self.adapter()
        upstream_model = target.upstream_model or self.model
        if translation.heavy:  # in a worker thread: the loop keeps serving everyone else
            request_body = await asyncio.to_thread(translation.chat_request, upstream_model)
        else:
            request_body = translation.chat_request(upstream_model)
        chat = orjson.dumps(request_body)
        return await exchange_translated(self.call, backend, translation, chat, may_retry)


def _only(route: Plan, able: Callable[[str], bool], path: str, state: GatewayState) -> Plan:
    """The plan without the targets whose backend cannot serve `path`, or `Unsupported` when
    none is left (so a tgi target never answers 501 for a vllm one that could serve it)."""
    if all(able(t.backend) for step in route.steps for t in step.candidates):
        return route  # the usual case: every target serves it
    steps = tuple(
        msgspec.structs.replace(step, candidates=kept)
        for step in route.steps
        if (kept := tuple(t for t in step.candidates if able(t.backend)))
    )
    if not steps:
        backend = state.backends[route.steps[0].candidates[0].backend]
        raise Unsupported(
            f"backend '{backend.name}' (kind {backend.config.kind}) does not serve "
            f"{path}; list it in the backend's 'serves' if it does"
        )
    keyed = any(step.policy == "affinity" for step in steps)
    return msgspec.structs.replace(route, steps=steps, keyed=keyed)


def affinity_of(call: Call, route: Plan, path: str = "") -> bytes:
    """The request's key for the `affinity` policy (b"" when no model of the chain uses it):
    its session id, else its prompt's first bytes; `path` is the OpenAI-style route the body
    is shaped for ("": any shape). Each `affinity` model places it (forward.arrange)."""
    if not route.keyed:
        return b""
    session = call.request.headers.get(SESSION_HEADER)
    prefix_bytes = call.state.config.routing.prefix_bytes
    if session or not call.body:  # a session id keys it whatever the prompt
        return affinity_key(session, b"", prefix_bytes)
    prompt = call.prompt
    if prompt is msgspec.UNSET:  # the route's handler did not look for it
        prompt = prompt_of(call.body, PROMPT_FIELDS.get(path))
    return affinity_key(None, prompt_head(prompt, prefix_bytes), prefix_bytes)


# The OpenAI routes every surface maps onto, and the helper routes beside them.
CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)
OPENAI_POST_ROUTES = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
# The route an MLflow or OICM body's kind (`peek_invocation`) is served on.
ROUTE_OF_KIND = {"chat": CHAT, "completions": COMPLETIONS, "embeddings": EMBEDDINGS}
MESSAGES = "/v1/messages"  # Anthropic's
# Where each route's body holds the prompt that keys `affinity`, its own system prompt first.
PROMPT_FIELDS = {
    CHAT: ("messages",),
    COMPLETIONS: ("prompt",),
    EMBEDDINGS: ("input",),
    RESPONSES: ("input",),
    MESSAGES: ("system", "messages"),
}
# vLLM's and SGLang's helper routes (vLLM's benchmark client calls /tokenize first); not
# every kind has them, so each is an optional API (`serves`).
HELPER_ROUTES: dict[str, OptionalApi] = {"/tokenize": "tokenize", "/detokenize": "detokenize"}


def serve_openai(
    call: Call,
    path: str,
    model: str,
    *,
    chat_template: bool = False,
    force_model: bool = False,
    model_at: tuple[int, int] | None = None,
    options_at: tuple[int, int] | msgspec.UnsetType | None = msgspec.UNSET,
) -> Coroutine[None, None, web.StreamResponse]:
    """An OpenAI-shaped request for `model` at `path`: forwarded as is where the backend
    serves the route, translated where it does not (Responses; a `chat_template`).
    `model_at`, `options_at`: where `peek` found `model` and `stream_options` in the body
    (UNSET: not looked for). Returns `serve_model`'s coroutine, to be awaited at once (one
    frame fewer held for the life of each request)."""
    native_api: OptionalApi | None = None  # None: every backend serves the route
    adapter: Callable[[], Adapter] | None = None  # defined below for the routes that translate
    if path == EMBEDDINGS:
        native_api = "embeddings"
    elif path == RESPONSES:
        native_api = "responses"
        vision = vision_of(call.request, model)

        def adapter() -> Adapter:  # built only when a target has to translate
            return ResponsesAdapter(decode_object(call.body), model, vision)

    elif path == CHAT and chat_template:
        native_api = "chat_template"

        def adapter() -> Adapter:
            return ChatTemplateAdapter(decode_object(call.body))

    usage = None
    if call.stream and path in (CHAT, COMPLETIONS) and call.state.stream_usage:
        at = options_span(call.body) if options_at is msgspec.UNSET else options_at
        usage = request_edit(call.body, at)
    return serve_model(
        call,
        model,
        native_path=path,
        native_api=native_api,
        adapter=adapter,
        force_model=force_model,
        model_at=model_at,
        usage=usage,
    )


def vision_of(request: web.Request, model: str) -> bool:
    """Whether the configured model takes images (translated routes refuse them otherwise)."""
    entry = request[STATE].config.models.get(model)
    return entry is not None and entry.vision
