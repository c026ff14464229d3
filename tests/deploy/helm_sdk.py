"""A small `helm` stand-in over helm-python-sdk (Helm's own Go SDK, v4, as a shared library).

Run with the tools venv's interpreter (scripts/install-tools):

    .cache/tools/venv/bin/python tests/deploy/helm_sdk.py template CHART [-f values.yaml]... \
        [--set-json JSON]... [--name NAME] [--namespace NS]
    .cache/tools/venv/bin/python tests/deploy/helm_sdk.py lint CHART [-f values.yaml]... [--strict]

`template` prints the rendered manifests as one multi-document YAML stream (like `helm template`,
NOTES.txt and helpers left out); `lint` prints the findings and exits 1 on any error (or warning
with --strict).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def _values(files: list[str], set_json: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in files:
        _merge(values, yaml.safe_load(Path(f).read_text()) or {})
    for s in set_json:
        _merge(values, json.loads(s))
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["template", "lint", "version"])
    ap.add_argument("chart", nargs="?")
    ap.add_argument("-f", "--values", action="append", default=[])
    ap.add_argument("--set-json", action="append", default=[])
    ap.add_argument("--name", default="release-name")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--kube-version", default=None)
    ap.add_argument("--show-notes", action="store_true", help="print NOTES.txt as well, as helm install does")
    args = ap.parse_args(argv)
    if args.command == "version":
        print(f"helm-c {helm.helm_c_version()} helm-sdk {helm.helm_sdk_version()}")
        return 0
    values = _values(args.values, args.set_json)
    if args.command == "lint":
        report = helm.lint(
            args.chart, values, strict=args.strict, namespace=args.namespace, kube_version=args.kube_version
        )
        worst = 0
        for m in report.get("messages", []):
            sev = int(m.get("severity", 0))
            worst = max(worst, sev)
            label = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}.get(sev, str(sev))
            print(f"[{label}] {m.get('path', '')}: {m.get('error', '')}")
        for e in report.get("errors", []) or []:
            print(f"[ERROR] {e}")
            worst = 3
        print(f"{report.get('total_charts_linted', 0)} chart(s) linted")
        return 1 if worst >= 3 or (args.strict and worst >= 2) else 0
    with helm.Chart.load(args.chart) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    out = []
    for path in sorted(manifests):
        text = manifests[path]
        if (path.endswith("NOTES.txt") and not args.show_notes) or not text.strip():
            continue
        out.append(f"# Source: {path}\n{text.strip()}\n")
    sys.stdout.write("---\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
