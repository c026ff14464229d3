"""scripts/install-tools is idempotent and every validator answers."""

from __future__ import annotations

from tests.deploy._tools import REQUIRED, ROOT, helm, run, tool


def test_install_tools_is_idempotent() -> None:
    tool("promtool")  # installs everything first when missing
    before = {name: path.stat().st_mtime_ns for name, path in REQUIRED.items()}
    proc = run(["bash", str(ROOT / "scripts" / "install-tools")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("up to date") == 3, proc.stderr
    # A second run leaves every installed tool as it was: nothing downloaded or rebuilt.
    assert {name: path.stat().st_mtime_ns for name, path in REQUIRED.items()} == before


def test_validators_run() -> None:
    assert run([tool("hadolint"), "--version"]).returncode == 0
    assert run([tool("promtool"), "--version"]).returncode == 0
    assert run([tool("kubernetes-validate"), "--version"]).returncode == 0
    assert run([tool("tsc"), "--version"]).stdout.startswith("Version 5.")
    proc = helm("version")
    assert proc.returncode == 0 and "helm-sdk v4" in proc.stdout, proc.stdout + proc.stderr
