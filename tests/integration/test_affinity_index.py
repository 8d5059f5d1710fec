"""`affinity`'s index of keys on real sockets: the README's example splits keys evenly, a
client with a new prefix per request only churns the index, and a key whose replica went
down moves once and stays where it moved."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import orjson

from tests.conftest import wait_for
from tests.fakes import json_script
from tests.integration.test_bad_input import call

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"


def readme_routing_example() -> str:
    """The YAML example of the README's "Routing a fleet" section, as printed."""
    section = (ROOT / "README.md").read_text().split("### Routing a fleet\n", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return textwrap.dedent(block)


def with_backends(example: str, urls: list[str], extra: str = "") -> str:
    backends = "".join(
        f"  gpu-{name}: {{url: '{url}', kind: vllm}}\n"
        for name, url in zip("abc", urls, strict=False)
    )
    return f"backends:\n{backends}{extra}{example}"


def body(text: str, model: str = "qwen") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "system", "content": text}]})


def served_by(gw) -> str:
    return json.loads(gw.access_lines()[-1])["backend"]


def test_the_readme_routing_example_passes_check(tmp_path) -> None:
    """The README's routing example, with its three backends named, is a valid config."""
    path = tmp_path / "proxy.yaml"
    path.write_text(with_backends(readme_routing_example(), ["http://127.0.0.1:9"] * 3))
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (0, "config ok\n") == (checked.returncode, checked.stdout)


async def test_the_readme_example_splits_sessions_evenly(gateway_factory, upstream_factory) -> None:
    """Behind the README's routing example, 30 sessions land 10 on each replica (the
    index's counts and the requests each fake got say the same), and each session's later
    requests go where its first went."""
    fakes = [await upstream_factory() for _ in range(3)]
    text = with_backends(readme_routing_example(), [f.url for f in fakes])
    gw = await gateway_factory(text)
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    first: dict[str, str] = {}
    for turn in range(2):
        for i in range(30):
            session = f"user-{i}"
            headers = {"X-Session-ID": session}
            assert 200 == (await call(gw.url + CHAT, body(f"turn {turn}"), headers))[0]
            assert first.setdefault(session, served_by(gw)) == served_by(gw)
    assert Counter({"gpu-a": 10, "gpu-b": 10, "gpu-c": 10}) == Counter(first.values())
    assert {"gpu-a": 10, "gpu-b": 10, "gpu-c": 10} == gw.state.prefix_index.counts
    assert [20, 20, 20] == [len(f.posts) for f in fakes]


async def test_a_new_prefix_per_request_only_churns_the_index(
    gateway_factory, upstream_factory
) -> None:
    """A key holder sending 150 requests, each with a prompt never seen before, leaves the
    index at its size (8) with counts that add up to it; a tenant that keeps its system
    prompt and comes back before 8 new keys have passed stays on one replica (it is the
    most recently used key each time); every answer is a 200."""
    fakes = [await upstream_factory() for _ in range(3)]
    example = readme_routing_example().replace("prefix_index_size: 10000", "prefix_index_size: 8")
    gw = await gateway_factory(with_backends(example, [f.url for f in fakes]))
    assert 8 == gw.state.config.routing.prefix_index_size
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    tenant: set[str] = set()
    for i in range(150):
        assert 200 == (await call(gw.url + CHAT, body(f"hostile prompt {i} " * 40)))[0]
        if i % 5 == 0:
            assert 200 == (await call(gw.url + CHAT, body("the tenant's system prompt " * 40)))[0]
            tenant.add(served_by(gw))
    assert 1 == len(tenant)
    assert 8 == len(gw.state.prefix_index) == sum(gw.state.prefix_index.counts.values())


