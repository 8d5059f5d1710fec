"""README's Rate limits section: its config loads, and its 429 is what the gateway sends."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import orjson
import yaml

from proxy.ratelimit import LIMITER

README = Path(__file__).resolve().parents[2] / "README.md"


def section() -> str:
    text = README.read_text()
    return text.split("\n## Rate limits\n", 1)[1].split("\n## ", 1)[0]


async def test_readme_rate_limit_example(gateway_factory, upstream) -> None:
    """The section's YAML (its backend pointed at a fake) gives the section's 429: the same
    status, headers and body, after 60 requests whose answers reported 7 tokens each."""
    text = section()
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    config["backends"] = {"gpu-a": {"url": upstream.url, "kind": "vllm"}}
    head, body = re.search(r"```http\n(.*?)```", text, re.S).group(1).split("\n\n", 1)
    status_line, *header_lines = head.splitlines()
    expected = dict(line.split(": ", 1) for line in header_lines)
    gw = await gateway_factory(orjson.dumps(config).decode(), {"API_KEYS": "k"})
    gw.serving.runner.app[LIMITER].clock = lambda: 0.0  # no refill while the test runs
    request = orjson.dumps({"model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as s:
        for _ in range(60):
            async with s.post(gw.url + "/v1/chat/completions", data=request) as r:
                assert 200 == r.status
        async with s.post(gw.url + "/v1/chat/completions", data=request) as r:
            got = (r.status, {k: r.headers.get(k) for k in expected}, await r.json())
    assert (int(status_line.split()[1]), expected, orjson.loads(body)) == got
