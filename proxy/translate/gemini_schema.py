"""Gemini's `Schema` objects (an OpenAPI subset) as the JSON Schema chat backends read.

The differences that matter: type names are upper case in some clients (`"OBJECT"`), `nullable`
is a flag rather than a `"null"` type, `propertyOrdering` is Gemini's own, and snake_case
clients spell keywords `any_of` or `max_items`.
"""

from __future__ import annotations

import re

from proxy.errors import InvalidRequest

_GEMINI_ONLY = frozenset({"propertyOrdering", "nullable"})


def json_schema(value: object, path: str) -> dict[str, object]:
    """The JSON Schema for a Gemini `Schema`; `InvalidRequest` naming `path` if it is malformed."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"{path}: expected a schema object")
    schema = {_camel(key): item for key, item in value.items()}
    out: dict[str, object] = {k: v for k, v in schema.items() if k not in _GEMINI_ONLY}
    if "type" in schema:
        kind = _type(schema["type"], f"{path}.type")
        if kind is None:
            del out["type"]
        else:
            out["type"] = kind
    if schema.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in schema:
        properties = schema["properties"]
        if not isinstance(properties, dict):
            raise InvalidRequest(f"{path}.properties: expected an object")
        out["properties"] = {
            name: json_schema(item, f"{path}.properties.{name}")
            for name, item in properties.items()
        }
    if "items" in schema:
        out["items"] = json_schema(schema["items"], f"{path}.items")
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not isinstance(options, list):
            raise InvalidRequest(f"{path}.anyOf: expected an array")
        out["anyOf"] = [json_schema(item, f"{path}.anyOf[{n}]") for n, item in enumerate(options)]
    return out


def _type(value: object, path: str) -> str | list[str] | None:
    if isinstance(value, str):
        kind = value.lower()
        return None if kind == "type_unspecified" else kind
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.lower() for item in value]
    raise InvalidRequest(f"{path}: expected a type name such as 'OBJECT' or 'string'")


def _camel(key: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m[1].upper(), key) if "_" in key else key
