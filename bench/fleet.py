"""`make bench-fleet`: issue 9's figures: a fleet under a kill, a prefix cache, routing's cost.

    python -m bench.fleet                   # every part (about 4.5 minutes)
    python -m bench.fleet --parts cost      # one part: fleet, prefix, cost, index (comma list)
    python -m bench.fleet --quick           # a smoke run of every part (about 2 minutes)

Every process is started here, on loopback, and stopped by its PID: the simulated backends
(`python -m bench.simbackend`) and this client on CPU 0, the gateway (`python -m proxy
--config <generated yaml>`) on CPU 1. Prints one table per part, writes bench/out/fleet.json
and replaces the "Fleet" section of bench/RESULTS.md (full runs).

- fleet: 3 backends of unequal speed behind one model; a bounded closed-loop mix of streams
  and plain answers; the fastest backend SIGKILLed mid-run. Per policy: each backend's share,
  failures by how far they got, TTFT p99.
- prefix: 3 equal backends with a prefix KV cache model (bench/simcache.py); a scaled-down
  shared-prefix workload at a fixed arrival rate; cache capacity below the working set
  (pressure) and above it (control). Per policy: hit rate, TTFT p50/p90/p99, the busiest
  backend's share, and issue 9's targets.
- cost: the gateway's CPU-us per request (from /proc, as bench/run.py) in the S1 shape (wrk, 64
  connections, non-streamed, 16 tokens) for each policy over 2 targets, beside the one-backend
  `--backend` gateway, and with an ~8,000-token (32 KB) prompt; three interleaved rounds of
  every case, each case's median kept (one round of 6 s spreads by about 5 us).
- index: in process, no sockets (bench/fleetindex.py): µs per request of `affinity`'s key, its
  index and its order beside `least_loaded`'s order, with a key the index holds and with a new
  key every call; the index's memory full and after a flood of new keys.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import fleetload, fleetreport
from bench.aio import run
from bench.fleetindex import index_part
from bench.fleetwork import (
    PrefixProfile,
    big_prompt_body,
    fleet_request,
    gateway_yaml,
    shared_prefix_requests,
    tenant_of,
)
from bench.processes import Service, free_port, http_get, start, stop
from bench.procstat import CpuWindow, MachineBusy, wait_quiet
from bench.scenarios import LOAD_CPU, PROXY_CPU, ROOT
from bench.stats import summarize
from bench.streamload import chat_body, raise_nofile_limit
from bench.wrk import run_wrk

POLICIES = ("weighted", "least_loaded", "affinity")
# The prefix part's pressure run also runs `affinity` thus: (label, key_placement, gateways);
# with two gateways a coin sends each request to one of them (issue 9's point 8).
PLACEMENTS = (
    ("affinity, agreed", "agreed", 1),
    ("affinity, 2 gateways, sticky", "sticky", 2),
    ("affinity, 2 gateways, agreed", "agreed", 2),
)


@dataclass(frozen=True, slots=True)
class Sim:
    """One simulated backend: its name (also its upstream model id) and its speed."""

    name: str
    ttft_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    extra: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    fleet_s: float = 20.0
    fleet_workers: int = 32
    kill_at: float = 0.4  # of fleet_s
    prefix_s: float = 20.0
    cost_s: float = 4.0
    cost_rounds: int = 3  # each case measured this many times, interleaved; the median is kept
    warmup_s: float = 1.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(fleet_s=8.0, prefix_s=6.0, cost_s=2.0, cost_rounds=1, warmup_s=0.5)


FLEET_SIMS = (  # fast, medium, slow; the fast one is killed
    Sim("sim-fast", ttft_ms=20, chunk_delay_ms=5),
    Sim("sim-medium", ttft_ms=50, chunk_delay_ms=10),
    Sim("sim-slow", ttft_ms=100, chunk_delay_ms=20),
)
# The prefix part's backends: equal; 4 sequences at once; 5 ms of prefill per uncached block.
PREFIX_SLOTS, PREFILL_MS, PREFIX_TTFT_MS, PREFIX_GAP_MS, BLOCK = 4, 5.0, 20.0, 10.0, 256
PRESSURE, CONTROL = 0.4, 2.0  # each backend's cache capacity, times the working set
LOAD_SHARE = 0.8  # arrival rate, as a share of the fleet's capacity when every block misses


class Harness:
    """The processes of the current part, and where their logs go."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.services: list[Service] = []

    def sims(self, sims: tuple[Sim, ...], extra: tuple[str, ...] = ()) -> dict[str, Service]:
        out = {}
        for sim in sims:
            port = free_port()
            argv = [
                sys.executable, "-m", "bench.simbackend", f"--port={port}",
                f"--model={sim.name},sim-model", f"--ttft-ms={sim.ttft_ms}",
                f"--chunk-delay-ms={sim.chunk_delay_ms}", "--keepalive-s=30", *sim.extra, *extra,
            ]  # fmt: skip
            out[sim.name] = start(
                sim.name, argv, port=port, cpu=LOAD_CPU, log_dir=self.work, cwd=ROOT
            )
            self.services.append(out[sim.name])
        return out

    def gateway(self, name: str, yaml_text: str | None, backend_url: str = "") -> Service:
        port = free_port()
        if yaml_text is None:
            argv = ["--backend", backend_url, "--host", "127.0.0.1", "--port", str(port)]
        else:
            config = self.work / f"{name}.yaml"
            config.write_text(yaml_text.replace("port: 0\n", f"port: {port}\n", 1))
            argv = ["--config", str(config)]
        service = start(
            name,
            [sys.executable, "-m", "proxy", *argv],
            port=port,
            cpu=PROXY_CPU,
            log_dir=self.work,
            cwd=ROOT,
            health_path="/ready",  # every backend probed up
        )
        self.services.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.services):
            stop(service)
        self.services.clear()


