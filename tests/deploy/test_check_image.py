"""scripts/check-image end to end: the image's pip steps in a fresh venv, then start, probe and SIGTERM.

Slow (a fresh venv with every dependency from the package index: about 30 s) and starts a server on
127.0.0.1, so it carries the `slow` and `loopback` markers.
"""

from __future__ import annotations

import pytest

from tests.deploy._tools import ROOT, run


@pytest.mark.slow
@pytest.mark.loopback
def test_check_image_builds_starts_and_drains() -> None:
    proc = run(["python3", str(ROOT / "scripts" / "check-image"), "--timeout", "60"], timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    for step in ("/healthz 200", "/readyz 200", "HEALTHCHECK command exits 0", "exited 0 after SIGTERM"):
        assert step in out, f"missing step {step!r}:\n{out[-4000:]}"
