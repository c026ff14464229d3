"""Running the app under uvicorn, one process or ``--workers N``: graceful SIGTERM, SIGHUP reload.

SIGTERM (or Ctrl-C): the worker marks itself draining, so ``/readyz`` answers 503, and keeps serving for
``server.drain_delay_s`` (load balancers and Kubernetes stop routing to it meanwhile). Then it stops
accepting, lets in-flight requests and streams finish for up to ``server.shutdown_grace_s``, and exits 0.
A second signal during the drain delay skips the rest of it; a second Ctrl-C during the grace period
forces the exit.

SIGHUP: reload config.yaml in place (``AppState.reload``); with ``--workers N`` the supervisor forwards it
to every worker, and ``POST /admin/reload`` in one worker asks the supervisor to do the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import multiprocess

from app.config import Config, ConfigError
from app.state import AppState

log = logging.getLogger("cascade.server")

_app: FastAPI | None = None
_background: set[asyncio.Task[Any]] = set()
_STARTUP_FAILURE = 3  # uvicorn's code for "failed before serving": the supervisor then gives up
GC_THRESHOLD = 10_000  # allocations between generation-0 collections (CPython default: 700)


def _state() -> AppState | None:
    if _app is None:
        return None
    state: AppState = _app.state.cascade
    return state


class _Server(uvicorn.Server):
    """uvicorn's server plus the drain delay, SIGHUP reload, and exit status 0 after a signal."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._drain_until: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        previous = signal.signal(signal.SIGHUP, self._on_hup)
        try:
            await super().serve(sockets)
        finally:
            signal.signal(signal.SIGHUP, previous)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets and _reuse_port(sockets[0]):
            # A worker: listen on a socket of its own in the supervisor's SO_REUSEPORT group (the
            # supervisor's socket only holds the port), so the kernel balances connections.
            sockets = [_listen_twin(s) for s in sockets]
        await super().startup(sockets)
        tune_gc()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = _state()
        delay = state.runtime.config.server.drain_delay_s if state is not None else 0.0
        if state is not None:
            state.draining = True
        if self._drain_until is None and delay > 0 and not self.should_exit:
            self._drain_until = time.monotonic() + delay
            log.info("draining: /readyz answers 503; shutting down in %.1fs", delay)
        else:
            super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal after its graceful shutdown, which would end the process
        # "killed by SIGTERM"; a graceful stop exits 0.
        self._captured_signals.clear()

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and not self.should_exit and time.monotonic() >= self._drain_until:
            self.should_exit = True
        return await super().on_tick(counter)

    def _on_hup(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(_start_reload)


# Linux spreads connections over an SO_REUSEPORT group; macOS and older BSDs accept the option but give
# every connection to one socket, which would leave the other workers idle: they share one socket.
_BALANCED_REUSEPORT = hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def _reuse_port(sock: socket.socket) -> bool:
    opt = getattr(socket, "SO_REUSEPORT", None)
    return opt is not None and sock.getsockopt(socket.SOL_SOCKET, opt) == 1


def _listen_twin(sock: socket.socket) -> socket.socket:
    twin = socket.socket(sock.family, socket.SOCK_STREAM)
    twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    twin.bind(sock.getsockname())
    return twin


def bind_socket(cfg: Config) -> socket.socket:
    """The supervisor's socket for ``workers > 1``: holds the port (a taken port fails here, before any
    worker starts). With ``server.reuse_port`` (on Linux) it joins an SO_REUSEPORT group that each
    worker's own listening socket joins too; otherwise the workers share it."""
    s = cfg.server
    family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
    try:
        # First without SO_REUSEPORT: that bind fails when anything listens there, including another
        # cascade (which could otherwise join the group and silently take half the connections).
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((s.host, s.port))
            port = probe.getsockname()[1]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if s.reuse_port and _BALANCED_REUSEPORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((s.host, port))
    except OSError as exc:
        log.error("cannot listen", extra={"host": s.host, "port": s.port, "error": str(exc)})
        sys.exit(_STARTUP_FAILURE)
    sock.set_inheritable(True)
    host = f"[{s.host}]" if family == socket.AF_INET6 else s.host
    log.info(f"listening on http://{host}:{sock.getsockname()[1]} with {s.workers} workers")
    return sock


def tune_gc() -> None:
    """Once the app is up: everything built so far (modules, config, clients) lives as long as the
    process, so move it out of the cyclic collector's way (``gc.freeze``), and collect the young
    generation less often; a request allocates a few hundred container objects, nearly all freed by
    reference counting, and the default threshold (700) ran a collection every request or two."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


def _start_reload() -> None:
    state = _state()
    if state is None:
        return
    task = asyncio.ensure_future(_reload(state))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _reload(state: AppState) -> None:
    with contextlib.suppress(ConfigError):  # logged by AppState.reload; the running config stays
        await state.reload()


class _Process(multiprocess.Process):
    """A worker that runs ``_Server`` (uvicorn's runs a plain ``uvicorn.Server``)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = _Server(config=self.config)
        return self._server


class _Supervisor(multiprocess.Multiprocess):
    def keep_subprocess_alive(self) -> None:
        # A worker that died (killed for memory, a failed health check) never ran its own shutdown, so
        # its live gauges (cascade_in_flight_requests, cascade_circuit_open) stayed in the multiprocess
        # files and in every later sum: drop them when uvicorn replaces it.
        before = {p.pid for p in self.processes}
        super().keep_subprocess_alive()
        gone = before - {p.pid for p in self.processes}
        where = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if gone and where:
            from prometheus_client import multiprocess as prometheus_multiprocess

            for pid in gone:
                if pid is not None:
                    prometheus_multiprocess.mark_process_dead(pid, where)  # type: ignore[no-untyped-call]

    def handle_hup(self) -> None:
        # uvicorn restarts every worker on SIGHUP; reloading in place keeps connections and streams.
        log.info("SIGHUP: reloading the config in every worker")
        for p in self.processes:
            if p.pid is not None and p.process.is_alive():
                os.kill(p.pid, signal.SIGHUP)


class _Config(uvicorn.Config):
    """uvicorn's config and what ``_Protocol`` reads from it (it travels to ``--workers`` processes)."""

    read_timeout_s: float | None = None


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline for reading each request: a new connection must send its
    first request whole (head and body) within ``server.read_timeout_s`` of connecting, and each later
    one within that of its first byte, or it is closed (a request whose body was still awaited sees a
    client gone). uvicorn times out only idle keep-alive connections: 3,000 connections that each sent
    half a request head were all held, for ever. One timer per request (~2 us), as uvicorn's keep-alive
    one."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._read_timeout = getattr(config, "read_timeout_s", None)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # (a connection's first request: armed when it connected)
            self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._read_timeout:
            self._deadline = self.loop.call_later(self._read_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def _uvicorn_config(app: Any, cfg: Config, *, factory: bool = False) -> uvicorn.Config:
    s = cfg.server
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        loop = "asyncio"
    ucfg = _Config(
        app,
        host=s.host,
        port=s.port,
        factory=factory,
        loop=loop,
        http=_Protocol,
        lifespan="on",
        access_log=False,
        log_config=None,
        # The proxy never reads the client address, so uvicorn's X-Forwarded-For middleware would only add
        # a layer to every request; and no "server: uvicorn" banner.
        proxy_headers=False,
        server_header=False,
        # uvicorn cancels what is still running after this many seconds (0: at once; None would wait forever).
        timeout_graceful_shutdown=math.ceil(s.shutdown_grace_s),
        timeout_keep_alive=30,
        backlog=4096,
    )
    ucfg.read_timeout_s = s.read_timeout_s
    return ucfg


def _load(path: str, cli: dict[str, Any]) -> Config:
    from app.settings import load_effective

    return load_effective(path, cli)[1]


def worker_app() -> FastAPI:
    """Factory used by each worker process: rebuilds the app from the environment the parent exported."""
    global _app
    from app.logs import setup_logging
    from app.main import create_app

    path = os.environ["CASCADE_CONFIG"]
    try:
        cfg = _load(path, {})
    except ConfigError as exc:  # the file changed since the supervisor checked it
        for line in exc.problems:
            print(line, file=sys.stderr)
        sys.exit(_STARTUP_FAILURE)
    setup_logging(cfg.server.log_level, cfg.server.log_format)
    _app = create_app(cfg, multiprocess_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    state: AppState = _app.state.cascade
    state.loader = lambda: _load(path, {})
    supervisor = os.environ.get("CASCADE_SUPERVISOR_PID", "")
    state.supervisor_pid = int(supervisor) if supervisor.isdigit() else None
    return _app


def serve(config_path: str, cfg: Config, cli: dict[str, Any], metrics_dir: str | None) -> int:
    global _app
    if cfg.server.workers == 1:
        from app.main import create_app

        _app = create_app(cfg)
        _app.state.cascade.loader = lambda: _load(config_path, cli)
        _Server(_uvicorn_config(_app, cfg)).run()
        return 0
    # Workers start fresh and read their settings from here; CLI flags win over the environment.
    os.environ["CASCADE_CONFIG"] = config_path
    os.environ["CASCADE_SUPERVISOR_PID"] = str(os.getpid())
    for key, value in cli.items():
        if value is not None:
            os.environ[f"CASCADE_{key.upper()}"] = str(value)
    ucfg = _uvicorn_config("app.server:worker_app", cfg, factory=True)
    ucfg.workers = cfg.server.workers
    sock = bind_socket(cfg)
    # Multiprocess builds its workers from the module's ``Process``: have it build ours.
    original = multiprocess.Process
    multiprocess.Process = _Process  # type: ignore[misc]
    try:
        _Supervisor(ucfg, sockets=[sock]).run()
    finally:
        multiprocess.Process = original  # type: ignore[misc]
    return 0