def sim_stats(service: Service) -> dict[str, Any]:
    stats: dict[str, Any] = orjson.loads(http_get(service.host, service.port, "/sim/stats"))
    return stats


def sim_reset(service: Service) -> None:
    import http.client  # the one POST of this module

    conn = http.client.HTTPConnection(service.host, service.port, timeout=5)
    try:
        conn.request("POST", "/sim/reset")
        conn.getresponse().read()
    finally:
        conn.close()


def gateway_counters(service: Service, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of a few of the gateway's own series, from its /metrics."""
    text = http_get(service.host, service.port, "/metrics", timeout_s=5).decode()
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + "{") or line.startswith(name + " "):
                sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def decisions(service: Service) -> dict[str, float]:
    """proxy_routing_decisions_total by reason (affinity, rebalanced, least_loaded...)."""
    text = http_get(service.host, service.port, "/metrics", timeout_s=5).decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("proxy_routing_decisions_total{") and 'reason="' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def shares(outcomes: list[fleetload.Outcome]) -> dict[str, float]:
    counted = [o.backend for o in outcomes if o.backend]
    names = sorted(set(counted))
    return {n: round(counted.count(n) / len(counted), 3) for n in names} if counted else {}


def failures(outcomes: list[fleetload.Outcome]) -> dict[str, int]:
    out = {"before_head": 0, "after_head": 0, "mid_stream": 0}
    for o in outcomes:
        if o.failure:
            out[o.failure] += 1
    return out


