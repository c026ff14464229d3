"""deploy/compose.yaml: Compose-spec validation (after Compose's own interpolation) and wiring."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy._tools import DEPLOY, ROOT, run, tool

COMPOSE = DEPLOY / "compose.yaml"

_VALIDATE = """
import sys, compose_spec
c = compose_spec.PyCompose.from_yaml(sys.stdin.read())
c.validate()
print(" ".join(c.service_names()))
"""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if op in (":?", "?"):
            if (op == ":?" and not val) or val is None:
                raise ValueError(f"required variable {name}: {arg}")
            return val
        return val or ""

    # Comments are not interpolated by Compose: drop them first (no '#' inside our values).
    text = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())
    return re.sub(r"\$\$|\$\{(\w+)((:?[-?])([^}]*))?\}|\$(\w+)", sub, text)


def validate(text: str) -> tuple[int, str]:
    proc = run([tool("python"), "-c", _VALIDATE], input=text, timeout=30)
    return proc.returncode, proc.stdout + proc.stderr


def load() -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), {}))


def test_valid_compose_spec() -> None:
    rc, out = validate(interpolate(COMPOSE.read_text(), {"OPENAI_API_KEY": "sk-x"}))
    assert rc == 0, out
    # The default services, plus the local-models profile's (tests/deploy/test_llama_image.py).
    assert set(out.split()) == {
        "cascade",
        "prometheus",
        "grafana",
        "llama-tiny",
        "llama-small",
        "cascade-local",
    }


def test_default_services_have_no_profile() -> None:
    """`docker compose up` without --profile still runs exactly the proxy, Prometheus and Grafana."""
    services = load()["services"]
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    assert default == {"cascade", "prometheus", "grafana"}
    for name in default:
        assert set(services[name].get("depends_on", {})) <= default, name


def test_validator_rejects_mistakes() -> None:
    text = interpolate(COMPOSE.read_text(), {})
    rc, out = validate(text.replace("stop_grace_period: 40s", "stop_grace_period: forty"))
    assert rc != 0, out
    rc, out = validate(text.replace("restart: unless-stopped", "restart: sometimes", 1))
    assert rc != 0, out


def test_cascade_service() -> None:
    svc = load()["services"]["cascade"]
    assert svc["build"]["context"] == ".." and svc["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    mounts = [v for v in svc["volumes"] if isinstance(v, dict)]
    cfg = next(v for v in mounts if v["target"] == "/etc/cascade/config.yaml")
    assert cfg["source"] == "../config.yaml" and cfg["read_only"] is True
    assert "cascade-data:/app/data" in svc["volumes"]
    env = svc["environment"]
    assert env["CASCADE_CONFIG"] == "/etc/cascade/config.yaml"
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    assert svc["stop_signal"] == "SIGTERM"
    grace = int(svc["stop_grace_period"].rstrip("s"))
    shutdown_grace = yaml.safe_load((DEPLOY / "docker" / "config.yaml").read_text())["server"][
        "shutdown_grace_s"
    ]
    assert grace > shutdown_grace
    assert svc["ports"] == ["8000:8000"]


def test_prometheus_and_grafana_listen_on_loopback_only() -> None:
    """Prometheus runs with its lifecycle API (anyone reaching it could POST /-/quit) and Grafana with
    anonymous viewers and admin/admin by default: published on every interface, a local stack was open
    to the network."""
    services = load()["services"]
    for name in ("prometheus", "grafana"):
        (port,) = services[name]["ports"]
        assert port.startswith("127.0.0.1:"), (name, port)


def test_observability_services_mount_existing_files() -> None:
    services = load()["services"]
    for name in ("prometheus", "grafana"):
        for v in services[name]["volumes"]:
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: mounts missing {src}"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in services["prometheus"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in services["grafana"]["volumes"]


def test_interpolation_helper() -> None:
    assert interpolate("a: ${X:-d} b: ${Y-e} c: $$Z d: $X", {"X": "1"}) == "a: 1 b: e c: $Z d: 1"
    assert interpolate("a: ${X:-d}", {"X": ""}) == "a: d"
    assert interpolate("a: ${X-d}", {"X": ""}) == "a: "


def test_images_pinned() -> None:
    for name, svc in load()["services"].items():
        image = svc.get("image", "")
        if "build" in svc:
            continue
        assert re.match(r"^[\w./-]+:v?\d", image), f"{name}: pin the image tag ({image})"


def test_readme_mentions_config_copy() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "cp deploy/docker/config.yaml config.yaml" in text
    assert Path(DEPLOY / "docker" / "config.yaml").exists()
