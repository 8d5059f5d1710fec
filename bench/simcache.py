"""The simulated backend's prefix KV cache and its batch slots: what a request's prefill costs.

Pure and synchronous; bench/simprotocol.py asks them when a generation starts.

- `PrefixCache`: an LRU of prompt blocks (`block_bytes` of the prompt text each, 256 by
  default), keyed by a hash chained over every block before it, as vLLM's automatic prefix
  caching keys its KV blocks. A request's cached prefix is its leading full blocks found in
  the cache, up to the first miss; the blocks after it are computed (the prefill), and the
  request's full blocks are then held as most recently used, the last block least recent of
  them so that a prompt is evicted from its tail (vLLM frees a sequence's blocks in reverse
  order for the same reason). A partial last block is always computed and never kept: vLLM
  hashes and caches full blocks only. Capacity is in blocks; 0 switches the cache off.
- `Slots`: at most `limit` generations at once (a batch's sequences); the rest wait first in,
  first out. 0 switches the limit off.

The time to first token of a generation is then: its wait for a slot + the base TTFT +
`prefill_ms_per_block` x its uncached blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

BLOCK_BYTES = 256


def prompt_text(payload: dict[str, Any]) -> bytes:
    """The prompt as the cache sees it: each message's role and text content, in order."""
    parts: list[bytes] = []
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(
                    p["text"]
                    for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
            if isinstance(content, str):
                parts.append(f"<{message.get('role')}>{content}".encode())
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt.encode())
    return b"".join(parts)


def block_keys(text: bytes, block_bytes: int = BLOCK_BYTES) -> list[bytes]:
    """One key per block of `text` (the last may be partial), each hashing all before it."""
    keys, previous = [], b""
    for start in range(0, len(text), block_bytes):
        previous = hashlib.blake2b(
            previous + text[start : start + block_bytes], digest_size=12
        ).digest()
        keys.append(previous)
    return keys


class PrefixCache:
    """An LRU of prefix blocks with a capacity; hit and miss counts in blocks and requests."""

    def __init__(self, capacity_blocks: int, block_bytes: int = BLOCK_BYTES) -> None:
        self.capacity = capacity_blocks
        self.block_bytes = block_bytes
        self.blocks: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self.hit_blocks = self.miss_blocks = self.evicted = 0
        self.requests = self.full_hits = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def admit(self, text: bytes) -> int:
        """Look `text` up, then hold its full blocks as most recent; the number of blocks
        computed (a partial last block always is)."""
        keys = block_keys(text, self.block_bytes)
        full = keys[: len(text) // self.block_bytes]
        cached = 0
        for key in full:
            if key not in self.blocks:
                break
            cached += 1
        uncached = len(keys) - cached
        self.requests += 1
        self.hit_blocks += cached
        self.miss_blocks += uncached
        self.full_hits += uncached == 0
        for key in reversed(full):  # the first block ends most recent: evicted from the tail
            self.blocks[key] = None
            self.blocks.move_to_end(key)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
            self.evicted += 1
        return uncached

    def clear(self) -> None:
        self.blocks.clear()
        self.hit_blocks = self.miss_blocks = self.evicted = 0
        self.requests = self.full_hits = 0

    def as_dict(self) -> dict[str, Any]:
        total = self.hit_blocks + self.miss_blocks
        return {
            "capacity_blocks": self.capacity,
            "block_bytes": self.block_bytes,
            "used_blocks": len(self.blocks),
            "hit_blocks": self.hit_blocks,
            "miss_blocks": self.miss_blocks,
            "hit_rate": round(self.hit_blocks / total, 4) if total else None,
            "evicted_blocks": self.evicted,
            "requests": self.requests,
            "full_hit_requests": self.full_hits,
        }


class Slots:
    """At most `limit` holders at once (0: no limit); the others wait in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.waiting: deque[Callable[[], bool]] = deque()
        self.max_waiting = 0
        self.queued = 0  # requests that had to wait

    def acquire(self, grant: Callable[[], bool]) -> None:
        """Call `grant()` once a slot is free (now, or from `release`). `grant` returns False
        when its request has gone meanwhile, and the slot passes to the next one."""
        if self.limit <= 0 or self.active < self.limit:
            self.active += 1
            if not grant():
                self.release()
            return
        self.waiting.append(grant)
        self.queued += 1
        self.max_waiting = max(self.max_waiting, len(self.waiting))

    def release(self) -> None:
        self.active -= 1
        while self.waiting and (self.limit <= 0 or self.active < self.limit):
            grant = self.waiting.popleft()
            self.active += 1
            if grant():
                return
            self.active -= 1

    def reset(self) -> None:
        self.max_waiting = self.queued = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "active": self.active,
            "waiting": len(self.waiting),
            "max_waiting": self.max_waiting,
            "queued_requests": self.queued,
        }
