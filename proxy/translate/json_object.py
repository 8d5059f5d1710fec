"""A decoded JSON object of a request, read by key with its path kept for error messages.

Google's APIs take a field by its camelCase name or by the proto's snake_case one, so `get`
tries `maxOutputTokens` and then `max_output_tokens`. Every wrong value raises `InvalidRequest`
naming its path (`generationConfig.topK: expected a number, got string`).
"""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import InvalidRequest


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", r"_\1", name).lower()


def _kind(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


class JsonObject:
    """One JSON object of the request and its path (`""` for the body itself)."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise InvalidRequest(
                f"{path or 'request body'}: expected an object, got {_kind(value)}"
            )
        self.value: dict[str, Any] = value
        self.path = path

    def get(self, name: str) -> tuple[object, str]:
        key = name if name in self.value or _snake(name) not in self.value else _snake(name)
        return self.value.get(key), f"{self.path}.{key}" if self.path else key

    def has(self, name: str) -> bool:
        return self.get(name)[0] is not None

    def obj(self, name: str) -> JsonObject | None:
        value, path = self.get(name)
        return None if value is None else JsonObject(value, path)

    def child(self, name: str) -> JsonObject:
        value, path = self.get(name)
        if value is None:
            raise InvalidRequest(f"{path}: field required")
        return JsonObject(value, path)

    def array(self, name: str, *, required: bool = False) -> tuple[list[object], str]:
        value, path = self.get(name)
        if value is None and not required:
            return [], path
        if not isinstance(value, list):
            raise InvalidRequest(f"{path}: {_expected('an array', value)}")
        return value, path

    def string(self, name: str, *, required: bool = False) -> str | None:
        value, path = self.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise InvalidRequest(f"{path}: {_expected('a string', value)}")
        return value

    def number(self, name: str, *, whole: bool = False) -> int | float | None:
        value, path = self.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{path}: {_expected('a number', value)}")
        if not whole:
            return value
        if isinstance(value, float) and not value.is_integer():  # inf too
            raise InvalidRequest(f"{path}: expected a whole number, got {value}")
        if not -(2**63) <= value < 2**63:  # what a chat request carries (float() of more fails)
            raise InvalidRequest(f"{path}: expected a whole number of 64 bits or fewer")
        return int(value)


def _expected(what: str, value: object) -> str:
    return "field required" if value is None else f"expected {what}, got {_kind(value)}"