async def test_a_key_moves_once_when_its_replica_goes_down(
    gateway_factory, upstream_factory
) -> None:
    """A session's replica fails its health probes: the session is served by another, and
    once the first is back it stays on the one that now holds its cache."""
    fakes = [await upstream_factory() for _ in range(3)]
    extra = "health: {interval_s: 0.05, timeout_s: 1, unhealthy_threshold: 1}\n"
    gw = await gateway_factory(
        with_backends(readme_routing_example(), [f.url for f in fakes], extra)
    )
    fleet = gw.state.fleet
    await wait_for(lambda: all(h.probed_up for h in fleet.values()))
    headers = {"X-Session-ID": "alice"}
    assert 200 == (await call(gw.url + CHAT, body("hi"), headers))[0]
    home = served_by(gw)
    sick = fakes["abc".index(home[-1])]
    sick.script["/health"] = json_script(503, {"status": "down"})
    await wait_for(lambda: not fleet[home].probed_up)
    assert 200 == (await call(gw.url + CHAT, body("hi"), headers))[0]
    moved = served_by(gw)
    assert moved != home
    del sick.script["/health"]
    await wait_for(lambda: fleet[home].probed_up)
    for _ in range(3):
        assert 200 == (await call(gw.url + CHAT, body("hi"), headers))[0]
        assert moved == served_by(gw)
    assert {home: 0, moved: 1} == {n: gw.state.prefix_index.counts[n] for n in (home, moved)}


async def test_a_fallback_model_places_the_key_for_its_own_targets(
    gateway_factory, upstream_factory
) -> None:
    """Both targets of an `affinity` model refuse connections, so its `affinity` fallback
    serves: the key is placed for the fallback's own targets (an index entry of its own),
    and the session's later requests go to the same one of them."""
    fakes = [await upstream_factory() for _ in range(2)]
    text = (
        "backends:\n"
        "  gpu-a: {url: 'http://127.0.0.1:9'}\n"
        "  gpu-b: {url: 'http://127.0.0.1:9'}\n"
        f"  gpu-c: {{url: '{fakes[0].url}'}}\n"
        f"  gpu-d: {{url: '{fakes[1].url}'}}\n"
        "outlier_detection: {consecutive_failures: 1000}\n"
        "models:\n"
        "  qwen:\n"
        "    policy: affinity\n"
        "    targets: [{backend: gpu-a}, {backend: gpu-b}]\n"
        "    fallbacks: [qwen-spare]\n"
        "  qwen-spare:\n"
        "    policy: affinity\n"
        "    targets: [{backend: gpu-c}, {backend: gpu-d}]\n"
    )
    gw = await gateway_factory(text)
    await wait_for(lambda: all(gw.state.fleet[n].probed_up for n in ("gpu-c", "gpu-d")))
    served = set()
    for _ in range(4):
        status, answer, _ = await call(gw.url + CHAT, body("hi"), {"X-Session-ID": "alice"})
        assert 200 == status, answer
        served.add(served_by(gw))
    assert 1 == len(served) and served <= {"gpu-c", "gpu-d"}, served
    assert 2 == len(gw.state.prefix_index)  # one entry for each model's targets
    assert 1 == gw.state.prefix_index.counts.get(served.pop())


async def test_a_prompt_keys_alike_on_every_surface_whatever_follows_it(
    gateway_factory, upstream_factory
) -> None:
    """The key is the prompt's value: the OpenAI route, MLflow's invocations and OICM's
    proxy give one key per conversation, whatever fields follow it (`max_tokens`, `n`), so
    each conversation has one index entry and one replica. Anthropic's own `system` comes
    before its messages: two conversations under one short system prompt are two keys."""
    fakes = [await upstream_factory() for _ in range(3)]
    gw = await gateway_factory(with_backends(readme_routing_example(), [f.url for f in fakes]))
    await wait_for(lambda: all(h.probed_up for h in gw.state.fleet.values()))
    for i in range(8):
        messages = [{"role": "user", "content": f"conversation {i}"}]
        sends = [
            (CHAT, {"model": "qwen", "messages": messages, "max_tokens": 4}),
            (CHAT, {"messages": messages, "model": "qwen", "n": 1}),
            ("/endpoints/qwen/invocations", {"messages": messages, "temperature": 0.5}),
            ("/models/qwen/proxy/v1/chat/completions", {"messages": messages, "seed": i}),
        ]
        backends = set()
        for path, payload in sends:
            assert 200 == (await call(gw.url + path, orjson.dumps(payload)))[0], path
            backends.add(served_by(gw))
        assert 1 == len(backends), (i, backends)
    assert 8 == len(gw.state.prefix_index)
    for text in ("first question", "second question"):
        anthropic = {"model": "qwen", "system": "Be brief.", "max_tokens": 8,
                     "messages": [{"role": "user", "content": text}]}  # fmt: skip
        await call(gw.url + "/anthropic/v1/messages", orjson.dumps(anthropic))  # the fake: 404
    assert 10 == len(gw.state.prefix_index)  # placed before the fake answered
