"""How long a `/metrics` scrape takes when the gateway runs as workers (issue 10, item 6).

    python -m bench.scrape                  # 2 workers, 100 models, 100 timed scrapes
    python -m bench.scrape --models 20 --scrapes 20

Starts, on loopback, the simulated backend serving `--models` model ids and three gateway
setups with one model entry per id: one process (no worker variables: the default);
`--workers` processes started here as the workers of one run directory, each on its own port
(every scrape lands on worker 0, which merges its peers'); and `server.workers: N` under the
real supervisor on one port (each scrape lands on whichever worker the kernel picks). Sends
every model plain and streamed chats and a completion through each setup, so every family has
a series per model, then times `--scrapes` sequential scrapes of each and prints one table
with the requests sent beside those the last scrape counted. Every process is stopped by its
PID (the supervisor stops its own workers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from bench.aio import run
from bench.processes import Service, free_port, start, stop
from bench.stats import summarize
from bench.streamload import chat_body
from proxy.workermetrics import RUN_DIR_ENV, WORKER_ENV, WORKERS_ENV


def gateway_yaml(models: int, backend_port: int) -> str:
    lines = ["backends:", f"  sim: {{url: 'http://127.0.0.1:{backend_port}', kind: vllm}}"]
    lines.append("models:")
    lines += [f"  {name}: {{targets: [{{backend: sim}}]}}" for name in model_names(models)]
    return "\n".join(lines) + "\n"


def model_names(models: int) -> list[str]:
    return [f"model-{i:03d}" for i in range(models)]


async def traffic(urls: list[str], models: int, per_model: int) -> int:
    """`per_model` plain and streamed chats and a completion per model, through every URL."""
    bodies = []
    for name in model_names(models):
        bodies += [
            ("/v1/chat/completions", chat_body(8, model=name, stream=s)) for s in (False, True)
        ]
        bodies.append(("/v1/completions", orjson.dumps({"model": name, "prompt": "hi"})))
    jobs = [(url + path, body) for url in urls for path, body in bodies for _ in range(per_model)]
    limit = asyncio.Semaphore(32)

    async def send(session: aiohttp.ClientSession, url: str, body: bytes) -> None:
        async with limit, session.post(url, data=body) as r:
            await r.read()
            if r.status != 200:
                raise SystemExit(f"{url}: {r.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(send(session, url, body) for url, body in jobs))
    return len(jobs)


async def time_scrapes(url: str, scrapes: int) -> tuple[list[float], bytes]:
    """Each scrape's milliseconds, and the last scrape's body."""
    took: list[float] = []
    body = b""
    async with aiohttp.ClientSession() as session:
        for i in range(scrapes + 3):  # three to warm up
            start = time.perf_counter()
            async with session.get(url + "/metrics") as r:
                body = await r.read()
            if i >= 3:
                took.append((time.perf_counter() - start) * 1000)
    return took, body


async def all_answer(url: str, workers: int, within_s: float = 30.0) -> None:
    """Wait until a scrape says every worker answered (the supervisor starts them in turn)."""
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/metrics") as r:
                if value(await r.read(), b"proxy_workers_answered ") == workers:
                    return
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url}: not every worker answered within {within_s:.0f} s")


def value(body: bytes, prefix: bytes, having: bytes = b"") -> float:
    """The sum of the sample lines that start with `prefix` and contain `having`."""
    return sum(
        float(line.rsplit(b" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(prefix) and having in line
    )


@dataclass
class Setup:
    label: str
    services: list[Service]
    traffic_urls: list[str]  # where requests go
    scrape_url: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--per-model", type=int, default=2, help="requests of each kind")
    parser.add_argument("--scrapes", type=int, default=100)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    run_dir = tempfile.mkdtemp(prefix="ipm-", dir="/tmp")
    os.chmod(run_dir, 0o700)
    services: list[Service] = []
    n = args.workers
    try:
        backend_port = free_port()
        names = ",".join(model_names(args.models))
        services.append(
            start(
                "simbackend",
                [sys.executable, "-m", "bench.simbackend", "--port", str(backend_port),
                 "--model", names],
                port=backend_port, cpu=None, log_dir=work, health_path="/v1/models",
            )
        )  # fmt: skip
        config = work / "proxy.yaml"
        config.write_text(gateway_yaml(args.models, backend_port))
        supervised = work / "supervised.yaml"
        supervised.write_text(
            f"server: {{workers: {n}}}\n" + gateway_yaml(args.models, backend_port)
        )

        def gateway(name: str, path: Path, env: dict[str, str]) -> Service:
            port = free_port()
            argv_ = [sys.executable, "-m", "proxy", "--config", str(path), "--port", str(port)]
            service = start(name, argv_, port=port, cpu=None, log_dir=work, env=env)
            services.append(service)
            return service

        alone = gateway("alone", config, {})
        workers = [
            gateway(
                f"worker-{i}",
                config,
                {
                    WORKER_ENV: str(i),
                    WORKERS_ENV: str(n),
                    RUN_DIR_ENV: run_dir,
                    "INFERENCE_PROXY_SUPERVISOR": str(os.getpid()),  # we stand in for it
                },
            )
            for i in range(n)
        ]
        under = gateway("supervised", supervised, {})
        run(all_answer(under.url, n))
        setups = [
            Setup("1 process", [alone], [alone.url], alone.url),
            Setup(f"{n} workers, own ports (on worker 0)", workers, [w.url for w in workers],
                  workers[0].url),
            Setup(f"{n} workers, supervisor's one port", [under], [under.url], under.url),
        ]  # fmt: skip
        rows = []
        for setup in setups:
            sent = run(traffic(setup.traffic_urls, args.models, args.per_model))
            took, body = run(time_scrapes(setup.scrape_url, args.scrapes))
            counted = value(body, b"proxy_requests_total{", b'route="/v1/')
            answered = (
                f"{value(body, b'proxy_workers_answered '):.0f}/{n}"
                if b"proxy_workers_answered " in body
                else "-"
            )
            samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            rows.append((setup.label, samples, len(body), summarize(took), sent, counted, answered))
        print(
            f"/metrics scrape time, {args.models} models, {args.scrapes} sequential scrapes "
            f"each (ms); 'counted' is proxy_requests_total's sum in the last scrape\n"
        )
        head = (
            f"{'setup':<38} {'samples':>8} {'KiB':>5} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}"
        )
        print(f"{head} {'sent':>6} {'counted':>7} {'answered':>8}")
        for label, samples, size, stats, sent, counted, answered in rows:
            print(
                f"{label:<38} {samples:>8} {size / 1024:>5.0f} {stats['p50']:>6.1f} "
                f"{stats['p90']:>6.1f} {stats['p99']:>6.1f} {stats['max']:>6.1f} "
                f"{sent:>6} {counted:>7.0f} {answered:>8}"
            )
    finally:
        for service in reversed(services):
            stop(service)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
