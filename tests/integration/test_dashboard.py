"""conf/grafana/inference-proxy.json and conf/prometheus/alerts.yml against a real Prometheus
scraping a real gateway (two workers) every second, and docs/metrics.md against a real scrape.

The traffic that fills every panel is tests/dashboard_scene.py's. Grafana's variables are
substituted as Grafana would for a 1 s scrape: `$__rate_interval` 10s, `$__interval` 2s,
`$job` the scrape job's name.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.dashboard_scene import ROOT, scene
from tests.prometheus_fixture import JOB, Prometheus, binary
from tests.promql import unknown

DASHBOARD = ROOT / "conf" / "grafana" / "inference-proxy.json"
ALERTS = ROOT / "conf" / "prometheus" / "alerts.yml"
METRICS_DOC = ROOT / "docs" / "metrics.md"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes
VARIABLES = {"$__rate_interval": "10s", "$__interval": "2s", "$job": JOB}


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def substitute(expr: str) -> str:
    """`expr` with Grafana's variables replaced (VARIABLES)."""
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def dashboard_exprs() -> list[str]:
    """Every panel target's expression, with Grafana's variables substituted."""
    return [substitute(target["expr"]) for panel in panels() for target in panel["targets"]]


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as r:
        assert 200 == r.status
        return await r.text()


