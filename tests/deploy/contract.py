"""The Prometheus metrics of CONTRACT.md section 4, and a checker for PromQL that uses them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.deploy._tools import ROOT


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    labels: tuple[str, ...]
    values: dict[str, frozenset[str]]  # label -> allowed values, where the contract lists them


VENDORED = Path(__file__).with_name("contract_metrics.md")


def shared_contract() -> Path | None:
    for cand in (ROOT / "shared" / "CONTRACT.md", ROOT.parent / "shared" / "CONTRACT.md"):
        if cand.exists():
            return cand
    return None


def contract_path() -> Path:
    """The shared contract when it is beside the repo, else the vendored copy of its section 4."""
    return shared_contract() or VENDORED


def load_metrics(path: Path | None = None) -> dict[str, Metric]:
    text = (path or contract_path()).read_text(encoding="utf-8")
    section = text.split("## 4.", 1)[1].split("\n## ", 1)[0]
    metrics: dict[str, Metric] = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*`(cascade_\w+)`\s*\|\s*(\w+)\s*\|\s*(.*?)\s*\|\s*$", line)
        if not m:
            continue
        name, mtype, label_text = m.groups()
        labels: list[str] = []
        values: dict[str, frozenset[str]] = {}
        for lm in re.finditer(r"(\w+)\s*(?:\(([^)]*)\))?", re.sub(r"^\(none\)$", "", label_text)):
            label, inner = lm.group(1), lm.group(2)
            labels.append(label)
            if inner:
                vals = [v.split("=")[0].strip().strip('"') for v in inner.split(",")]
                if all(re.fullmatch(r"\w+", v) for v in vals):
                    values[label] = frozenset(vals)
        metrics[name] = Metric(name, mtype, tuple(labels), values)
    if len(metrics) < 10:
        raise AssertionError(f"could not read the metrics table of {path}: {sorted(metrics)}")
    return metrics


_SELECTOR = re.compile(r"(?<![\w:])(cascade_[a-z0-9_]+)(?![\w:])\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


# Labels Prometheus puts on every series of a target when it scrapes it (job, instance) and that
# Kubernetes service discovery adds (namespace, pod, service): not the app's, but fine to group by.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service"}


def check_promql(expr: str, metrics: dict[str, Metric]) -> list[str]:
    """Problems with metric names, label names and label values in one PromQL expression."""
    problems: list[str] = []
    used_labels: set[str] = set()
    for m in _SELECTOR.finditer(expr):
        series, matchers = m.group(1), m.group(2) or ""
        metric = metrics.get(series)
        extra: set[str] = set()
        if metric is None:
            for suffix in ("_bucket", "_sum", "_count"):
                base = metrics.get(series.removesuffix(suffix))
                if series.endswith(suffix) and base is not None and base.type == "histogram":
                    metric = base
                    extra = {"le"} if suffix == "_bucket" else set()
        if metric is None:
            problems.append(f"{series}: not a metric of the contract")
            continue
        if metric.type == "histogram" and series == metric.name:
            problems.append(f"{series}: a histogram is queried through _bucket, _sum or _count")
        allowed = set(metric.labels) | extra
        used_labels |= allowed
        for label, op, value in _MATCHER.findall(matchers):
            if label in TARGET_LABELS:  # on every series Prometheus scrapes (a dashboard's job filter)
                continue
            if label not in allowed:
                problems.append(f"{series}: no label {label!r} (has {sorted(allowed)})")
                continue
            enum = metric.values.get(label)
            if enum is None or "$" in value:
                continue
            literals = value.split("|") if op in ("=~", "!~") else [value]
            for lit in literals:
                if re.fullmatch(r"\w+", lit) and lit not in enum:
                    problems.append(f"{series}: {label}={lit!r} is not one of {sorted(enum)}")
    for g in _GROUPING.finditer(expr):
        for label in filter(None, (s.strip() for s in g.group(1).split(","))):
            if label not in used_labels and label not in TARGET_LABELS:
                problems.append(f"grouping label {label!r} is not a label of the metrics in: {expr}")
    return problems


def metric_names(expr: str) -> set[str]:
    return {m.group(1) for m in _SELECTOR.finditer(expr)}