def details(outcomes: list[fleetload.Outcome]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        if o.failure:
            key = f"{o.failure}: {o.detail}"
            out[key] = out.get(key, 0) + 1
    return out


def ttft(outcomes: list[fleetload.Outcome]) -> dict[str, float]:
    return summarize([o.ttft_ms for o in outcomes if o.stream and not o.failure and o.ttft_ms])


# -- part 1: the fleet ---------------------------------------------------------------------
def fleet_part(settings: Settings, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"backends": [asdict(s) for s in FLEET_SIMS], "policies": {}}
    for policy in POLICIES:
        harness = Harness(work)
        try:
            sims = harness.sims(FLEET_SIMS)
            ports = {name: s.port for name, s in sims.items()}
            gw = harness.gateway(f"gateway-fleet-{policy}", gateway_yaml(0, ports, policy))
            victim = sims[FLEET_SIMS[0].name]
            with MachineBusy() as busy:
                outcomes, killed_at = run(_fleet_load(gw, victim, settings))
            counters = gateway_counters(
                gw, ("proxy_retries_total", "proxy_backend_ejections_total")
            )
            chosen = decisions(gw)
        finally:
            harness.stop_all()
        after = [o for o in outcomes if o.started >= killed_at]
        out["policies"][policy] = {
            "requests": len(outcomes),
            "share": shares(outcomes),
            "share_after_kill": shares(after),
            "failed": failures(outcomes),
            "failure_details": details(outcomes),
            "ttft_ms": ttft(outcomes),
            "ttft_ms_after_kill": ttft(after),
            "gateway": counters,
            "decisions": chosen,
            "cpu_busy": busy.busy,
        }
        print(f"fleet/{policy}: {fleetreport.brief(out['policies'][policy])}", file=sys.stderr)
    return out


async def _fleet_load(
    gw: Service, victim: Service, settings: Settings
) -> tuple[list[fleetload.Outcome], float]:
    import asyncio

    pool = fleetload.Pool(gw.host, gw.port)
    killed_at = [float("inf")]

    async def kill_later() -> None:
        await asyncio.sleep(settings.fleet_s * settings.kill_at)
        killed_at[0] = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)  # the one backend we started for this

    killer = asyncio.create_task(kill_later())  # awaited below
    try:
        outcomes = await fleetload.closed_loop(
            pool,
            fleet_request,
            workers=settings.fleet_workers,
            duration_s=settings.fleet_s,
            max_requests=50_000,
            timeout_s=30.0,
        )
    finally:
        await killer
        pool.close()
    return outcomes, killed_at[0]


# -- part 2: the prefix cache --------------------------------------------------------------
def _share_above(outcomes: list[fleetload.Outcome], ms: float) -> float | None:
    """The share of answered streams whose first token took longer than `ms`."""
    times = [o.ttft_ms for o in outcomes if o.stream and not o.failure and o.ttft_ms]
    return round(sum(t > ms for t in times) / len(times), 4) if times else None


