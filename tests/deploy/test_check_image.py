"""scripts/check-image end to end: the image's pip steps in a fresh venv, then start, probe and SIGTERM.

Slow (a fresh venv with every dependency from the package index: about 30 s) and starts a server on
127.0.0.1, so it carries the `slow` and `loopback` markers.
"""

from __future__ import annotations

from typing import Any

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


def _check_image_docker() -> Any:
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader("check_image_docker", str(ROOT / "scripts" / "check-image-docker"))
    spec = spec_from_loader("check_image_docker", loader)
    assert spec is not None
    module = module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_check_image_docker_config_is_valid() -> None:
    """The two-stage config the real-image check mounts into its containers stays a valid config."""
    import yaml

    from app.config import parse_config

    cid = _check_image_docker()
    cfg = parse_config(yaml.safe_load(cid.CHECK_CONFIG.format(port=8081)), env={})
    assert [s.upstream for s in cfg.cascades["default"].stages] == ["small", "large"]
    assert cfg.learning is not None and cfg.learning.store == "sqlite:///./data/traces.db"


def test_check_image_docker_mirror_and_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    cid = _check_image_docker()
    monkeypatch.setenv("CASCADE_DEBIAN_MIRROR", "http://mirror.invalid/debian")
    assert cid.debian_mirror() == "http://mirror.invalid/debian"
    monkeypatch.setattr(cid.os, "geteuid", lambda: 1000)
    assert "root" in (cid.can_run() or "")
    assert cid.main([]) == 0  # skipped, saying why
    assert cid.main(["--require"]) == 1
