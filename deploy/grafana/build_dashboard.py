#!/usr/bin/env python3
# ruff: noqa: E501  (PromQL reads better on one line)
"""Generate deploy/grafana/dashboards/cascade.json (the committed file is this script's output).

    python3 deploy/grafana/build_dashboard.py          # rewrite the JSON
    python3 deploy/grafana/build_dashboard.py --check  # exit 1 if the committed JSON is stale

Queries use only the metrics of CONTRACT.md section 4; tests/deploy checks every name and label,
parses every query with promtool and type-checks the JSON against Grafana's published schema.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "cascade.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
J = 'job=~"$job"'  # one Prometheus job (one deployment: compose's two proxies are two jobs); All sums them
C = f'{J},cascade=~"$cascade"'
U = f'{J},upstream=~"$upstream"'
RI = "$__rate_interval"

_ids = iter(range(1, 1000))


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": True,
        "refId": ref,
    }
    t.update(extra)
    return t


def targets(*specs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(e, leg, ref=chr(ord("A") + i)) for i, (e, leg) in enumerate(specs)]


def timeseries(
    title: str,
    desc: str,
    tgts: list[dict[str, Any]],
    x: int,
    y: int,
    w: int = 12,
    h: int = 8,
    unit: str = "short",
    stack: bool = False,
    min_: float | None = 0,
    max_: float | None = None,
    fill: int = 10,
    legend_calcs: list[str] | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "line",
            "lineInterpolation": "linear",
            "lineWidth": 1,
            "fillOpacity": fill,
            "gradientMode": "none",
            "showPoints": "never",
            "pointSize": 4,
            "spanNulls": False,
            "axisPlacement": "auto",
            "axisLabel": "",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "off"},
        },
        "unit": unit,
        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "id": next(_ids),
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "calcs": legend_calcs or [],
                "displayMode": "table" if legend_calcs else "list",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": tgts,
    }


def stat(
    title: str,
    desc: str,
    tgts: list[dict[str, Any]],
    x: int,
    y: int,
    w: int = 4,
    h: int = 4,
    unit: str = "short",
    decimals: int | None = None,
    calc: str = "lastNotNull",
    steps: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "color": {"mode": "thresholds"},
        "unit": unit,
        "thresholds": {"mode": "absolute", "steps": steps or [{"color": "green", "value": None}]},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "id": next(_ids),
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "percentChangeColorMode": "standard",
            "reduceOptions": {"calcs": [calc], "fields": "", "values": False},
            "showPercentChange": False,
            "textMode": "auto",
            "wideLayout": True,
        },
        "targets": tgts,
    }


def heatmap(
    title: str, desc: str, expr: str, x: int, y: int, w: int = 12, h: int = 8, unit: str = "short"
) -> dict[str, Any]:
    return {
        "id": next(_ids),
        "type": "heatmap",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False}}},
            "overrides": [],
        },
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {
                "exponent": 0.5,
                "fill": "dark-orange",
                "mode": "scheme",
                "reverse": False,
                "scale": "exponential",
                "scheme": "Oranges",
                "steps": 64,
            },
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "showValue": "never",
            "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit},
        },
        "targets": [target(expr, "{{le}}", format="heatmap", interval="", instant=False)],
    }


def row(title: str, y: int) -> dict[str, Any]:
    return {
        "id": next(_ids),
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        "panels": [],
    }


def quantiles(metric: str, by: str, sel: str, legend_prefix: str) -> list[dict[str, Any]]:
    specs = []
    for q in ("0.5", "0.95", "0.99"):
        specs.append(
            (
                f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
                f"p{q[2:] or '0'}{'0' if q == '0.5' else ''} {legend_prefix}".strip(),
            )
        )
    return targets(*specs)


def panels() -> list[dict[str, Any]]:
    p: list[dict[str, Any]] = []
    y = 0
    # ---- overview -----------------------------------------------------------------------------
    p.append(row("Overview", y))
    y += 1
    p.append(
        stat(
            "Requests / s",
            "All cascades in the selection.",
            targets((f"sum(rate(cascade_requests_total{{{C}}}[{RI}]))", "req/s")),
            0,
            y,
            unit="reqps",
            decimals=2,
        )
    )
    p.append(
        stat(
            "Error ratio",
            "Share of requests that ended in an error (every stage failed, deadline, 429).",
            targets(
                (
                    f'sum(rate(cascade_requests_total{{{C},outcome="error"}}[{RI}])) / '
                    f"sum(rate(cascade_requests_total{{{C}}}[{RI}]))",
                    "errors",
                )
            ),
            4,
            y,
            unit="percentunit",
            decimals=2,
            steps=[
                {"color": "green", "value": None},
                {"color": "orange", "value": 0.01},
                {"color": "red", "value": 0.05},
            ],
        )
    )
    p.append(
        stat(
            "Answered by first stage",
            "Share of requests accepted at stage 0 (cheapest model).",
            targets(
                (
                    f'sum(rate(cascade_attempts_total{{{C},stage="0",outcome="accepted"}}[{RI}])) / '
                    f"sum(rate(cascade_requests_total{{{C}}}[{RI}]))",
                    "stage 0",
                )
            ),
            8,
            y,
            unit="percentunit",
            decimals=1,
        )
    )
    p.append(
        stat(
            "Savings (range)",
            "1 - cost / baseline over the dashboard range; baseline = every request "
            "answered by the cascade's last stage. Negative: the cascade costs more.",
            targets(
                (
                    f"1 - sum(increase(cascade_cost_usd_total{{{C}}}[$__range])) / "
                    f"sum(increase(cascade_baseline_cost_usd_total{{{C}}}[$__range]))",
                    "savings",
                )
            ),
            12,
            y,
            unit="percentunit",
            decimals=1,
            calc="lastNotNull",
            steps=[{"color": "red", "value": None}, {"color": "green", "value": 0}],
        )
    )
    p.append(
        stat(
            "Spend (range)",
            "USD spent over the dashboard range: answers, scoring and shadow calls.",
            targets((f"sum(increase(cascade_cost_usd_total{{{C}}}[$__range]))", "USD")),
            16,
            y,
            unit="currencyUSD",
            decimals=2,
        )
    )
    p.append(
        stat(
            "In flight",
            "Requests being served now (all workers).",
            targets((f"sum(cascade_in_flight_requests{{{J}}})", "in flight")),
            20,
            y,
            unit="short",
            decimals=0,
        )
    )
    y += 4
    p.append(
        timeseries(
            "Request rate",
            "Requests per second by cascade and outcome.",
            targets(
                (
                    f"sum by (cascade, outcome) (rate(cascade_requests_total{{{C}}}[{RI}]))",
                    "{{cascade}} {{outcome}}",
                )
            ),
            0,
            y,
            unit="reqps",
        )
    )
    p.append(
        timeseries(
            "In-flight requests",
            "Concurrent requests across all workers.",
            targets((f"sum(cascade_in_flight_requests{{{J}}})", "in flight")),
            12,
            y,
            unit="short",
        )
    )
    y += 8
    # ---- cascade behaviour ---------------------------------------------------------------------
    p.append(row("Cascade", y))
    y += 1
    p.append(
        timeseries(
            "Acceptance share per stage",
            "Share of requests answered at each stage (stacked; sums to the success ratio).",
            targets(
                (
                    f'sum by (cascade, stage) (rate(cascade_attempts_total{{{C},outcome="accepted"}}[{RI}]))'
                    f" / on (cascade) group_left sum by (cascade) (rate(cascade_requests_total{{{C}}}[{RI}]))",
                    "{{cascade}} stage {{stage}}",
                )
            ),
            0,
            y,
            unit="percentunit",
            stack=True,
            max_=1,
            fill=60,
        )
    )
    p.append(
        timeseries(
            "Escalation rate per stage",
            "Share of attempts at each stage that escalated onward (rejected by the scorers or failed).",
            targets(
                (
                    f'sum by (cascade, stage) (rate(cascade_attempts_total{{{C},outcome=~"rejected|error"}}[{RI}]))'
                    f" / sum by (cascade, stage) (rate(cascade_attempts_total{{{C}}}[{RI}]))",
                    "{{cascade}} stage {{stage}}",
                )
            ),
            12,
            y,
            unit="percentunit",
            max_=1,
        )
    )
    y += 8
    p.append(
        timeseries(
            "Escalations by reason",
            "Escalations per second from one upstream to the next, by reason.",
            targets(
                (
                    f"sum by (from_upstream, to_upstream, reason) (rate(cascade_escalations_total{{{C}}}[{RI}]))",
                    "{{from_upstream}} → {{to_upstream}} ({{reason}})",
                )
            ),
            0,
            y,
            unit="reqps",
        )
    )
    p.append(
        timeseries(
            "Attempts by stage and outcome",
            "Attempts per second at each stage: accepted, rejected, error.",
            targets(
                (
                    f"sum by (stage, upstream, outcome) (rate(cascade_attempts_total{{{C}}}[{RI}]))",
                    "stage {{stage}} {{upstream}} {{outcome}}",
                )
            ),
            12,
            y,
            unit="reqps",
        )
    )
    y += 8
    # ---- cost ----------------------------------------------------------------------------------
    p.append(row("Cost", y))
    y += 1
    p.append(
        timeseries(
            "Cost and savings per hour",
            "USD per hour: what the cascade spent, what its last stage alone would have cost (baseline), "
            "and the difference (savings = baseline - cost).",
            targets(
                (f"sum(rate(cascade_cost_usd_total{{{C}}}[{RI}])) * 3600", "cost"),
                (f"sum(rate(cascade_baseline_cost_usd_total{{{C}}}[{RI}])) * 3600", "baseline"),
                (
                    f"(sum(rate(cascade_baseline_cost_usd_total{{{C}}}[{RI}])) - "
                    f"sum(rate(cascade_cost_usd_total{{{C}}}[{RI}]))) * 3600",
                    "savings",
                ),
            ),
            0,
            y,
            unit="currencyUSD",
            min_=None,
            legend_calcs=["mean", "lastNotNull"],
        )
    )
    p.append(
        timeseries(
            "Cost per hour by upstream and purpose",
            "USD per hour by upstream; purpose: answer, scoring (judge/verify calls), shadow (labelling).",
            targets(
                (
                    f"sum by (upstream, purpose) (rate(cascade_cost_usd_total{{{C}}}[{RI}])) * 3600",
                    "{{upstream}} {{purpose}}",
                )
            ),
            12,
            y,
            unit="currencyUSD",
            stack=True,
            fill=40,
        )
    )
    y += 8
    p.append(
        timeseries(
            "Savings per hour by cascade",
            "baseline - cost per cascade, USD per hour.",
            targets(
                (
                    f"(sum by (cascade) (rate(cascade_baseline_cost_usd_total{{{C}}}[{RI}])) - "
                    f"sum by (cascade) (rate(cascade_cost_usd_total{{{C}}}[{RI}]))) * 3600",
                    "{{cascade}}",
                )
            ),
            0,
            y,
            unit="currencyUSD",
            min_=None,
        )
    )
    p.append(
        timeseries(
            "Tokens per second",
            "Prompt and completion tokens per second by upstream.",
            targets(
                (
                    f"sum by (upstream, kind) (rate(cascade_tokens_total{{{U}}}[{RI}]))",
                    "{{upstream}} {{kind}}",
                )
            ),
            12,
            y,
            unit="short",
        )
    )
    y += 8
    # ---- scores --------------------------------------------------------------------------------
    p.append(row("Scores and thresholds", y))
    y += 1
    p.append(
        heatmap(
            "Score distribution",
            "Scores of all scorers and stages in the selection (buckets of 0.1).",
            f"sum by (le) (increase(cascade_score_bucket{{{C}}}[{RI}]))",
            0,
            y,
        )
    )
    p.append(
        timeseries(
            "Median score by stage and scorer",
            "p50 of each scorer's score at each stage, with the stage threshold for comparison.",
            targets(
                (
                    f"histogram_quantile(0.5, sum by (le, stage, scorer) (rate(cascade_score_bucket{{{C}}}[{RI}])))",
                    "stage {{stage}} {{scorer}} p50",
                ),
                (f"max by (stage) (cascade_threshold{{{C}}})", "stage {{stage}} threshold"),
            ),
            12,
            y,
            unit="short",
            max_=1,
        )
    )
    y += 8
    p.append(
        timeseries(
            "Score quantiles (p10 / p50 / p90) by stage",
            "Spread of the stage scores.",
            targets(
                *[
                    (
                        f"histogram_quantile({q}, sum by (le, stage) (rate(cascade_score_bucket{{{C}}}[{RI}])))",
                        f"stage {{{{stage}}}} p{int(float(q) * 100)}",
                    )
                    for q in ("0.1", "0.5", "0.9")
                ]
            ),
            0,
            y,
            unit="short",
            max_=1,
        )
    )
    p.append(
        timeseries(
            "Thresholds",
            "Current acceptance threshold per cascade and stage (moves when learning.auto_tune is on).",
            targets((f"max by (cascade, stage) (cascade_threshold{{{C}}})", "{{cascade}} stage {{stage}}")),
            12,
            y,
            unit="short",
            max_=1,
        )
    )
    y += 8
    # ---- latency -------------------------------------------------------------------------------
    p.append(row("Latency", y))
    y += 1
    p.append(
        timeseries(
            "Request latency p50 / p95 / p99",
            "Whole request duration, through the last byte.",
            quantiles("cascade_request_duration_seconds", "", C, ""),
            0,
            y,
            unit="s",
        )
    )
    p.append(
        timeseries(
            "Time to first token p50 / p95 / p99",
            "Streaming requests: time from request to the first content byte.",
            quantiles("cascade_time_to_first_token_seconds", "", C, ""),
            12,
            y,
            unit="s",
        )
    )
    y += 8
    p.append(
        timeseries(
            "Request latency p95 by cascade and stream",
            "p95 request duration split by cascade and streaming mode.",
            targets(
                (
                    f"histogram_quantile(0.95, sum by (le, cascade, stream) "
                    f"(rate(cascade_request_duration_seconds_bucket{{{C}}}[{RI}])))",
                    "{{cascade}} stream={{stream}}",
                )
            ),
            0,
            y,
            unit="s",
        )
    )
    p.append(
        timeseries(
            "Upstream latency p50 / p95 by upstream",
            "Duration of each upstream call.",
            targets(
                (
                    f"histogram_quantile(0.5, sum by (le, upstream) (rate(cascade_upstream_duration_seconds_bucket{{{U}}}[{RI}])))",
                    "{{upstream}} p50",
                ),
                (
                    f"histogram_quantile(0.95, sum by (le, upstream) (rate(cascade_upstream_duration_seconds_bucket{{{U}}}[{RI}])))",
                    "{{upstream}} p95",
                ),
            ),
            12,
            y,
            unit="s",
        )
    )
    y += 8
    # ---- upstreams -----------------------------------------------------------------------------
    p.append(row("Upstreams", y))
    y += 1
    p.append(
        timeseries(
            "Upstream errors by kind",
            "Failed upstream calls per second: timeout, connect, status_4xx, status_5xx, protocol.",
            targets(
                (
                    f"sum by (upstream, kind) (rate(cascade_upstream_errors_total{{{U}}}[{RI}]))",
                    "{{upstream}} {{kind}}",
                )
            ),
            0,
            y,
            unit="reqps",
            stack=True,
            fill=40,
        )
    )
    p.append(
        timeseries(
            "Upstream error ratio",
            "Failed attempts / all attempts, per upstream (what the CascadeUpstreamErrorRatio alerts watch). "
            "cascade_upstream_duration_seconds counts answered calls only, so it is no denominator.",
            targets(
                (
                    f'sum by (upstream) (rate(cascade_attempts_total{{{U},outcome="error"}}[{RI}])) / '
                    f"sum by (upstream) (rate(cascade_attempts_total{{{U}}}[{RI}]))",
                    "{{upstream}}",
                )
            ),
            12,
            y,
            unit="percentunit",
            max_=1,
        )
    )
    return p


def variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2,
            "regex": "",
            "sort": 1,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "hide": 0,
            "skipUrlSync": False,
        }

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
            "skipUrlSync": False,
            "multi": False,
            "includeAll": False,
        },
        query_var("job", "Job", "label_values(cascade_requests_total, job)"),
        query_var("cascade", "Cascade", f"label_values(cascade_requests_total{{{J}}}, cascade)"),
        query_var("upstream", "Upstream", f"label_values(cascade_attempts_total{{{J}}}, upstream)"),
    ]


def dashboard() -> dict[str, Any]:
    return {
        "uid": "cascade-overview",
        "title": "Cascade",
        "description": "cascade proxy: traffic, escalations, acceptance per stage, cost and savings, "
        "scores, thresholds, latency and upstream errors.",
        "tags": ["cascade", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables()},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run python3 {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
