"""Running the app under uvicorn, one process or ``--workers N``, with a graceful SIGTERM.

On SIGTERM (or Ctrl-C) the worker marks itself draining (``/readyz`` answers 503 on connections that are
still open), stops accepting, lets in-flight requests and streams finish for up to
``server.shutdown_grace_s``, then exits 0.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from app.config import Config

_app: FastAPI | None = None


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if _app is not None:
            _app.state.cascade.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the captured SIGTERM after a graceful shutdown, which would make the process
        # die by the signal (exit 143) instead of exiting 0 as the contract says. The drain already
        # happened, so the signal has done its job: forget it.
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _uvicorn_config(app: Any, cfg: Config, *, factory: bool = False) -> uvicorn.Config:
    s = cfg.server
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        loop = "asyncio"
    return uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        factory=factory,
        loop=loop,
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(s.shutdown_grace_s) or None,
        timeout_keep_alive=30,
        backlog=4096,
    )


def worker_app() -> FastAPI:
    """Factory used by each worker process: rebuilds the app from the environment the parent exported."""
    global _app
    from app.cli import load_effective
    from app.logs import setup_logging
    from app.main import create_app

    _, cfg = load_effective(os.environ["CASCADE_CONFIG"], {})
    setup_logging(cfg.server.log_level, cfg.server.log_format)
    _app = create_app(cfg, multiprocess_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    return _app


def serve(config_path: str, cfg: Config, cli: dict[str, Any], metrics_dir: str | None) -> int:
    global _app
    if cfg.server.workers == 1:
        from app.main import create_app

        _app = create_app(cfg)
        _Server(_uvicorn_config(_app, cfg)).run()
        return 0
    from uvicorn.supervisors import Multiprocess

    # Workers start fresh and read their settings from here; CLI flags win over the environment.
    os.environ["CASCADE_CONFIG"] = config_path
    for key, value in cli.items():
        if value is not None:
            os.environ[f"CASCADE_{key.upper()}"] = str(value)
    ucfg = _uvicorn_config("app.server:worker_app", cfg, factory=True)
    ucfg.workers = cfg.server.workers
    sock = ucfg.bind_socket()
    Multiprocess(ucfg, sockets=[sock]).run()
    return 0
