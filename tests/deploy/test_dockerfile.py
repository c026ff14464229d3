"""Dockerfile and .dockerignore: hadolint, the properties the deployment relies on, no data in the image."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.deploy._tools import DEPLOY, ROOT, run, tool


def _check_image() -> ModuleType:
    """scripts/check-image has no .py suffix: load it as the module `check_image`."""
    loader = SourceFileLoader("check_image", str(ROOT / "scripts" / "check-image"))
    spec = importlib.util.spec_from_loader("check_image", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_image"] = module  # dataclasses look their module up here
    loader.exec_module(module)
    return module


ci = _check_image()


@pytest.fixture(scope="module")
def stages() -> list:
    return ci.parse_dockerfile((ROOT / "Dockerfile").read_text())


def _ops(stage, op: str) -> list[str]:
    return [i.args for i in stage.instructions if i.op == op]


def test_hadolint_clean() -> None:
    proc = run([tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"], timeout=30)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD cascade serve\n")
    proc = run([tool("hadolint"), "--no-color", str(bad)], timeout=30)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # :latest
    assert "DL3025" in proc.stdout  # CMD not in JSON form


def test_multi_stage_slim_runtime(stages) -> None:
    assert [s.name for s in stages] == ["builder", "runtime"]
    for s in stages:
        assert s.base.startswith("python:3.11-slim"), s.base
    assert any("pip" in r and "wheel" in r for r in _ops(stages[0], "RUN"))
    copies = _ops(stages[1], "COPY")
    assert any(c.startswith("--from=builder") for c in copies), copies
    # Nothing but the package and the default config goes in.
    for c in copies:
        assert "shared" not in c and "tests" not in c and "bench" not in c, c


def test_runtime_contract(stages) -> None:
    rt = stages[-1]
    user = _ops(rt, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER must be a numeric non-root uid (runAsNonRoot): {user}"
    assert _ops(rt, "STOPSIGNAL") == ["SIGTERM"]
    assert "8000" in _ops(rt, "EXPOSE")[0].split()
    assert json.loads(_ops(rt, "VOLUME")[0]) == ["/app/data"]
    assert _ops(rt, "WORKDIR")[-1] == "/app"  # sqlite:///./data/traces.db -> /app/data
    entry = ci.parse_exec(_ops(rt, "ENTRYPOINT")[0]) + ci.parse_exec(_ops(rt, "CMD")[0])
    assert entry == ["cascade", "serve"]
    env: dict[str, str] = {}
    for args in _ops(rt, "ENV"):
        env.update(ci.parse_kv(args, env))
    assert env["CASCADE_CONFIG"] == "/etc/cascade/config.yaml"
    # Server settings in the image's environment beat the config file: a mounted config's `server`
    # section (workers: 3, log_format: text, a port) was silently overridden by them.
    assert not {"CASCADE_HOST", "CASCADE_PORT", "CASCADE_WORKERS", "CASCADE_LOG_FORMAT"} & set(env)
    assert "PROMETHEUS_MULTIPROC_DIR" not in env  # the service manages its own
    copies = _ops(rt, "COPY")
    assert any(c.endswith("/etc/cascade/config.yaml") for c in copies)


def test_healthcheck_uses_python_on_healthz(stages) -> None:
    (hc,) = _ops(stages[-1], "HEALTHCHECK")
    cmd = hc[hc.index("CMD") + 3 :].strip()
    assert ci.parse_exec(cmd) == ["python", "-m", "app.healthcheck"]
    assert "curl" not in hc and "wget" not in hc


def test_default_config_is_valid() -> None:
    from app.config import parse_config

    raw = yaml.safe_load((DEPLOY / "docker" / "config.yaml").read_text())
    cfg = parse_config(raw, env={"OPENAI_API_KEY": "sk-test"})
    assert "default" in cfg.cascades
    assert cfg.learning is not None and cfg.learning.store == "sqlite:///./data/traces.db"


def test_build_context_has_no_data(tmp_path: Path) -> None:
    files = ci.build_context(ROOT, ci.load_dockerignore(ROOT / ".dockerignore"))
    ci.check_context(ROOT, files)
    assert "pyproject.toml" in files and "deploy/docker/config.yaml" in files
    assert any(f.startswith("app/") for f in files)
    for f in files:
        assert not f.startswith((".git/", ".venv", ".cache/", "tests/", "bench/", "shared/", "data/")), f


def test_dockerignore_keeps_shared_data_out(tmp_path: Path) -> None:
    """A checkout with shared/ (or data) inside the repository still builds a clean context."""
    ctx = tmp_path / "repo"
    shutil.copytree(ROOT / "app", ctx / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / ".dockerignore", ctx / ".dockerignore")
    (ctx / "pyproject.toml").write_text("[project]\nname='x'\n")
    planted = [
        "shared/data/routerbench/routerbench_0shot.pkl",
        "shared/CONTRACT.md",
        "data/traces.db",
        "app/replay/fixtures/routerbench.jsonl",
        "tests/data/sample.jsonl",
        ".venv/lib/big.so",
        "config.yaml",
        ".env",
    ]
    for rel in planted:
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text("x")
    files = ci.build_context(ctx, ci.load_dockerignore(ctx / ".dockerignore"))
    leaked = sorted(set(planted) & set(files))
    assert not leaked, f".dockerignore lets these into the image: {leaked}"
    ci.check_context(ctx, files)


def test_context_check_fails_on_data(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "routerbench.parquet").write_text("x")
    with pytest.raises(ci.CheckFailed):
        ci.check_context(tmp_path, ["app/routerbench.parquet"])


def test_check_image_plan() -> None:
    proc = run(["python3", str(ROOT / "scripts" / "check-image"), "--plan"], timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip" in proc.stdout and "skip RUN" in proc.stdout


@pytest.mark.loopback
@pytest.mark.parametrize("form", ["--port N", "--port=N", "CASCADE_PORT", "server.port"])
def test_healthcheck_probes_the_port_served(stages, tmp_path: Path, form: str) -> None:
    """`docker run IMAGE serve --port N` (PID 1's argv, also behind --init) wins over CASCADE_PORT, which
    wins over the config file's server.port: the settings' own precedence."""
    import http.server
    import socket
    import threading

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nothing listens on: probing it fails
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    port = srv.server_address[1]
    argv = {
        "--port N": ["docker-init", "--", "cascade", "serve", "--port", str(port)],
        "--port=N": ["cascade", "serve", f"--port={port}"],
        "CASCADE_PORT": ["cascade", "serve"],
        "server.port": ["cascade", "serve"],
    }[form]
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    config = tmp_path / "config.yaml"
    config.write_text(f"server: {{port: {port if form == 'server.port' else closed}}}\n")
    (hc,) = _ops(stages[-1], "HEALTHCHECK")
    probe = [sys.executable, *ci.parse_exec(hc[hc.index("CMD") + 3 :].strip())[1:], str(cmdline)]
    env = {"CASCADE_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    if form != "server.port":
        env["CASCADE_PORT"] = str(port) if form == "CASCADE_PORT" else str(closed)
    try:
        ok = run(probe, env=env, timeout=30)
        assert ok.returncode == 0, ok.stderr
        if form.startswith("--port"):  # the served port decides, not CASCADE_PORT
            cmdline.write_bytes(cmdline.read_bytes().replace(str(port).encode(), str(closed).encode()))
            bad = run(probe, env={**env, "CASCADE_PORT": str(port)}, timeout=30)
            assert bad.returncode != 0
    finally:
        srv.shutdown()
        srv.server_close()
