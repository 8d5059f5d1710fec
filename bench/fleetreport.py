"""The fleet benchmark's tables, issue 9's targets, and the Fleet section of bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report

Table = tuple[list[str], list[list[str]]]
SECTION = "## Fleet"


def meta(
    root: Path,
    argv: list[str] | None,
    quick: bool,
    settings: dict[str, Any],
    program: str = "bench.fleet",
) -> dict[str, Any]:
    """When, where and how a benchmark ran (`program`: the module run with `python -m`)."""
    import sys

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": report.commit(root),
        "machine": report.machine(),
        "nproc": os.cpu_count(),
        "arch": platform.machine(),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
        "command": " ".join(
            [f"python -m {program}", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": quick,
        "settings": settings,
    }


def _n(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def brief(figures: dict[str, Any]) -> str:
    """A one-line progress note."""
    keys = ("requests", "ok", "failed", "shed", "hit_rate", "share", "cpu_us_per_request")
    parts = [f"{k}={figures[k]}" for k in keys if k in figures]
    if figures.get("ttft_ms"):
        parts.append(
            "ttft p50/p90/p99="
            + "/".join(str(figures["ttft_ms"].get(p)) for p in ("p50", "p90", "p99"))
        )
    if "requests_per_s" in figures:
        parts.append(f"req/s={figures['requests_per_s']}")
    return ", ".join(parts)


def fleet_table(fleet: dict[str, Any]) -> Table:
    names = [b["name"] for b in fleet["backends"]]
    header = [
        "policy", "requests", *(f"share {n}" for n in names), f"share {names[0]} after kill",
        "failed before head (retryable)", "failed after head, before 1st event", "cut mid-stream",
        "TTFT p99 (ms)", "TTFT p99 after kill (ms)", "gateway retries",
    ]  # fmt: skip
    rows = []
    for policy, f in fleet["policies"].items():
        rows.append(
            [
                policy,
                str(f["requests"]),
                *(_pct(f["share"].get(n, 0.0)) for n in names),
                _pct(f["share_after_kill"].get(names[0], 0.0)),
                str(f["failed"]["before_head"]),
                str(f["failed"]["after_head"]),
                str(f["failed"]["mid_stream"]),
                _n(f["ttft_ms"].get("p99")),
                _n(f["ttft_ms_after_kill"].get("p99")),
                _n(f["gateway"].get("proxy_retries_total"), 0),
            ]
        )
    return header, rows


def prefix_table(prefix: dict[str, Any]) -> Table:
    header = [
        "run", "policy", "hit rate", "TTFT p50 (ms)", "TTFT p90 (ms)", "TTFT p99 (ms)",
        "busiest backend's share", "rebalanced", "paid the system prompt's prefill", "failed",
        "shed", "second half: TTFT p90 (ms)", "second half: paid the prefill",
    ]  # fmt: skip
    rows = []
    for run_name, runs in prefix["runs"].items():
        for policy, f in runs["policies"].items():
            label = "weighted (random)" if policy == "weighted" else policy
            rows.append(
                [
                    f"{run_name} ({runs['capacity_blocks']} blocks/backend)",
                    label,
                    _pct(f["hit_rate"]),
                    _n(f["ttft_ms"].get("p50")),
                    _n(f["ttft_ms"].get("p90")),
                    _n(f["ttft_ms"].get("p99")),
                    _pct(f["busiest_share"]),
                    _rebalanced(f.get("decisions", {})),
                    _pct(f.get("full_prefill_share")),
                    str(sum(f["failed"].values())),
                    str(f["shed"]),
                    _n(f.get("second_half", {}).get("ttft_ms", {}).get("p90")),
                    _pct(f.get("second_half", {}).get("full_prefill_share")),
                ]
            )
    return header, rows


def _rebalanced(chosen: dict[str, float]) -> str:
    """Requests `affinity` sent past their key's replica (its load bound), of those it keyed."""
    keyed = chosen.get("affinity", 0.0) + chosen.get("rebalanced", 0.0)
    return _pct(chosen.get("rebalanced", 0.0) / keyed) if keyed else "-"


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 3) if top and bottom else None


