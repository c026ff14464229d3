# ruff: noqa: E501  (TypeScript module paths)
"""Helm chart: helm lint (Helm's Go SDK), Kubernetes JSON schemas, CRD types, and the pod contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._tools import CHART, helm, helm_template, node_script, run, tool, tsc_check

K8S_VERSIONS = ["1.27.0", "1.30.0", "1.33.0"]
KEY = {"secret": {"env": {"OPENAI_API_KEY": "sk-test"}}}


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(text: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in docs(text):
        if d.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test":
            continue
        assert d["kind"] not in out, f"two {d['kind']} objects"
        out[d["kind"]] = d
    return out


def container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def default_render() -> str:
    return helm_template(KEY | {"prometheusRule": {"enabled": True}})


def test_helm_lint_strict() -> None:
    proc = helm("lint", str(CHART), "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_lint_catches_errors(tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "cascade"
    shutil.copytree(CHART, bad)
    (bad / "templates" / "broken.yaml").write_text(
        "kind: ConfigMap\nmetadata: {name: {{ .Values.nope.deeper }}}\n"
    )
    proc = helm("lint", str(bad))
    assert proc.returncode != 0, proc.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(default_render: str, tmp_path: Path, version: str) -> None:
    path = tmp_path / "manifests.yaml"
    path.write_text(default_render)
    proc = run([tool("kubernetes-validate"), "--strict", "-k", version, str(path)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed for resource") >= 8, proc.stdout


def test_kubernetes_validate_can_fail(default_render: str, tmp_path: Path) -> None:
    bad = default_render.replace("readinessProbe:", "readinesProbe:")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    proc = run([tool("kubernetes-validate"), "--strict", "-k", "1.30.0", str(path)], timeout=60)
    assert proc.returncode != 0


_CRD_TS = """
import type {{ Json }} from "./json";
import type {{ IServiceMonitor }} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import type {{ IPrometheusRule }} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
export const sm: Json<IServiceMonitor> = {sm};
export const pr: Json<IPrometheusRule> = {pr};
"""

_CRD_VALIDATE = """
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
let text = "";
for await (const chunk of process.stdin) text += chunk;
const kinds = { ServiceMonitor, PrometheusRule };
let bad = 0;
for (const d of JSON.parse(text)) {
  try { new kinds[d.kind](d).validate(); console.log(`ok ${d.kind}`); }
  catch (e) { bad++; console.log(`FAIL ${d.kind}: ${e.message}`); }
}
process.exit(bad ? 1 : 0);
"""


def test_servicemonitor_and_prometheusrule_match_operator_types(default_render: str) -> None:
    objs = by_kind(default_render)
    sm, pr = objs["ServiceMonitor"], objs["PrometheusRule"]
    proc = tsc_check(_CRD_TS.format(sm=json.dumps(sm, indent=1), pr=json.dumps(pr, indent=1)))
    assert proc.returncode == 0, proc.stdout
    proc = node_script(_CRD_VALIDATE, json.dumps([sm, pr]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = json.loads(json.dumps(sm))
    bad["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    proc = node_script(_CRD_VALIDATE, json.dumps([bad]))
    assert proc.returncode != 0 and "interval" in proc.stdout


def test_pod_contract(default_render: str) -> None:
    objs = by_kind(default_render)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c = container(objs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/cascade", "/app/data", "/tmp"} <= mounts
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CASCADE_CONFIG"] == "/etc/cascade/config.yaml" and env["CASCADE_WORKERS"] == "2"
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    assert c["envFrom"] == [{"secretRef": {"name": "demo-cascade"}}]
    assert "checksum/config" in objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    # HPA owns the replica count.
    assert "replicas" not in objs["Deployment"]["spec"]
    assert objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "demo-cascade"
    assert objs["PodDisruptionBudget"]["spec"]["selector"] == objs["Deployment"]["spec"]["selector"]
    assert objs["Service"]["spec"]["selector"] == objs["Deployment"]["spec"]["selector"]["matchLabels"]
    sm = objs["ServiceMonitor"]["spec"]
    assert sm["endpoints"][0]["port"] == "http" and sm["endpoints"][0]["path"] == "/metrics"
    svc_labels = objs["Service"]["metadata"]["labels"]
    assert svc_labels | sm["selector"]["matchLabels"] == svc_labels  # the ServiceMonitor selects the Service


@pytest.mark.parametrize(
    ("grace", "drain", "expected_min"), [(None, None, 30), (60, None, 60), (7.5, None, 8), (30, 15, 45)]
)
def test_termination_grace_exceeds_drain_window(
    grace: float | None, drain: float | None, expected_min: int
) -> None:
    """The app serves ``drain_delay_s`` after SIGTERM and only then starts its ``shutdown_grace_s``: the
    pod's grace must cover both (with a 15 s drain delay, as the README suggests on Kubernetes, pods were
    killed mid-stream)."""
    values: dict[str, Any] = dict(KEY)
    server = {k: v for k, v in (("shutdown_grace_s", grace), ("drain_delay_s", drain)) if v is not None}
    if server:
        values["config"] = {"server": server}
    pod = by_kind(helm_template(values))["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > expected_min
    assert pod["terminationGracePeriodSeconds"] >= expected_min + 5 + 1  # preStop sleep + margin


def test_config_checksum_follows_config() -> None:
    def checksum(values: dict[str, Any]) -> str:
        d = by_kind(helm_template(values))["Deployment"]
        return d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    a = checksum(KEY)
    b = checksum(KEY | {"config": {"cascades": {"default": {"deadline_s": 60}}}})
    assert a != b
    assert a == checksum(KEY)


def test_configmap_is_a_valid_cascade_config() -> None:
    from app.config import parse_config

    cm = by_kind(helm_template(KEY))["ConfigMap"]
    cfg = parse_config(
        yaml.safe_load(cm["data"]["config.yaml"]), env={"OPENAI_API_KEY": "sk-test", "CASCADE_API_KEY": "k"}
    )
    assert list(cfg.cascades) == ["default"]
    assert cfg.auth.api_keys == ("k",)


def test_config_yaml_override() -> None:
    text = "upstreams:\n  local: {base_url: 'http://llama:8080/v1', model: qwen}\nserver:\n  shutdown_grace_s: 90\n"
    objs = by_kind(helm_template({"configYaml": text}))
    assert objs["ConfigMap"]["data"]["config.yaml"].strip() == text.strip()
    assert objs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 90


def test_secret_and_existing_secret() -> None:
    objs = by_kind(helm_template(KEY))
    assert set(objs["Secret"]["data"]) == {"OPENAI_API_KEY"}  # empty values are left out
    objs = by_kind(helm_template({"secret": {"existingSecret": "llm-keys", "env": {"OPENAI_API_KEY": "x"}}}))
    assert "Secret" not in objs
    assert container(objs)["envFrom"] == [{"secretRef": {"name": "llm-keys"}}]
    objs = by_kind(helm_template({}))
    assert "Secret" not in objs and "envFrom" not in container(objs)


def test_flags() -> None:
    objs = by_kind(
        helm_template(
            KEY
            | {
                "serviceMonitor": {"enabled": False},
                "autoscaling": {"enabled": False},
                "podDisruptionBudget": {"enabled": False},
                "replicaCount": 3,
                "persistence": {"enabled": True, "accessModes": ["ReadWriteMany"]},
            }
        )
    )
    assert {"ServiceMonitor", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PrometheusRule"}.isdisjoint(
        objs
    )
    assert objs["Deployment"]["spec"]["replicas"] == 3
    vols = {v["name"]: v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "demo-cascade"
    assert objs["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_prometheus_rule_is_the_alert_file(default_render: str) -> None:
    pr = by_kind(default_render)["PrometheusRule"]
    assert pr["spec"] == yaml.safe_load((CHART / "files" / "alerts.yml").read_text())


def test_values_schema_rejects_typos() -> None:
    proc = helm("template", str(CHART), "--set-json", json.dumps({"replicaCont": 3}))
    assert proc.returncode != 0, "values.schema.json should reject unknown top-level keys"
    assert "replicaCont" in proc.stderr


def test_persistence_is_one_pod_that_can_be_drained_and_rolled() -> None:
    """A ReadWriteOnce volume with the default HPA (2 pods) or a surge pod stalled rollouts (Multi-Attach)
    or opened one sqlite file twice, and a PDB of minAvailable 1 over one pod blocked every drain."""
    one = KEY | {"persistence": {"enabled": True}, "autoscaling": {"enabled": False}, "replicaCount": 1}
    objs = by_kind(helm_template(one))
    assert objs["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    assert "PodDisruptionBudget" not in objs and "HorizontalPodAutoscaler" not in objs
    assert objs["Deployment"]["spec"]["replicas"] == 1
    proc = helm("template", str(CHART), "--set-json", json.dumps(KEY | {"persistence": {"enabled": True}}))
    assert (
        proc.returncode != 0 and "autoscaling.enabled=false and replicaCount=1" in proc.stderr + proc.stdout
    )
    rolling = by_kind(helm_template(KEY))["Deployment"]["spec"]["strategy"]
    assert rolling["type"] == "RollingUpdate" and rolling["rollingUpdate"]["maxUnavailable"] == 0


def test_the_helm_test_skips_protected_metrics_and_notes_count_autoscaled_pods() -> None:
    def test_pod(values: dict[str, Any]) -> str:
        (pod,) = [
            d
            for d in docs(helm_template(values))
            if d.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test"
        ]
        return str(pod["spec"]["containers"][0]["command"][-1])

    assert '"/metrics"' in test_pod(KEY)
    protected = KEY | {"config": {"auth": {"protect_metrics": True}}}
    assert '"/metrics"' not in test_pod(protected) and '"/readyz"' in test_pod(protected)  # it got a 401
    notes = helm("template", str(CHART), "--set-json", json.dumps(KEY | {"replicaCount": 1}), "--show-notes")
    # The HPA runs 2 pods or more although replicaCount is 1: each has its own sqlite store.
    assert "each replica has its own sqlite learning store" in notes.stdout, notes.stdout[-2000:]