def _second_half(outcomes: list[fleetload.Outcome], count: int) -> list[fleetload.Outcome]:
    """The outcomes of the requests sent in the second half of a run of `count`."""
    return [o for o in outcomes if o.index >= count // 2]


def homes(outcomes: list[fleetload.Outcome], tenants: list[int]) -> dict[str, int]:
    """How many tenants each backend served most of the requests of (affinity: their home)."""
    seen: dict[int, dict[str, int]] = {}
    for o in outcomes:
        if o.backend and o.index >= 0:
            counts = seen.setdefault(tenants[o.index], {})
            counts[o.backend] = counts.get(o.backend, 0) + 1
    out: dict[str, int] = {}
    for counts in seen.values():
        home = max(sorted(counts), key=counts.__getitem__)
        out[home] = out.get(home, 0) + 1
    return dict(sorted(out.items()))


def prefix_part(settings: Settings, work: Path) -> dict[str, Any]:
    profile = PrefixProfile()
    working_set = profile.working_set_blocks(BLOCK)
    miss_s = (
        PREFIX_TTFT_MS
        + PREFILL_MS * -(-(profile.system_bytes + profile.question_bytes) // BLOCK)
        + PREFIX_GAP_MS * (profile.tokens - 1)
    ) / 1000
    rate = round(LOAD_SHARE * 3 * PREFIX_SLOTS / miss_s, 1)
    full_prefill_ms = PREFILL_MS * -(-profile.system_bytes // BLOCK)
    count = int(rate * settings.prefix_s)
    requests = shared_prefix_requests(profile, count)
    tenants = [tenant_of(body) for body, _, _ in requests]
    out: dict[str, Any] = {
        "profile": asdict(profile),
        "working_set_blocks": working_set,
        "backend": {
            "slots": PREFIX_SLOTS,
            "prefill_ms_per_block": PREFILL_MS,
            "ttft_ms": PREFIX_TTFT_MS,
            "chunk_delay_ms": PREFIX_GAP_MS,
            "block_bytes": BLOCK,
        },
        "rate_per_s": rate,
        "requests": count,
        "tenants_seen": len(set(tenants)),  # each one's first request finds nothing cached
        "system_prompts_per_cache": {
            run: int(working_set * factor) // -(-profile.system_bytes // BLOCK)
            for run, factor in (("pressure", PRESSURE), ("control", CONTROL))
        },
        "runs": {},
    }
    sims = tuple(Sim(f"sim-{c}", PREFIX_TTFT_MS, PREFIX_GAP_MS) for c in "abc")
    for run_name, factor in (("pressure", PRESSURE), ("control", CONTROL)):
        capacity = int(working_set * factor)
        extra = (
            f"--prefix-cache-blocks={capacity}",
            f"--prefill-ms-per-block={PREFILL_MS}",
            f"--slots={PREFIX_SLOTS}",
            f"--block-bytes={BLOCK}",
        )
        harness = Harness(work)
        runs: dict[str, Any] = {"capacity_blocks": capacity, "policies": {}}
        try:
            backends = harness.sims(sims, extra)
            ports = {name: s.port for name, s in backends.items()}
            cases = [(p, p, "auto", 1) for p in POLICIES]
            if run_name == "pressure":
                cases += [(label, "affinity", how, n) for label, how, n in PLACEMENTS]
            for policy, policy_name, placement, count_gw in cases:
                for backend in backends.values():
                    sim_reset(backend)
                yaml_text = gateway_yaml(0, ports, policy_name, placement=placement)
                gws = tuple(
                    harness.gateway(f"gateway-{run_name}-{policy_name}-{placement}-{g}", yaml_text)
                    for g in range(count_gw)
                )
                with MachineBusy() as busy:
                    outcomes, shed = run(_open_load(gws, requests, rate))
                stats = {n: sim_stats(b) for n, b in backends.items()}
                chosen: dict[str, float] = {}
                for gw in gws:
                    for reason, n in decisions(gw).items():
                        chosen[reason] = chosen.get(reason, 0.0) + n
                    stop(gw)
                hits = sum(s["prefix_cache"]["hit_blocks"] for s in stats.values())
                misses = sum(s["prefix_cache"]["miss_blocks"] for s in stats.values())
                share = shares(outcomes)
                runs["policies"][policy] = {
                    "ok": sum(1 for o in outcomes if not o.failure),
                    "failed": failures(outcomes),
                    "shed": shed,
                    "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
                    "ttft_ms": ttft(outcomes),
                    "share": share,
                    "busiest_share": max(share.values()) if share else None,
                    "tenant_homes": homes(outcomes, tenants),
                    "decisions": chosen,
                    "max_waiting": {n: s["slots"]["max_waiting"] for n, s in stats.items()},
                    "hit_rate_by_backend": {
                        n: s["prefix_cache"]["hit_rate"] for n, s in stats.items()
                    },
                    "full_prefill_share": _share_above(outcomes, full_prefill_ms / 2),
                    # the requests of the run's second half: past the tenants' arrival
                    "second_half": {
                        "ttft_ms": ttft(later := _second_half(outcomes, len(requests))),
                        "full_prefill_share": _share_above(later, full_prefill_ms / 2),
                    },
                    "cpu_busy": busy.busy,
                }
                note = fleetreport.brief(runs["policies"][policy])
                print(f"prefix/{run_name}/{policy}: {note}", file=sys.stderr)
        finally:
            harness.stop_all()
        out["runs"][run_name] = runs
    out["targets"] = fleetreport.prefix_targets(out)
    return out


async def _open_load(
    gws: tuple[Service, ...], requests: list[fleetload.Request], rate: float
) -> tuple[list[fleetload.Outcome], int]:
    """`requests` at `rate`, each to one of `gws` at random."""
    pools = tuple(fleetload.Pool(gw.host, gw.port) for gw in gws)
    try:
        return await fleetload.open_loop(
            pools, requests, rate_per_s=rate, max_outstanding=512, timeout_s=30.0
        )
    finally:
        for pool in pools:
            pool.close()


# -- part 3: the cost ----------------------------------------------------------------------
def cost_part(settings: Settings, work: Path) -> dict[str, Any]:
    small = chat_body(16, stream=False)
    big = big_prompt_body()
    # Each case beside the one-backend gateway (`--backend`, today's S1 path) with the same body.
    base, base_big = "one backend (--backend)", "one backend (--backend), 32 KB prompt"
    cases = [
        (base, None, small, None),
        *((f"{p}, 2 targets", p, small, base) for p in POLICIES),
        (base_big, None, big, None),
        ("least_loaded, 2 targets, 32 KB prompt", "least_loaded", big, base_big),
        ("affinity, 2 targets, 32 KB prompt", "affinity", big, base_big),
    ]
    out: dict[str, Any] = {
        "body_bytes": {"small": len(small), "big": len(big)},
        "rounds": settings.cost_rounds,
        "cases": {},
    }
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in cases}
    harness = Harness(work)
    try:
        sims = harness.sims((Sim("sim-a"), Sim("sim-b")))
        ports = {name: s.port for name, s in sims.items()}
        for round_no in range(settings.cost_rounds):  # interleaved: drift hits every case alike
            for label, policy, body, _ in cases:
                if policy is None:
                    name = f"gateway-cost-one-{len(body)}-{round_no}"
                    gw = harness.gateway(name, None, sims["sim-a"].url)
                else:
                    yaml_text = gateway_yaml(0, ports, policy, per_target_model=False)
                    gw = harness.gateway(f"gateway-cost-{policy}-{len(body)}-{round_no}", yaml_text)
                runs[label].append(_cost_run(settings, gw, body))
                stop(gw)
                print(f"cost/{label}, round {round_no + 1}: {fleetreport.brief(runs[label][-1])}",
                      file=sys.stderr)  # fmt: skip
    finally:
        harness.stop_all()
    for label, _, _, reference in cases:
        out["cases"][label] = _cost_summary(runs[label], reference)
    return out


def _cost_run(settings: Settings, gw: Service, body: bytes) -> dict[str, Any]:
    """One round of one case: wrk's warm-up, then its measured run with the gateway's CPU."""
    url = f"{gw.url}/v1/chat/completions"
    run_wrk(url, body, connections=64, duration_s=settings.warmup_s, cpu=LOAD_CPU)
    quiet = wait_quiet(PROXY_CPU)
    with CpuWindow(gw.pid) as cpu, MachineBusy() as busy:
        wrk = run_wrk(url, body, connections=64, duration_s=settings.cost_s, cpu=LOAD_CPU)
    requests = wrk["requests"]
    return {
        "requests": requests,
        "requests_per_s": wrk["requests_per_s"],
        "errors": wrk["errors"],
        "latency_ms": wrk["latency_ms"],
        "cpu_us_per_request": round(cpu.cpu_s * 1e6 / requests, 2) if requests else None,
        "proxy_cpu_busy_before": quiet,
        "cpu_busy": busy.busy,
    }


def _cost_summary(rounds: list[dict[str, Any]], reference: str | None) -> dict[str, Any]:
    """A case over its rounds: the median CPU per request (and each round's), summed counts."""
    cpu = [r["cpu_us_per_request"] for r in rounds if r["cpu_us_per_request"] is not None]
    return {
        "reference": reference,
        "requests": sum(r["requests"] for r in rounds),
        "requests_per_s": statistics.median(r["requests_per_s"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "cpu_us_per_request": round(statistics.median(cpu), 2) if cpu else None,
        "cpu_us_per_request_rounds": cpu,
        "rounds": rounds,
    }


# -- the entry point -----------------------------------------------------------------------
PARTS = {"fleet": fleet_part, "prefix": prefix_part, "cost": cost_part, "index": index_part}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--results-md",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replace the Fleet section of bench/RESULTS.md (default: full runs of every part)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"unknown parts: {', '.join(unknown)} (known: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings()
    if (os.cpu_count() or 1) > PROXY_CPU and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(
            0, {LOAD_CPU}
        )  # this client beside the backends, off the gateway's CPU
    raise_nofile_limit()
    work = args.out / "work-fleet"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {"meta": fleetreport.meta(ROOT, argv, args.quick, asdict(settings))}
    for part in parts:
        results[part] = PARTS[part](settings, work)
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    results["meta"]["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    tables = fleetreport.tables(results)
    write_md = (
        (not args.quick and parts == list(PARTS)) if args.results_md is None else args.results_md
    )
    if write_md:
        fleetreport.replace_section(
            ROOT / "bench" / "RESULTS.md", fleetreport.markdown(results, tables)
        )
    print(f"\nwrote {args.out / 'fleet.json'}; logs in {work}")
    for title, table in tables:
        print(f"\n{title}\n{fleetreport.text_table(table)}")
    for line in fleetreport.verdicts(results) + fleetreport.notes(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