def prefix_targets(prefix: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 9's three targets for the prefix part, each with its figure and verdict."""
    pressure = prefix["runs"]["pressure"]["policies"]
    control = prefix["runs"]["control"]["policies"]
    hit = _ratio(pressure["affinity"]["hit_rate"], pressure["weighted"]["hit_rate"])
    p90 = _ratio(
        pressure["weighted"]["ttft_ms"].get("p90"), pressure["affinity"]["ttft_ms"].get("p90")
    )
    p99 = _ratio(
        control["affinity"]["ttft_ms"].get("p99"), control["least_loaded"]["ttft_ms"].get("p99")
    )
    checks = [
        ("pressure: affinity hit rate / random's >= 2", hit, hit is not None and hit >= 2),
        ("pressure: random TTFT p90 / affinity's >= 3", p90, p90 is not None and p90 >= 3),
        (
            "control: affinity TTFT p99 / least_loaded's <= 1.10",
            p99,
            p99 is not None and p99 <= 1.1,
        ),
    ]
    two = pressure.get("affinity, 2 gateways, agreed")
    if two is not None:  # point 8: two gateways, each sent half the requests, still pay
        random = pressure["weighted"]
        hit2 = _ratio(two["hit_rate"], random["hit_rate"])
        p90_2 = _ratio(random["ttft_ms"].get("p90"), two["ttft_ms"].get("p90"))
        later = _ratio(
            random.get("second_half", {}).get("ttft_ms", {}).get("p90"),
            two.get("second_half", {}).get("ttft_ms", {}).get("p90"),
        )
        checks += [
            ("pressure, 2 gateways agreed: hit rate / random's >= 2", hit2,
             hit2 is not None and hit2 >= 2),
            ("pressure, 2 gateways agreed, second half: random TTFT p90 / theirs >= 3", later,
             later is not None and later >= 3),
            ("pressure, 2 gateways agreed, whole run (the keys' arrival included): random TTFT "
             "p90 / theirs", p90_2, None),
        ]  # fmt: skip
    return [{"target": t, "figure": f, "met": met} for t, f, met in checks]


def _verdict(met: bool | None) -> str:
    """A target's verdict; None: a figure shown beside the targets, with none of its own."""
    return "-" if met is None else "met" if met else "MISSED"


def targets_table(prefix: dict[str, Any]) -> Table:
    rows = [[t["target"], _n(t["figure"], 2) + "x", _verdict(t["met"])] for t in prefix["targets"]]
    return ["issue 9 target", "figure", "verdict"], rows


def cost_table(cost: dict[str, Any]) -> Table:
    cases = cost["cases"]
    header = [
        "case (S1 shape: wrk, 64 connections, non-streamed)", "requests/s", "CPU-us per request",
        "vs one backend, same body", "within 10 %", "errors",
    ]  # fmt: skip
    rows = []
    for label, f in cases.items():
        reference = cases.get(f["reference"] or "", {}).get("cpu_us_per_request")
        ratio = _ratio(f["cpu_us_per_request"], reference)
        rows.append(
            [
                label,
                _n(f["requests_per_s"], 0),
                _n(f["cpu_us_per_request"]),
                "-" if ratio is None else f"{ratio:.3f}x",
                "-" if ratio is None else ("yes" if ratio <= 1.10 else "no"),
                str(f["errors"]),
            ]
        )
    return header, rows


INDEX_COLUMNS = (
    "prompt_key_us", "least_loaded_order_us", "affinity_no_index_us", "affinity_known_key_us",
    "affinity_new_key_us", "affinity_agreed_known_key_us", "affinity_agreed_new_key_us",
)  # fmt: skip


def index_table(index: dict[str, Any]) -> Table:
    header = [
        "body", "the prompt's key", "order, least_loaded", "key + order, affinity, no index",
        "key + index + order, a key it holds", "key + index + order, a new key each call",
        "the same, agreed, a key it holds", "the same, agreed, a new key each call",
    ]  # fmt: skip
    rows = [
        [label, *(f"{c[k]:.2f} us" for k in INDEX_COLUMNS)] for label, c in index["cases"].items()
    ]
    return header, rows


def gateways_table(index: dict[str, Any]) -> Table:
    header = [
        "case (the prefix part's 48 tenants, each request to one gateway at random)",
        "tenants placed on different replicas", "system prompts the busiest replica must hold",
        "times a gateway moved a tenant",
    ]  # fmt: skip
    rows = [
        [
            label,
            _n(f["placed_differently"]),
            _n(f["busiest_replica_prompts"]),
            _n(f["moves_per_gateway"]),
        ]
        for label, f in index["two_gateways"].items()
    ]
    return header, rows


def index_memory(index: dict[str, Any]) -> str:
    m = index["memory"]
    counts = ", ".join(f"{n} {c}" for n, c in m["keys_per_backend_after_flood"].items())
    mib = {k: m[k] / 2**20 for k in ("full_bytes", "churned_bytes", "bytes_after_flood")}
    return (
        f"prefix index at its default size ({m['size']:,} keys): {mib['full_bytes']:.2f} MiB "
        f"when first full, {mib['churned_bytes']:.2f} MiB once every entry was replaced by a new "
        f"key ({m['churned_bytes'] / m['size']:.0f} bytes an entry), {mib['bytes_after_flood']:.2f}"
        f" MiB after {10 * m['size']:,} more new keys, holding {m['entries_after_flood']:,}; "
        f"keys per backend then: {counts}; with `key_placement: agreed`, full of matched keys: "
        f"{index['agreed_memory']['full_bytes'] / 2**20:.2f} MiB "
        f"({index['agreed_memory']['full_bytes'] / m['size']:.0f} bytes an entry)"
    )


def tables(results: dict[str, Any]) -> list[tuple[str, Table]]:
    out = []
    if "fleet" in results:
        out.append(
            (
                "Fleet: 3 backends of unequal speed, the fastest SIGKILLed mid-run",
                fleet_table(results["fleet"]),
            )
        )
    if "prefix" in results:
        out.append(("Prefix cache: shared-prefix tenants", prefix_table(results["prefix"])))
        out.append(("Prefix cache: issue 9's targets", targets_table(results["prefix"])))
    if "cost" in results:
        out.append(("Cost: the gateway's CPU per request", cost_table(results["cost"])))
    if "index" in results:
        out.append(
            (
                "Cost: affinity's key and index per request, in process",
                index_table(results["index"]),
            )
        )
        title = "Two gateways, one index each (pure functions, seeded, means of 20 draws)"
        out.append((title, gateways_table(results["index"])))
    return out  # fmt: skip


def verdicts(results: dict[str, Any]) -> list[str]:
    lines = []
    if "fleet" in results:
        for policy, f in results["fleet"]["policies"].items():
            n = f["failed"]["before_head"]
            lines.append(
                f"fleet/{policy}: {n} failed requests that could have been retried (target 0): "
                + ("met" if n == 0 else "MISSED")
            )
    if "prefix" in results:
        lines += [
            f"prefix: {t['target']}: {_n(t['figure'], 2)}x: {_verdict(t['met'])}"
            for t in results["prefix"]["targets"]
        ]
    if "index" in results:
        lines.append(index_memory(results["index"]))
    return lines  # fmt: skip


def text_table(table: Table) -> str:
    header, rows = table
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _busy(results: dict[str, Any]) -> str:
    """The busiest share of each CPU seen during any measured run (other work shows here)."""
    seen: dict[str, float] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "cpu_busy" and isinstance(value, dict):
                    for cpu, share in value.items():
                        seen[cpu] = max(seen.get(cpu, 0.0), share)
                else:
                    visit(value)

    visit(results)
    return ", ".join(f"CPU {c} up to {s:.0%}" for c, s in sorted(seen.items()))


def markdown(results: dict[str, Any], made: list[tuple[str, Table]]) -> str:
    m = results["meta"]
    mach = m["machine"]
    lines = [
        SECTION,
        "",
        "Written by `make bench-fleet` (`python -m bench.fleet`); bench/README.md says how each "
        "figure is made.",
        "",
        f"- date: {m['date']}; commit: {m['commit']}",
        f"- machine: {mach['cpu']}, `nproc` {m['nproc']}, `uname -m` {m['arch']}, "
        f"{mach['memory_gib']} GiB, Linux {mach['kernel']}, Python {mach['python']}",
        f"- run: `{m['command']}` in {m.get('elapsed_s', 0):.0f} s; "
        f"load average before: {' '.join(m['loadavg_before'])}",
        "- **the machine was shared with other work during this run**: "
        f"busiest CPU shares seen in the measured windows: {_busy(results)}. Wall-clock figures "
        "(TTFT, req/s) carry that noise; CPU-us per request is the gateway's own and suffers "
        "least.",
        "- pinning: simulated backends and the client on CPU 0, the gateway on CPU 1",
        "",
    ]
    for title, table in made:
        lines += [f"### {title}", "", markdown_table(table), ""]
    lines += [f"- {v}" for v in verdicts(results) + notes(results)]
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    """What stands between affinity and a hit at p90 under pressure, in this run's figures."""
    if "prefix" not in results:
        return []
    prefix = results["prefix"]
    a = prefix["runs"]["pressure"]["policies"]["affinity"]
    paid = a.get("full_prefill_share")
    homes = ", ".join(f"{n} {c}" for n, c in a.get("tenant_homes", {}).items())
    rates = ", ".join(f"{n} {_pct(r)}" for n, r in a["hit_rate_by_backend"].items())
    shares = ", ".join(f"{n} {_pct(r)}" for n, r in a["share"].items())
    first = prefix["tenants_seen"] / prefix["requests"] if prefix.get("requests") else None
    p90 = "a miss" if paid is not None and paid > 0.1 else "a hit"
    return [
        f"affinity under pressure: {_pct(paid)} of requests paid the system prompt's prefill "
        f"(its TTFT p90 is {p90}: a hit needs under 10 %), {_pct(first)} of all requests being "
        f"a tenant's first; tenants by home backend: {homes}, where one backend's cache holds "
        f"{prefix['system_prompts_per_cache']['pressure']} system prompts; requests by backend: "
        f"{shares}; hit rate by backend: {rates}."
    ]


def replace_section(path: Path, section: str) -> None:
    """Put `section` in place of the file's Fleet section, where it stands (or after the rest)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    found = re.search(rf"\n{re.escape(SECTION)}\n.*?(?=\n## |\Z)", text, flags=re.S)
    if found is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
    else:
        path.write_text(text[: found.start()] + "\n" + section + text[found.end() :])


def keep_section(path: Path, new_text: str) -> str:
    """`new_text` with the Fleet section of the file at `path` kept (bench.run writes the rest)."""
    if not path.exists():
        return new_text
    found = re.search(rf"\n{re.escape(SECTION)}\n.*?(?=\n## |\Z)", path.read_text(), flags=re.S)
    return (
        new_text
        if found is None
        else new_text.rstrip("\n") + "\n" + found.group(0).rstrip("\n") + "\n"
    )
