"""Paths and runners for the deployment validators that scripts/install-tools puts in .cache/tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "cascade"
TOOLS = Path(os.environ.get("CASCADE_TOOLS_DIR", ROOT / ".cache" / "tools"))
TOOLS_PY = TOOLS / "venv" / "bin" / "python"
NODE_DIR = TOOLS / "node"

REQUIRED = {
    "hadolint": TOOLS / "bin" / "hadolint",
    "promtool": TOOLS / "bin" / "promtool",
    "kubernetes-validate": TOOLS / "bin" / "kubernetes-validate",
    "tsc": NODE_DIR / "node_modules" / ".bin" / "tsc",
    "python": TOOLS_PY,
    "prometheus": TOOLS / "bin" / "prometheus",
}

_install_output: str | None = None


def ensure_tools() -> None:
    """Install the validators once if any is missing; fail loudly with the installer's error."""
    global _install_output
    missing = [n for n, p in REQUIRED.items() if not p.exists()]
    if not missing:
        return
    if _install_output is None:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install-tools")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        _install_output = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    missing = [n for n, p in REQUIRED.items() if not p.exists()]
    if missing:
        pytest.fail(
            f"validators missing after scripts/install-tools: {missing}\n{_install_output}", pytrace=False
        )


def run(
    cmd: list[str],
    *,
    timeout: float = 60,
    cwd: Path = ROOT,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=input,
        env={**os.environ, **(env or {})},
    )


def tool(name: str) -> str:
    ensure_tools()
    return str(REQUIRED[name])


def helm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    ensure_tools()
    return run([str(TOOLS_PY), str(Path(__file__).with_name("helm_sdk.py")), *args], timeout=timeout)


def helm_template(
    values: dict[str, object] | None = None, *, name: str = "demo", namespace: str = "llm"
) -> str:
    args = ["template", str(CHART), "--name", name, "--namespace", namespace]
    if values:
        args += ["--set-json", json.dumps(values)]
    proc = helm(*args)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@contextmanager
def node_workdir() -> Iterator[Path]:
    """A scratch dir inside the tools' node project, so imports resolve to its node_modules."""
    ensure_tools()
    d = Path(tempfile.mkdtemp(prefix="check-", dir=NODE_DIR))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


TS_JSON = """
// Grafana's and kubernetes-models' types use TS enums; JSON carries their values.
export type Json<T> = T extends string ? (string extends T ? string : `${T}`)
  : T extends number | boolean | null | undefined ? T
  : T extends Array<infer U> ? Array<Json<U>>
  : T extends object ? { [K in keyof T]: Json<T[K]> } : T;
"""


def tsc_check(source: str) -> subprocess.CompletedProcess[str]:
    """Type-check one TypeScript module (object literals get excess-property checks)."""
    with node_workdir() as d:
        (d / "json.ts").write_text(TS_JSON)
        (d / "check.ts").write_text(source)
        (d / "tsconfig.json").write_text(
            json.dumps(
                {
                    "compilerOptions": {
                        "strict": True,
                        "noEmit": True,
                        "module": "esnext",
                        "moduleResolution": "bundler",
                        "target": "es2022",
                        "skipLibCheck": True,
                        "types": [],
                    },
                    "files": ["json.ts", "check.ts"],
                }
            )
        )
        return run([tool("tsc"), "-p", str(d)], timeout=120)


def node_script(source: str, stdin: str) -> subprocess.CompletedProcess[str]:
    with node_workdir() as d:
        (d / "script.mjs").write_text(source)
        return run(["node", str(d / "script.mjs")], input=stdin, timeout=60)
