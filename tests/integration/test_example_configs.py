"""conf/'s examples per backend kind: each passes --check, and each serves its models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from proxy.config import load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "conf").glob("*.yaml") if p.name != "proxy.yaml")
TEXTS = {p.name: p.read_text() for p in EXAMPLES}
DUMMY = "dummy-value-of-32-characters-xyz"  # long enough for the admin key and the pepper


def env_names(value: Any) -> set[str]:
    """The environment variables a config names (every `*_env` key's value)."""
    if isinstance(value, dict):
        return {
            n
            for k, v in value.items()
            for n in ({v} if str(k).endswith("_env") and isinstance(v, str) else env_names(v))
        }
    if isinstance(value, list):
        return {n for v in value for n in env_names(v)}
    return set()


def test_one_example_per_backend_kind() -> None:
    """conf/ has the five examples, docs/backends.md names each one, and together they use
    every kind but the generic openai one."""
    names = [p.name for p in EXAMPLES]
    assert {"fleet.yaml", "llamacpp.yaml", "ollama.yaml", "sglang.yaml", "vllm-tgi.yaml"} <= set(
        names
    )
    kinds = {b.kind for p in EXAMPLES for b in load_config(p.read_bytes()).backends.values()}
    assert {"vllm", "tgi", "ollama", "llamacpp", "sglang"} == kinds
    docs = (ROOT / "docs" / "backends.md").read_text()
    assert [n for n in names if f"conf/{n}" not in docs] == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_check(path: Path) -> None:
    """`inference-proxy --config FILE --check` exits 0, with the variables it names set."""
    names = env_names(yaml.safe_load(TEXTS[path.name]))
    env = {**os.environ, **dict.fromkeys(names, DUMMY)}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path), "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (0, "config ok\n", "") == (result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
async def test_example_serves_its_models(path: Path, gateway_factory, upstream, tmp_path) -> None:
    """With every backend pointed at a fake, the example lists its models and answers each
    one (chat or embeddings) with a client key, sending the target's upstream id and the
    backend's own key upstream."""
    raw = yaml.safe_load(TEXTS[path.name])
    for backend in raw["backends"].values():
        backend["url"] = upstream.url
    if "store" in raw.get("auth", {}):
        raw["auth"]["store"] = str(tmp_path / "keys.db")
    env = dict.fromkeys(env_names(raw), DUMMY)
    config = load_config(orjson.dumps(raw))
    gw = await gateway_factory(config, env)
    headers = {"Authorization": f"Bearer {DUMMY}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(gw.url + "/v1/models") as r:
            listed = {m["id"] for m in (await r.json())["data"]}
        assert set(config.models) == listed
        for name, model in config.models.items():
            embeddings = model.endpoint_type == "llm/v1/embeddings"
            route, body = (
                ("/v1/embeddings", {"model": name, "input": "hi"})
                if embeddings
                else ("/v1/chat/completions", {"model": name, "messages": []})
            )
            async with s.post(gw.url + route, json=body) as r:
                assert (name, 200) == (name, r.status)
            sent = upstream.last
            ids = {t.model or name for t in model.targets}
            assert orjson.loads(sent.body)["model"] in ids
            keyed = {config.backends[t.backend].api_key_env is not None for t in model.targets}
            if keyed == {True}:
                assert f"Bearer {DUMMY}" == sent.headers["authorization"]
            if keyed == {False}:
                assert "authorization" not in sent.headers
