"""Prometheus config and alert rules: promtool check/test, and metric names against the contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy._tools import CHART, DEPLOY, run, tool
from tests.deploy.contract import Metric, check_promql, load_metrics, metric_names

PROM = DEPLOY / "prometheus"


@pytest.fixture(scope="module")
def metrics() -> dict[str, Metric]:
    return load_metrics()


def _rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_config() -> None:
    proc = run([tool("promtool"), "check", "config", str(PROM / "prometheus.yml")], timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    proc = run([tool("promtool"), "check", "rules", str(PROM / "alerts.yml")], timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rejects_bad_rules(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: sum by (cascade (rate(x[5m]))\n")
    proc = run([tool("promtool"), "check", "rules", str(bad)], timeout=30)
    assert proc.returncode != 0


def test_alert_unit_tests() -> None:
    """deploy/prometheus/tests/alerts.test.yml: each alert fires on its scenario and not before."""
    proc = run([tool("promtool"), "test", "rules", "alerts.test.yml"], cwd=PROM / "tests", timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load((PROM / "tests" / "alerts.test.yml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    }
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"


def test_required_alerts_present() -> None:
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    exprs = " ".join(r["expr"] for r in alerts.values())
    assert any("escalations" in r["expr"] for r in alerts.values()), "no escalation-rate alert"
    assert any(
        'outcome="error"' in r["expr"] and "cascade_attempts_total" in r["expr"] for r in alerts.values()
    )
    assert "cascade_cost_usd_total" in exprs or "cost_usd_per_hour" in exprs
    for name, r in alerts.items():
        assert r.get("labels", {}).get("severity") in {"warning", "critical"}, name
        assert r.get("annotations", {}).get("summary"), name


def test_rule_metrics_are_in_the_contract(metrics: dict[str, Metric]) -> None:
    problems = []
    seen: set[str] = set()
    for r in _rules():
        seen |= metric_names(r["expr"])
        problems += [f"{r.get('alert') or r.get('record')}: {p}" for p in check_promql(r["expr"], metrics)]
    assert not problems, "\n".join(problems)
    assert seen, "no cascade_* metric found in the rules"


def test_helm_chart_carries_the_same_rules() -> None:
    assert (CHART / "files" / "alerts.yml").read_text() == (PROM / "alerts.yml").read_text(), (
        "deploy/helm/cascade/files/alerts.yml must be a copy of deploy/prometheus/alerts.yml: "
        "cp deploy/prometheus/alerts.yml deploy/helm/cascade/files/alerts.yml"
    )


def test_scrape_target_is_the_compose_service() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "cascade")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["cascade:8000"]
    local = next(j for j in cfg["scrape_configs"] if j["job_name"] == "cascade-local")
    assert local["static_configs"][0]["targets"] == ["cascade-local:8000"]
    compose = yaml.safe_load((PROM.parent / "compose.yaml").read_text())
    assert compose["services"]["cascade-local"]["ports"][0].endswith(":8000")
    assert cfg["rule_files"] == ["alerts.yml"]
