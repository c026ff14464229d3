"""``app/server.py`` builds on uvicorn internals: they must be there, in the version pinned."""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import uvicorn
from packaging.requirements import Requirement
from uvicorn.supervisors import multiprocess

from app import server

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_uvicorn_is_in_the_pinned_range() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if Requirement(d).name == "uvicorn"]
    assert pin.specifier.contains(version("uvicorn"))
    assert any(s.operator == "<" for s in pin.specifier), "uvicorn must have an upper bound"


def test_the_uvicorn_internals_the_server_patches_exist() -> None:
    # _Server.handle_exit clears the signals uvicorn captured, so a graceful stop exits 0.
    plain = uvicorn.Server(uvicorn.Config(app=server.worker_app))
    assert isinstance(plain._captured_signals, list)
    for name in ("serve", "startup", "on_tick", "handle_exit"):
        assert callable(getattr(uvicorn.Server, name)), name
    # _Process replaces the worker's ``server`` property (built on ``_server``) to run _Server ...
    assert isinstance(multiprocess.Process.__dict__["server"], property)
    assert "self._server" in inspect.getsource(multiprocess.Process.__init__)
    # ... and the supervisor builds its workers from the module-level name that serve() swaps.
    assert "Process(self.config, self.sockets)" in inspect.getsource(multiprocess.Multiprocess)
    assert callable(multiprocess.Multiprocess.handle_hup)  # overridden by _Supervisor
    assert issubclass(server._Process, multiprocess.Process)
    assert issubclass(server._Supervisor, multiprocess.Multiprocess)
