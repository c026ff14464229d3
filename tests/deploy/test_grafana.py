"""Grafana dashboard and provisioning: Grafana's published types, PromQL via promtool, contract names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._tools import DEPLOY, run, tool, tsc_check
from tests.deploy.contract import Metric, check_promql, load_metrics

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "cascade.json"
PANEL_TYPES = {"timeseries": "TimeSeries", "stat": "Stat", "heatmap": "Heatmap"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _exprs(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in _panels(d) for t in p.get("targets", [])]


def test_dashboard_json_is_generated() -> None:
    proc = run(["python3", str(GRAFANA / "build_dashboard.py"), "--check"], timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_dashboard_matches_grafana_schema(dashboard: dict[str, Any]) -> None:
    """Type-check the JSON against @grafana/schema: the dashboard model and each panel plugin's options."""
    src = [
        'import type { Json } from "./json";',
        'import type { Dashboard } from "@grafana/schema/dist/esm/raw/dashboard/x/Dashboard_types.gen";',
    ]
    for ptype, mod in PANEL_TYPES.items():
        src.append(
            f'import type * as {mod} from "@grafana/schema/dist/esm/raw/composable/{ptype}/panelcfg/x/'
            f'{mod}PanelCfg_types.gen";'
        )
    src.append(f"export const dashboard: Json<Dashboard> = {json.dumps(dashboard, indent=1)};")
    for p in _panels(dashboard):
        if p["type"] == "row":
            continue
        mod = PANEL_TYPES.get(p["type"])
        assert mod, f"panel {p['title']!r}: type {p['type']!r} has no schema check here"
        src.append(
            f"export const options{p['id']}: Partial<Json<{mod}.Options>> = {json.dumps(p['options'])};"
        )
        custom = p.get("fieldConfig", {}).get("defaults", {}).get("custom")
        if custom is not None and p["type"] != "stat":
            src.append(
                f"export const custom{p['id']}: Partial<Json<{mod}.FieldConfig>> = {json.dumps(custom)};"
            )
    proc = tsc_check("\n".join(src) + "\n")
    assert proc.returncode == 0, f"dashboard does not match Grafana's schema:\n{proc.stdout[-6000:]}"


def test_schema_check_can_fail(dashboard: dict[str, Any]) -> None:
    bad = json.loads(json.dumps(dashboard))
    bad["panels"][1]["gridPos"]["width"] = 3
    bad["schemaVersion"] = "39"
    src = (
        'import type { Json } from "./json";\n'
        'import type { Dashboard } from "@grafana/schema/dist/esm/raw/dashboard/x/Dashboard_types.gen";\n'
        f"export const d: Json<Dashboard> = {json.dumps(bad)};\n"
    )
    proc = tsc_check(src)
    assert proc.returncode != 0
    assert "'\"width\"' does not exist" in proc.stdout  # unknown key
    assert "Type 'string' is not assignable to type 'number'" in proc.stdout  # schemaVersion: "39"


def test_every_query_parses_with_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    subst = {
        "$__rate_interval": "1m",
        "$__interval": "1m",
        "$__range": "1h",
        "$job": ".*",
        "$cascade": ".*",
        "$upstream": ".*",
    }
    rules = []
    for i, (where, expr) in enumerate(_exprs(dashboard)):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, f"{where}: unknown dashboard variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    assert len(rules) >= 20
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run([tool("promtool"), "check", "rules", str(path)], timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_series_is_filtered_by_the_job_variable(dashboard: dict[str, Any]) -> None:
    """Two deployments scraped by one Prometheus (compose's `cascade` and `cascade-local` jobs) were
    summed in every panel; the Job variable picks one (All: both), and the Cascade and Upstream
    variables list the values of the jobs picked."""
    unfiltered = [
        f"{where}: {series}"
        for where, expr in _exprs(dashboard)
        for series in re.findall(r"cascade_[a-z0-9_]+(?:\{[^}]*\})?", expr)
        if 'job=~"$job"' not in series
    ]
    assert not unfiltered, "\n".join(unfiltered)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["query"]["query"] == "label_values(cascade_requests_total, job)"
    assert variables["job"]["includeAll"] and variables["job"]["allValue"] == ".*"
    for name in ("cascade", "upstream"):
        assert '{job=~"$job"}' in variables[name]["query"]["query"]


def test_queries_use_contract_metrics(dashboard: dict[str, Any]) -> None:
    metrics: dict[str, Metric] = load_metrics()
    problems = [f"{where}: {p}" for where, expr in _exprs(dashboard) for p in check_promql(expr, metrics)]
    assert not problems, "\n".join(problems)
    used = {m for _, e in _exprs(dashboard) for m in re.findall(r"cascade_[a-z0-9_]+", e)}
    unused = {m for m in metrics if not any(u == m or u.startswith(m + "_") for u in used)}
    assert not unused, f"contract metrics with no panel: {sorted(unused)}"


def test_required_panels(dashboard: dict[str, Any]) -> None:
    titles = " | ".join(p["title"].lower() for p in _panels(dashboard))
    for needle in (
        "request rate",
        "escalation rate per stage",
        "acceptance share per stage",
        "cost",
        "savings",
        "score distribution",
        "latency p50 / p95 / p99",
        "time to first token",
        "upstream errors by kind",
        "in-flight",
        "thresholds",
    ):
        assert needle in titles, f"no panel about {needle!r}"
    exprs = " ".join(e for _, e in _exprs(dashboard))
    assert "cascade_baseline_cost_usd_total" in exprs and "cascade_cost_usd_total" in exprs
    for q in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le) (rate(cascade_time_to_first_token_seconds_bucket" in exprs
        )
        assert f"histogram_quantile({q}, sum by (le) (rate(cascade_request_duration_seconds_bucket" in exprs
    heat = [p for p in _panels(dashboard) if p["type"] == "heatmap"]
    assert heat and heat[0]["targets"][0]["format"] == "heatmap"


def test_layout(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for p in _panels(dashboard):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


def test_provisioning(dashboard: dict[str, Any]) -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1
    (prom,) = ds["datasources"]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    var = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert var["query"] == "prometheus" and var["current"]["value"] == prom["uid"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cascade.yaml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
