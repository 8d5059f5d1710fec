"""Out of file descriptors: the gateway says so (503 overloaded) and blames no backend.

A gateway run with a hard open-files limit of a few dozen holds streams open one after
another until a backend connection cannot be opened. Which socket runs out first (a client's
accept or the backend connection) depends on how many descriptors the process started with,
so the scenario runs twice, once with one extra idle client connection held first.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

LIMIT = 48
FAILURES = 6  # more than outlier_detection.consecutive_failures (5): would have ejected it
STREAM = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


async def _slow_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    await asyncio.sleep(30)  # held open until the client (the gateway) closes
    return response


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _run(
    backend_url: str, extra_idle: int, work: Path
) -> tuple[list[dict[str, object]], str, str]:
    port = _free_port()
    config = work / f"proxy-{extra_idle}.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"backends: {{default: {{url: '{backend_url}', health_path: /health}}}}\n"
        "health: {interval_s: 0.1, timeout_s: 1}\n"  # probes run while descriptors are out
    )
    log_path = work / f"proxy-{extra_idle}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; nothing waits on it here)
        [sys.executable, "-m", "proxy", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        preexec_fn=_limited,
    )
    base = f"http://127.0.0.1:{port}"
    held: list[aiohttp.ClientResponse] = []
    sessions: list[aiohttp.ClientSession] = []
    errors: list[dict[str, object]] = []
    try:
        async with aiohttp.ClientSession() as probe:
            for _ in range(100):
                try:
                    async with probe.get(f"{base}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            for _ in range(extra_idle):  # an idle keep-alive connection: one descriptor
                idle = aiohttp.ClientSession()
                sessions.append(idle)
                async with idle.get(f"{base}/health") as r:
                    await r.read()
            for _ in range(LIMIT):
                s = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
                sessions.append(s)
                try:
                    r = await s.post(f"{base}/v1/chat/completions", data=STREAM)
                except (aiohttp.ClientError, TimeoutError):
                    break  # its accept found no descriptor: the client waits in the backlog
                if r.status != 200:
                    errors.append(await r.json())
                    for _ in range(FAILURES):  # again on the same connection: no new accept
                        async with s.post(f"{base}/v1/chat/completions", data=STREAM) as again:
                            errors.append(await again.json())
                    await asyncio.sleep(0.5)  # several health probes while still out
                    break
                held.append(r)
        for r in held:
            r.close()
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as after:
            async with after.get(f"{base}/metrics") as r:
                metrics = await r.text()
    finally:
        for s in sessions:
            await s.close()
        proc.terminate()
        proc.wait(10)
        log.close()
    return errors, metrics, log_path.read_text()


async def test_a_gateway_out_of_descriptors_answers_503_and_ejects_no_backend(
    aiohttp_server,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """Every request refused for want of a descriptor gets the `overloaded` envelope; the
    backend is neither ejected nor probed down (a probe that cannot open its connection is
    no verdict on the backend)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _slow_stream)
    app.router.add_get("/health", _ok)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    seen: list[dict[str, object]] = []
    for extra in (0, 1):
        errors, metrics, log = await _run(url, extra, tmp_path)
        seen += errors
        assert 'proxy_backend_ejections_total{backend="default"} ' not in metrics  # none
        if errors:  # it ran out while probes ran: none took the backend down
            assert "backend default is down" not in log, log
        assert 'proxy_backend_up{backend="default"} 1.0' in metrics
    assert seen, "no run reached the backend connection's limit"
    assert len(seen) == 1 + FAILURES  # each refused, none passed on to an ejected backend
    assert all(e["error"]["type"] == "overloaded" for e in seen)  # type: ignore[index]
    error = seen[0]["error"]
    assert isinstance(error, dict)
    assert error["type"] == "overloaded"
    assert "no file descriptor left for a backend connection" in str(error["message"])