def exported(text: str) -> tuple[set[str], set[str]]:
    """The series names a scrape declares (a histogram's _bucket, _sum, _count) and the label
    names its samples carry."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    metrics, labels = set(), set()
    for family in text_string_to_metric_families(text):
        metrics.update(family.name + suffix for suffix in suffixes[family.type])
        for sample in family.samples:
            labels.update(sample.labels)
    return metrics, labels


def test_promtool_checks_the_shipped_rules() -> None:
    """`promtool check rules` accepts conf/prometheus/alerts.yml: five rules, each with a
    `for:`, a severity and a summary and description."""
    result = subprocess.run(
        [binary("promtool"), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout
    for rule in rules():
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys()
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} == rule["annotations"].keys()


def test_readme_prometheus_config_checks(tmp_path: Path) -> None:
    """The README's prometheus.yml example, with its rules path pointed at the shipped file,
    passes `promtool check config` (rules included)."""
    section = (ROOT / "README.md").read_text().split("### Dashboards and alerts", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "prometheus.yml"
    config.write_text(example.replace("/etc/prometheus/inference-proxy-alerts.yml", str(ALERTS)))
    result = subprocess.run(
        [binary("promtool"), "check", "config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_dashboard_imports_with_a_datasource_variable() -> None:
    """Every panel and target reads from `${datasource}`, a Prometheus datasource variable;
    panel ids are unique and every panel has a target."""
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert ("datasource", "prometheus") == (
        variables["datasource"]["type"],
        variables["datasource"]["query"],
    )
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["targets"], panel["title"]
        for source in (panel["datasource"], *(t["datasource"] for t in panel["targets"])):
            assert {"type": "prometheus", "uid": "${datasource}"} == source


async def test_every_name_the_dashboard_and_rules_use_is_exported(tmp_path: Path) -> None:
    """Each metric and label in a panel's or rule's expression, legend or annotation is one a
    scrape of the gateway under traffic declares (a misspelt name fails here)."""
    async with scene(tmp_path) as gateway:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                await gateway.round(session)
        metrics, labels = exported(await scrape(gateway.url))
    labels |= TARGET_LABELS
    exprs = dashboard_exprs() + [rule["expr"] for rule in rules()]
    assert [] == unknown(exprs, metrics, labels)
    legends = {
        name
        for panel in panels()
        for target in panel["targets"]
        for name in re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"])
    }
    annotated = {
        name
        for rule in rules()
        for text in rule["annotations"].values()
        for name in re.findall(r"\$labels\.(\w+)", text)
    }
    assert set() == (legends | annotated) - labels


def samples(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


async def test_every_panel_has_data_and_the_alerts_fire(tmp_path: Path) -> None:
    """With Prometheus scraping the gateway every second under traffic, every panel target's
    expression returns at least one number; every rule evaluates without error; the error
    ratio alert fires for the model whose backend answers 502, not for one whose clients all
    hang up mid-stream nor for one refused by its rate limit; once the spare backend is
    unplugged InferenceProxyBackendDown fires for it. The rules are loaded from a copy whose
    `for:` is 1s (the shipped values are minutes)."""
    copy = tmp_path / "alerts.yml"
    loaded = yaml.safe_load(ALERTS.read_text())
    for group in loaded["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    copy.write_text(yaml.safe_dump(loaded))
    async with scene(tmp_path) as gateway, aiohttp.ClientSession() as session:
        stop = asyncio.Event()
        traffic = asyncio.create_task(gateway.traffic(stop))
        prometheus = Prometheus(tmp_path, [f"127.0.0.1:{gateway.port}"], [copy])
        try:
            await prometheus.ready(session)
            empty = await until_all_have_data(prometheus, session, dashboard_exprs(), 30)
            assert [] == empty
            groups = (await prometheus.get(session, "/api/v1/rules"))["groups"]
            health = {
                r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]
            }
            assert {rule["alert"]: ("ok", "") for rule in rules()} == health
            firing = (
                'ALERTS{alertname="InferenceProxyBackendDown", alertstate="firing", '
                'backend="spare"}'
            )
            # 'broken' has 5xx answers and no cut stream: the sum still has it (a missing side
            # counts as 0); 'limited' has 429s only, which are no failure.
            ratio = 'ALERTS{alertname="InferenceProxyHighErrorRatio", alertstate="firing"'
            assert await until_non_empty(prometheus, session, ratio + ', model="broken"}', 30)
            assert [] == await prometheus.query(session, ratio + ', model="limited"}')
            # Every client of 'fickle' hangs up mid-stream: no failure of the gateway's, so no
            # client can raise the error ratio by leaving. The panel reads 1 and 0.
            assert [] == await prometheus.query(session, ratio + ', model="fickle"}')
            (panel,) = (p for p in panels() if p["title"] == "Error ratio by model")
            result = await prometheus.query(session, substitute(panel["targets"][0]["expr"]))
            by_model = {r["metric"]["model"]: float(r["value"][1]) for r in result}
            assert math.isclose(1.0, by_model["broken"])
            assert 0.0 == by_model["fickle"]
            assert [] == await prometheus.query(session, firing)
            await gateway.unplug("spare")
            assert await until_non_empty(prometheus, session, firing, within_s=30)
        finally:
            stop.set()
            await traffic
            prometheus.kill()


async def until_all_have_data(
    prometheus: Prometheus, session: aiohttp.ClientSession, exprs: list[str], within_s: float
) -> list[tuple[str, list]]:
    """Query each expression every 0.5 s until each has returned a finite number; those that
    never did (with what they last returned)."""
    pending: dict[str, list] = {expr: [] for expr in exprs}
    deadline = time.monotonic() + within_s
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        for expr in list(pending):
            pending[expr] = await prometheus.query(session, expr)
            if any(math.isfinite(value) for value in samples(pending[expr])):
                del pending[expr]
    return list(pending.items())


async def until_non_empty(
    prometheus: Prometheus, session: aiohttp.ClientSession, expr: str, within_s: float
) -> list:
    """Query `expr` every 0.5 s until it returns something (or `within_s` has passed)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        result = await prometheus.query(session, expr)
        if result:
            return result
        await asyncio.sleep(0.5)
    return []


def documented() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table: each metric's type and the label names in its labels cell."""
    rows = {}
    for line in METRICS_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = (cells[1], set(re.findall(r"`(\w+)`", cells[2])))
    return rows


async def test_metrics_doc_lists_exactly_the_metrics_a_scrape_shows(tmp_path: Path) -> None:
    """docs/metrics.md has one row per metric a two-worker gateway's scrape declares (none
    missing, none extra), with its type, and for each metric with samples its label names."""
    async with scene(tmp_path) as gateway:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                await gateway.round(session)
        text = await scrape(gateway.url)
    scraped = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        scraped[name] = (family.type, labels if family.samples else None)
    rows = documented()
    assert sorted(scraped) == sorted(rows)
    for name, (kind, labels) in scraped.items():
        assert kind == rows[name][0], name
        if labels is not None:
            assert labels == rows[name][1], name
