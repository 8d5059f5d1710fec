"""The fleet benchmark's workloads and the gateway configs it runs them through (pure).

- `fleet_request(i)`: the mixed load of the fleet part: mostly streams of two lengths, some
  non-streamed answers, each with an `X-Session-ID` from a pool (so `affinity` has keys).
- `shared_prefix_requests(...)`: llm-d's shared-prefix profile scaled down: many tenants, each
  with one long system prompt of its own, and conversations of a few turns on top of it
  (each turn carries the turns before it, as a chat client sends them).
- `gateway_yaml(...)`: one model over the simulated backends, with a policy.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import orjson

from bench.fleetload import Request

MODEL = "sim-model"
# Words for prompts: deterministic per seed, ~6 bytes each.
_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip


def text(rng: random.Random, size: int) -> str:
    """About `size` bytes of words drawn from `rng`."""
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)[:size]


def chat(messages: list[dict[str, str]], tokens: int, stream: bool) -> bytes:
    return orjson.dumps(
        {"model": MODEL, "messages": messages, "max_tokens": tokens, "stream": stream}
    )


# -- the fleet part ------------------------------------------------------------------------
SESSIONS = 256
FLEET_MIX = ((0.70, 24, True), (0.15, 4, True), (0.15, 16, False))  # share, tokens, stream


def fleet_request(index: int, seed: int = 9) -> Request:
    """Request `index` of the fleet part's mix (the same sequence for every policy)."""
    rng = random.Random(seed * 1_000_003 + index)
    draw, share_so_far = rng.random(), 0.0
    tokens, stream = FLEET_MIX[-1][1], FLEET_MIX[-1][2]
    for share, mix_tokens, mix_stream in FLEET_MIX:
        share_so_far += share
        if draw < share_so_far:
            tokens, stream = mix_tokens, mix_stream
            break
    session = f"session-{rng.randrange(SESSIONS)}"
    body = chat([{"role": "user", "content": f"{session}: {text(rng, 200)}"}], tokens, stream)
    return body, (("x-session-id", session),), stream


# -- the prefix-cache part -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PrefixProfile:
    """llm-d's shared-prefix profile (150 groups, 6,000-token system prompts) scaled down."""

    tenants: int = 48
    system_bytes: int = 8192  # 32 blocks of 256 bytes: ~2,000 tokens
    question_bytes: int = 200
    answer_bytes: int = 120  # what the client puts back in the history for each earlier turn
    turns: int = 4  # per conversation
    tokens: int = 8  # answer length (max_tokens)
    seed: int = 7

    def working_set_blocks(self, block_bytes: int) -> int:
        """The tenants' system prompts in blocks (the part every turn shares)."""
        return self.tenants * -(-self.system_bytes // block_bytes)


def shared_prefix_requests(profile: PrefixProfile, count: int) -> list[Request]:
    """`count` streamed requests: each from a tenant drawn uniformly, the next turn of that
    tenant's current conversation (a new one after `turns`)."""
    rng = random.Random(profile.seed)
    systems = [
        f"You are the assistant of tenant {t}. " + text(random.Random(t), profile.system_bytes)
        for t in range(profile.tenants)
    ]
    history: list[list[dict[str, str]]] = [[] for _ in range(profile.tenants)]
    out: list[Request] = []
    for _ in range(count):
        tenant = rng.randrange(profile.tenants)
        turns = history[tenant]
        if len(turns) >= 2 * profile.turns:
            turns.clear()
        turns.append({"role": "user", "content": text(rng, profile.question_bytes)})
        messages = [{"role": "system", "content": systems[tenant]}, *turns]
        out.append((chat(messages, profile.tokens, True), (), True))
        turns.append({"role": "assistant", "content": text(rng, profile.answer_bytes)})
    return out


_TENANT = re.compile(rb"You are the assistant of tenant (\d+)\.")


def tenant_of(body: bytes) -> int:
    """The tenant a `shared_prefix_requests` body belongs to (by its system prompt)."""
    found = _TENANT.search(body)
    return int(found.group(1)) if found else -1


def big_prompt_body(size: int = 32_000) -> bytes:
    """A non-streamed chat request with a ~`size`-byte prompt (~8,000 tokens at 4 bytes each)."""
    rng = random.Random(3)
    return chat([{"role": "user", "content": text(rng, size)}], 16, False)


# -- the gateway config --------------------------------------------------------------------
def gateway_yaml(
    port: int,
    backends: dict[str, int],
    policy: str,
    *,
    per_target_model: bool = True,
    placement: str = "auto",
) -> str:
    """One model, `sim-model`, over `backends` (name -> port), weight 1 each, with `policy`.

    With `per_target_model` each target sends its backend's own name as the upstream model,
    which the simulated backend echoes in every event: the client sees who answered.
    Health is probed every second and a backend whose requests fail three times in a row is
    ejected, so the figures show the gateway's reaction to a kill within the run.
    `placement`: `routing.key_placement`.
    """
    lines = [
        "server:",
        "  host: 127.0.0.1",
        f"  port: {port}",
        "  queue_timeout_s: 10",
        "timeouts:",
        "  request_s: 60",
        "  connect_s: 2",
        "health:",
        "  interval_s: 1",
        "  timeout_s: 0.5",
        "  healthy_threshold: 1",
        "  unhealthy_threshold: 2",
        "outlier_detection:",
        "  consecutive_failures: 3",
        "  base_ejection_s: 5",
        "  max_ejection_s: 60",
        "routing:",
        "  prefix_bytes: 2048",
        "  load_factor: 1.25",
        "  prefix_index_size: 10000",
        "  key_load_factor: 1",
        f"  key_placement: {placement}",
        "backends:",
    ]
    for name, backend_port in backends.items():
        lines += [
            f"  {name}:",
            f"    url: http://127.0.0.1:{backend_port}",
            "    kind: openai",
            "    health_path: /health",
        ]
    lines += ["models:", f"  {MODEL}:", f"    policy: {policy}", "    targets:"]
    for name in backends:
        lines.append(f"      - backend: {name}")
        if per_target_model:
            lines.append(f"        model: {name}")
        lines.append("        weight: 1")
    return "\n".join(lines) + "\n"
