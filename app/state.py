"""Process-wide state kept on ``app.state.cascade``: the current runtime, metrics, lifecycle flags, and the
config reload behind SIGHUP and ``POST /admin/reload``.

A reload builds a whole new ``Runtime`` beside the running one and swaps one reference. A request reads
``state.runtime`` once, when it starts, and keeps that runtime to its end; so in-flight requests finish on
the config they started with. A config that does not load or build is rejected: its problems are logged
(dotted paths, never values) and the running config stays. The new upstream clients share the process's
one HTTP transport and adopt the circuit breaker and concurrency slots of the old client of the same name
when those settings did not change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.budgets import Budgets
from app.config import Config, ConfigError
from app.metrics import Metrics
from app.runtime import Runtime, build_runtime
from app.upstream.transport import Transport

if TYPE_CHECKING:
    from app.cascade.trace import Trace
    from app.learning.service import Learning

log = logging.getLogger("cascade.reload")

# Returns the effective config (file + environment + command line), raising ConfigError.
Loader = Callable[[], Config]

# Server settings read once at startup: a reload that changes them only logs that a restart is needed.
_RESTART_ONLY = ("host", "port", "workers", "max_connections", "log_level", "log_format", "read_timeout_s")


@dataclass
class AppState:
    runtime: Runtime
    metrics: Metrics
    draining: bool = False
    multiprocess_dir: str | None = field(default=None)
    http: Transport | None = None  # the shared upstream transport (new runtimes are built on it)
    loader: Loader | None = None  # set by the server; None: this app cannot reload
    supervisor_pid: int | None = None  # --workers N: the supervisor that fans SIGHUP out to every worker
    reloads: int = 0
    learning: Learning | None = None  # trace store, labels, tuning (config ``learning``); outlives reloads
    budgets: Budgets = field(default_factory=Budgets)  # today's spend per named key; outlives reloads
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def __post_init__(self) -> None:
        self._wire(self.runtime)

    async def exposition(self) -> tuple[bytes, str]:
        if self.multiprocess_dir:
            # Every worker's metric files are read and merged: file I/O, kept off the event loop.
            return await asyncio.to_thread(_multiprocess_exposition, self.multiprocess_dir, self.metrics)
        return generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST

    # --- reload ------------------------------------------------------------------------------------

    async def reload(self) -> Runtime:
        """Load, build and swap in the config; raise ConfigError (logged) and keep the old one if it is
        bad. Reloads are serialised."""
        async with self._lock:
            if self.loader is None or self.http is None:
                raise ConfigError(["reload: this app was not started from a config file"])
            old = self.runtime
            try:
                # Reading YAML, importing python scorers and loading model files block: a thread builds
                # the runtime; the swap below happens on the loop, in one assignment.
                cfg, new = await asyncio.to_thread(_load_and_build, self.loader, self.http, self.metrics)
            except ConfigError as exc:
                log.error(
                    "config reload rejected; the running config is kept", extra={"problems": exc.problems}
                )
                raise
            except Exception as exc:  # unforeseen: its type only (an exception's text may quote the file)
                problems = [f"reload: the config could not be loaded ({type(exc).__name__})"]
                log.error("config reload rejected; the running config is kept", extra={"problems": problems})
                raise ConfigError(problems) from None
            for name, up in new.upstreams.items():
                previous = old.upstreams.get(name)
                if previous is not None:
                    up.adopt_guards(previous)
            self._wire(new)
            self.runtime = new
            self.reloads += 1
            stale = [k for k in _RESTART_ONLY if getattr(old.config.server, k) != getattr(cfg.server, k)]
            if stale:
                log.warning(
                    "config reloaded; these server settings take effect on restart only",
                    extra={"settings": [f"server.{k}" for k in stale]},
                )
            log.info(
                "config reloaded",
                extra={
                    "upstreams": len(cfg.upstreams),
                    "cascades": len(cfg.cascades),
                    "reloads": self.reloads,
                },
            )
            return new

    def tell_other_workers(self) -> bool:
        """With ``--workers N``, ask the supervisor to reload every worker (it forwards SIGHUP)."""
        if self.supervisor_pid is None:
            return False
        try:
            os.kill(self.supervisor_pid, signal.SIGHUP)
        except OSError:
            log.warning("could not signal the supervisor to reload the other workers")
            return False
        return True

    def _wire(self, rt: Runtime) -> None:
        """Point the runtime's upstream guards at the metrics (also for adopted breakers), and count
        each named key's spend for its budget."""
        if rt.config.auth.keys:
            rt.finish_hooks.append(self._count_spend)
        for up in rt.upstreams.values():
            up.on_rejected = self.metrics.upstream_refused
            up.breaker.on_change = self.metrics.circuit_state
            self.metrics.circuit_state(up.name, up.breaker.state, changed=False)
        if self.learning is not None:
            self.learning.attach(rt)

    def _count_spend(self, trace: Trace, ok: bool, seconds: float) -> None:
        if trace.key is not None:
            self.budgets.add(trace.key, trace.cost_usd)


def _load_and_build(loader: Loader, http: Transport, metrics: Metrics) -> tuple[Config, Runtime]:
    cfg = loader()
    return cfg, build_runtime(cfg, http, metrics)


def _multiprocess_exposition(path: str, metrics: Metrics) -> tuple[bytes, str]:
    if not os.path.isdir(path):
        return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
