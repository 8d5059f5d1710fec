"""OICM's payloads on the chat route: TGI-style `inputs`, and chat requests with a `chat_template`.

`tgi_to_chat_request` turns `{"inputs", "parameters"?, ...}` into a chat request for an
OpenAI-style backend. `chat_template_to_completion_request` renders a chat request's own Jinja
`chat_template` (in the bounded sandbox of `proxy.translate.template`) into a `/v1/completions`
prompt for a backend that cannot apply a client's template itself; `completion_to_chat` and
`completion_chunk_to_chat_chunk` turn that backend's answer back into the chat shape the client
asked for.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import BackendUnreachable, InvalidRequest

# TGI generation parameters with a chat equivalent. TGI-only ones (top_k, repetition_penalty,
# typical_p, truncate, watermark, details, return_full_text, ...) have none and are left out.
_TGI_PARAMETERS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "frequency_penalty",
    "stream",
)
# The chat fields a completions request takes as they are.
_COMPLETION_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
)


def tgi_to_chat_request(body: object, *, upstream_model: str) -> dict[str, object]:
    """The chat request (one user message) that asks what a TGI-style payload asks.

    Generation parameters may sit at the top level or under `parameters`, as TGI puts them; the
    same one in both places with different values is a 400. `do_sample: false` is greedy
    decoding, so it becomes `temperature: 0`.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("body: expected an object")
    if not isinstance(body.get("inputs"), str):
        raise InvalidRequest("inputs: expected a string")
    nested = body.get("parameters")
    if nested is None:
        nested = {}
    elif not isinstance(nested, dict):
        raise InvalidRequest("parameters: expected an object")
    given: dict[str, tuple[str, Any]] = {}  # name -> (path, value)
    for key in _TGI_PARAMETERS:
        top, inner = body.get(key), nested.get(key)
        if top is not None and inner is not None and top != inner:
            raise InvalidRequest(f"parameters.{key}: differs from the top-level {key}")
        if inner is not None:
            given[key] = (f"parameters.{key}", inner)
        elif top is not None:
            given[key] = (key, top)
    chat: dict[str, object] = {
        "model": upstream_model,
        "messages": [{"role": "user", "content": body["inputs"]}],
    }
    if "max_new_tokens" in given:
        chat["max_tokens"] = _check(given["max_new_tokens"], _is_positive_int, "a positive integer")
    for key in ("temperature", "top_p", "frequency_penalty"):
        if key in given:
            chat[key] = _check(given[key], _is_number, "a number")
    if "seed" in given:
        chat["seed"] = _check(given["seed"], _is_int, "an integer")
    if "stop" in given:
        stop = _check(given["stop"], _is_stop, "a string or a list of strings")
        chat["stop"] = [stop] if isinstance(stop, str) else stop
    if "stream" in given:
        chat["stream"] = _check(given["stream"], _is_bool, "true or false")
    if "do_sample" in given and not _check(given["do_sample"], _is_bool, "true or false"):
        chat["temperature"] = 0
        chat.pop("top_p", None)
    return chat


def chat_template_to_completion_request(
    body: dict[str, object], *, upstream_model: str
) -> dict[str, object]:
    """The `/v1/completions` request whose prompt is the request's `chat_template` rendered.

    The template sees `messages` only, so a request with `tools` is refused rather than have its
    tools silently dropped.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("body: expected an object")
    for key in ("tools", "functions"):
        if body.get(key):
            raise InvalidRequest(
                f"{key}: not supported together with chat_template on this backend: the "
                "gateway renders the template with `messages` only"
            )
    template = body.get("chat_template")
    if not isinstance(template, str):
        raise InvalidRequest("chat_template: expected a string")
    # Jinja is imported by the first request that needs it: about 1 MiB of each worker's
    # memory that a gateway nobody sends a template to never pays.
    from proxy.translate.template import render_prompt

    prompt = render_prompt(template, body.get("messages"))
    completion: dict[str, object] = {"model": upstream_model, "prompt": prompt}
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        completion["max_tokens"] = body["max_completion_tokens"]
    completion.update((k, body[k]) for k in _COMPLETION_FIELDS if body.get(k) is not None)
    return completion


def completion_to_chat(completion: object) -> dict[str, object]:
    """A `text_completion` answer as the `chat.completion` the client asked the chat route for.

    An answer without a `choices` list is the backend's fault: `BackendUnreachable` (502).
    """
    body = completion if isinstance(completion, dict) else {}
    chat = _chat_envelope(body, "chat.completion")
    chat["choices"] = [
        {
            "index": c.get("index", 0),
            "finish_reason": c.get("finish_reason"),
            "message": {"role": "assistant", "content": c.get("text") or ""},
        }
        for c in _choices(body)
    ]
    return chat


def completion_chunk_to_chat_chunk(chunk: object) -> dict[str, object]:
    """One streamed `text_completion` chunk as a `chat.completion.chunk` (an error event as is)."""
    body = chunk if isinstance(chunk, dict) else {}
    if "error" in body:
        return body  # an error event passes as it came
    chat = _chat_envelope(body, "chat.completion.chunk")
    chat["choices"] = [
        {
            "index": c.get("index", 0),
            "finish_reason": c.get("finish_reason"),
            "delta": {"content": c.get("text") or ""},
        }
        for c in _choices(body)
    ]
    return chat


def _chat_envelope(body: dict[str, Any], kind: str) -> dict[str, object]:
    chat: dict[str, object] = {
        "id": body.get("id"),
        "object": kind,
        "created": body.get("created"),
        "model": body.get("model"),
    }
    if body.get("usage") is not None:
        chat["usage"] = body["usage"]
    return chat


def _choices(body: dict[str, Any]) -> list[dict[str, Any]]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise BackendUnreachable("backend sent a completion without a list of choices")
    return choices


def _check(given: tuple[str, Any], valid: Any, what: str) -> Any:
    path, value = given
    if not valid(value):
        raise InvalidRequest(f"{path}: expected {what}")
    return value


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_stop(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(s, str) for s in value)
    )
