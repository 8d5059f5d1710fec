"""Run a coroutine on uvloop when it is installed, else on asyncio's own loop."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    if importlib.util.find_spec("uvloop") is None:
        return asyncio.run(coro)
    import uvloop  # imported here: optional, and found just above

    result: T = uvloop.run(coro)
    return result
