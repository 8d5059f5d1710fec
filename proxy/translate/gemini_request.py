"""A Gemini generateContent request as the equivalent OpenAI chat-completions request.

google-genai sends camelCase keys, and some of the proto's snake_case names too (it sends
`inlineData: {"mime_type": ...}` and `parameters_json_schema`); other clients send snake_case
throughout. `JsonObject` reads either, and names the path of whatever is wrong.
"""

from __future__ import annotations

from proxy.errors import InvalidRequest
from proxy.translate.chat import dumps, stream_options
from proxy.translate.gemini_schema import json_schema
from proxy.translate.json_object import JsonObject

_PART_KINDS = (
    "text",
    "inlineData",
    "functionCall",
    "functionResponse",
    "fileData",
    "executableCode",
    "codeExecutionResult",
)
_OTHER_TOOLS = ("googleSearch", "googleSearchRetrieval", "codeExecution", "retrieval", "urlContext")
_MODES = {"AUTO": "auto", "MODE_UNSPECIFIED": "auto", "VALIDATED": "auto", "NONE": "none"}


def to_chat_request(
    body: object, *, upstream_model: str, stream: bool, vision: bool = False
) -> dict[str, object]:
    """The chat request for a decoded generateContent body; `InvalidRequest` if it is malformed.

    `stream` says which route the request came by (`:streamGenerateContent` or not).
    """
    request = JsonObject(body, "")
    contents, where = request.array("contents", required=True)
    if not contents:
        raise InvalidRequest(f"{where}: at least one content is required")
    messages = _system(request.obj("systemInstruction"))
    calls = _PendingCalls()
    for i, item in enumerate(contents):
        messages.extend(_turn(JsonObject(item, f"{where}[{i}]"), i, calls, vision))
    chat: dict[str, object] = {"model": upstream_model, "messages": messages}
    config = request.obj("generationConfig")
    if config is not None:
        chat.update(_generation(config))
    chat.update(_tools(request, request.obj("toolConfig")))
    if request.get("cachedContent")[0] is not None:
        raise InvalidRequest("cachedContent: cached contents are not supported by this gateway")
    chat.update(stream_options(stream))
    return chat


class _PendingCalls:
    """Gemini clients may answer a function call by name alone; chat needs the call's id."""

    def __init__(self) -> None:
        self._open: list[tuple[str, str]] = []  # (name, id) of calls not yet answered

    def called(self, name: str, call_id: str) -> None:
        self._open.append((name, call_id))

    def answered(self, name: str, call_id: str | None) -> str:
        for n, (open_name, open_id) in enumerate(self._open):
            if open_id == call_id or (call_id is None and open_name == name):
                del self._open[n]
                return open_id
        return call_id or f"call_{name}"


def _system(instruction: JsonObject | None) -> list[dict[str, object]]:
    if instruction is None:
        return []
    parts, where = instruction.array("parts", required=True)
    texts = []
    for j, item in enumerate(parts):
        text = JsonObject(item, f"{where}[{j}]").string("text")
        if text is None:
            raise InvalidRequest(f"{where}[{j}]: a system instruction holds text parts only")
        texts.append(text)
    text = "\n".join(texts)
    return [{"role": "system", "content": text}] if text else []


def _turn(
    content: JsonObject, i: int, calls: _PendingCalls, vision: bool
) -> list[dict[str, object]]:
    role = content.string("role") or "user"
    if role not in ("user", "model", "function", "tool"):
        raise InvalidRequest(f"{content.get('role')[1]}: unknown role {role!r}; use user or model")
    parts, where = content.array("parts", required=True)
    if not parts:
        raise InvalidRequest(f"{where}: at least one part is required")
    user = role != "model"
    texts: list[dict[str, object]] = []
    replies: list[dict[str, object]] = []
    tool_calls: list[dict[str, object]] = []
    for j, item in enumerate(parts):
        part = JsonObject(item, f"{where}[{j}]")
        kind = next((k for k in _PART_KINDS if part.has(k)), None)
        if kind is None:
            keys = ", ".join(sorted(part.value)) or "none"
            raise InvalidRequest(f"{part.path}: unknown part type (keys: {keys})")
        if kind == "text":
            if part.value.get("thought") is not True:  # the model's thoughts stay out of the prompt
                texts.append({"type": "text", "text": part.string("text")})
        elif kind == "inlineData" and user:
            texts.append(_image(part.child(kind), vision))
        elif kind == "functionCall" and not user:
            tool_calls.append(_call(part.child(kind), calls, f"call_{i}_{j}"))
        elif kind == "functionResponse" and user:
            replies.append(_reply(part.child(kind), calls))
        elif kind in ("inlineData", "functionCall", "functionResponse"):
            turn = "model" if kind == "functionCall" else "user"
            raise InvalidRequest(f"{part.path}: {kind} parts belong in {turn} turns")
        else:
            raise InvalidRequest(f"{part.path}: {kind} parts are not supported by this gateway")
    if not user:
        message: dict[str, object] = {"role": "assistant", "content": _text(texts)}
        if tool_calls:
            message["tool_calls"] = tool_calls
            message["content"] = message["content"] or None
        return [message]
    return replies + ([{"role": "user", "content": _content(texts)}] if texts else [])


