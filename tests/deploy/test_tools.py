"""scripts/install-tools is idempotent and every validator answers."""

from __future__ import annotations

import time

from tests.deploy._tools import ROOT, helm, run, tool


def test_install_tools_is_idempotent() -> None:
    tool("promtool")  # installs everything first when missing
    t0 = time.monotonic()
    proc = run(["bash", str(ROOT / "scripts" / "install-tools")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("up to date") == 3, proc.stderr
    assert time.monotonic() - t0 < 10


def test_validators_run() -> None:
    assert run([tool("hadolint"), "--version"]).returncode == 0
    assert run([tool("promtool"), "--version"]).returncode == 0
    assert run([tool("kubernetes-validate"), "--version"]).returncode == 0
    assert run([tool("tsc"), "--version"]).stdout.startswith("Version 5.")
    proc = helm("version")
    assert proc.returncode == 0 and "helm-sdk v4" in proc.stdout, proc.stdout + proc.stderr
