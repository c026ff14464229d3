"""Process-wide state kept on ``app.state.cascade``: the current runtime, metrics, lifecycle flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.metrics import Metrics
from app.runtime import Runtime


@dataclass
class AppState:
    runtime: Runtime
    metrics: Metrics
    draining: bool = False
    multiprocess_dir: str | None = field(default=None)

    def exposition(self) -> tuple[bytes, str]:
        if self.multiprocess_dir and os.path.isdir(self.multiprocess_dir):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST
