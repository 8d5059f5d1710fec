"""The Anthropic Messages and Gemini generateContent routes."""

from __future__ import annotations

from aiohttp import web

from proxy.adapters import AnthropicAdapter, GeminiAdapter
from proxy.chain import begin
from proxy.errors import InvalidRequest, NotFound
from proxy.serve import MESSAGES, NEVER, PROMPT_FIELDS, serve_model, vision_of
from proxy.view import decode_object, peek

GEMINI_VERSIONS = ("v1", "v1beta")
_GEMINI_METHODS = {"generateContent": False, "streamGenerateContent": True}


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    """POST .../v1/messages: as is to backends that serve it, translated for the others."""
    call = await begin(request)
    view = peek(call.body, PROMPT_FIELDS[MESSAGES])
    call.stream = view.stream
    call.prompt = view.prompt
    vision = vision_of(request, view.model)
    return await serve_model(
        call,
        view.model,
        native_path=MESSAGES,
        native_api="messages",
        adapter=lambda: AnthropicAdapter(decode_object(call.body), view.model, vision),
    )


def gemini_target(version: str, target: str) -> tuple[str, bool]:
    """The endpoint and whether it streams, from `models/{endpoint}:{method}`."""
    if version not in GEMINI_VERSIONS:
        raise NotFound(f"API version '{version[:40]}' is not served; use v1 or v1beta")
    endpoint, _, method = target.rpartition(":")
    if not endpoint or method not in _GEMINI_METHODS:
        raise NotFound(
            f"'{target[:200]}' is not served: use models/{{model}}:generateContent "
            "or :streamGenerateContent"
        )
    return endpoint, _GEMINI_METHODS[method]


async def gemini_generate(request: web.Request) -> web.StreamResponse:
    """POST .../models/{model}:generateContent and :streamGenerateContent, translated."""
    model, stream = gemini_target(request.match_info["version"], request.match_info["target"])
    call = await begin(request)
    if stream and request.query.get("alt", "sse") != "sse":
        raise InvalidRequest("streamGenerateContent is served as server-sent events: add ?alt=sse")
    content = decode_object(call.body)
    call.stream = stream
    vision = vision_of(request, model)
    return await serve_model(
        call,
        model,
        native_path="/v1/chat/completions",
        native_api=NEVER,
        adapter=lambda: GeminiAdapter(content, model, stream, vision),
    )