def _image(data: JsonObject, vision: bool) -> dict[str, object]:
    mime = data.string("mimeType", required=True) or ""
    if not mime.startswith("image/"):
        raise InvalidRequest(f"{data.get('mimeType')[1]}: {mime!r} is not supported; only images")
    if not vision:
        raise InvalidRequest(f"{data.path}: image input needs a model with vision; this has none")
    url = f"data:{mime};base64,{data.string('data', required=True)}"
    return {"type": "image_url", "image_url": {"url": url}}


def _call(call: JsonObject, calls: _PendingCalls, fallback_id: str) -> dict[str, object]:
    name = call.string("name", required=True) or ""
    args = call.obj("args")
    call_id = call.string("id") or fallback_id
    calls.called(name, call_id)
    function = {"name": name, "arguments": dumps(args.value if args else {})}
    return {"id": call_id, "type": "function", "function": function}


def _reply(reply: JsonObject, calls: _PendingCalls) -> dict[str, object]:
    name = reply.string("name", required=True) or ""
    response = reply.obj("response")
    call_id = calls.answered(name, reply.string("id"))
    content = dumps(response.value if response else {})
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _text(parts: list[dict[str, object]]) -> str:
    return "\n".join(str(part["text"]) for part in parts)


def _content(parts: list[dict[str, object]]) -> object:
    """Plain text as one string (every backend reads that), else the list of parts."""
    return _text(parts) if all(part["type"] == "text" for part in parts) else parts


def _generation(config: JsonObject) -> dict[str, object]:
    count = config.number("candidateCount", whole=True)
    if count not in (None, 1):
        raise InvalidRequest(f"{config.get('candidateCount')[1]}: only 1 candidate is supported")
    stop, _ = config.array("stopSequences")
    for k, item in enumerate(stop):
        if not isinstance(item, str):
            raise InvalidRequest(f"{config.get('stopSequences')[1]}[{k}]: expected a string")
    chat: dict[str, object] = {"stop": stop} if stop else {}
    for name, key, whole in (
        ("maxOutputTokens", "max_tokens", True),
        ("temperature", "temperature", False),
        ("topP", "top_p", False),
        ("topK", "top_k", True),  # not OpenAI's, but vLLM, SGLang, TGI and llama.cpp read it
        ("presencePenalty", "presence_penalty", False),
        ("frequencyPenalty", "frequency_penalty", False),
        ("seed", "seed", True),
    ):
        value = config.number(name, whole=whole)
        if value is not None:
            chat[key] = value
    chat.update(_response_format(config))
    return chat


def _response_format(config: JsonObject) -> dict[str, object]:
    mime = config.string("responseMimeType")
    if mime in (None, "text/plain"):
        return {}
    if mime != "application/json":
        path = config.get("responseMimeType")[1]
        raise InvalidRequest(f"{path}: {mime!r} is not supported; use application/json")
    if (plain := config.obj("responseJsonSchema")) is not None:
        schema: object = plain.value
    elif (gemini := config.obj("responseSchema")) is not None:
        schema = json_schema(gemini.value, gemini.path)
    else:
        return {"response_format": {"type": "json_object"}}
    spec = {"name": "response", "schema": schema}
    return {"response_format": {"type": "json_schema", "json_schema": spec}}


def _tools(request: JsonObject, tool_config: JsonObject | None) -> dict[str, object]:
    specs: list[dict[str, object]] = []
    tools, where = request.array("tools")
    for i, item in enumerate(tools):
        tool = JsonObject(item, f"{where}[{i}]")
        other = next((k for k in _OTHER_TOOLS if tool.has(k)), None)
        if other is not None:
            raise InvalidRequest(f"{tool.path}.{other}: only functionDeclarations are supported")
        declarations, at = tool.array("functionDeclarations")
        specs.extend(_function(JsonObject(d, f"{at}[{k}]")) for k, d in enumerate(declarations))
    if not specs:
        return {}
    out: dict[str, object] = {"tools": specs}
    calling = tool_config.obj("functionCallingConfig") if tool_config else None
    if calling is not None:
        out["tool_choice"] = _tool_choice(calling)
    return out


def _tool_choice(calling: JsonObject) -> object:
    mode = (calling.string("mode") or "AUTO").upper()
    if mode == "ANY":
        allowed, where = calling.array("allowedFunctionNames")
        if len(allowed) != 1:
            return "required"
        if not isinstance(allowed[0], str):
            raise InvalidRequest(f"{where}[0]: expected a function name")
        return {"type": "function", "function": {"name": allowed[0]}}
    if mode not in _MODES:
        raise InvalidRequest(f"{calling.get('mode')[1]}: unknown mode {mode!r}")
    return _MODES[mode]


def _function(declaration: JsonObject) -> dict[str, object]:
    function: dict[str, object] = {"name": declaration.string("name", required=True)}
    description = declaration.string("description")
    if description is not None:
        function["description"] = description
    plain = declaration.obj("parametersJsonSchema")
    schema = declaration.obj("parameters")
    if plain is not None:
        function["parameters"] = plain.value
    elif schema is not None:
        function["parameters"] = json_schema(schema.value, schema.path)
    else:
        function["parameters"] = {"type": "object", "properties": {}}
    return {"type": "function", "function": function}
