"""Everything built from one config load: upstream clients, plans, the engine, and the request hook.

A reload builds a new ``Runtime`` beside the old one and swaps a single reference, so a request keeps the
runtime it started with and a bad config never replaces a good one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.budgets import NamedKey, named_keys
from app.cascade.control import OPEN, Policy
from app.cascade.engine import Engine
from app.cascade.plan import Plans, build_plans
from app.cascade.trace import Trace
from app.config import Config
from app.metrics import Metrics
from app.scoring.registry import ScorerDeps
from app.upstream.client import Upstream
from app.upstream.transport import Transport

log = logging.getLogger("cascade.request")


@dataclass(slots=True)
class Runtime:
    config: Config
    upstreams: dict[str, Upstream]
    plans: Plans
    engine: Engine
    keys: tuple[bytes, ...]  # every proxy key (api_keys and auth.keys); empty: no auth
    # Called at the end of every request, after its metrics (the trace store enqueues it here).
    finish_hooks: list[Callable[[Trace, bool, float], None]] = field(default_factory=list)
    named: tuple[NamedKey | None, ...] = ()  # per key in ``keys``: its auth.keys entry (None: api_keys)
    plain: Policy = OPEN  # what requests with an api_keys key, or none, may do


def build_runtime(config: Config, http: Transport, metrics: Metrics) -> Runtime:
    upstreams = {
        name: Upstream(name, ucfg, http, on_error=metrics.upstream_error, on_duration=metrics.upstream_call)
        for name, ucfg in config.upstreams.items()
    }
    plans = build_plans(config, upstreams, ScorerDeps(http, upstreams), int(time.time()))
    scored = {
        (plan.name, i, t)
        for plan in plans
        if not plan.passthrough
        for i, t in enumerate(plan.thresholds)
        if t is not None
    }
    metrics.keep_thresholds({(name, str(i)) for name, i, _ in scored})  # a reload may remove some
    for name, i, t in scored:
        metrics.set_threshold(name, i, t)

    hooks: list[Callable[[Trace, bool, float], None]] = []

    def on_finish(trace: Trace, ok: bool, seconds: float) -> None:
        trace.record(metrics, ok=ok, seconds=seconds)
        for hook in hooks:
            hook(trace, ok, seconds)
        a = trace.accepted
        log.info(
            "request",
            extra={
                "request_id": trace.request_id,
                "cascade": trace.cascade,
                "outcome": trace.outcome(ok),
                "stream": trace.stream,
                "stage": a.stage if a else None,
                "upstream": a.upstream if a else None,
                "escalations": trace.escalations,
                "attempts": len(trace.attempts),
                "cost_usd": round(trace.cost_usd, 10),
                "key": trace.key,
                "hedged": trace.hedged,
                "latency_ms": round(seconds * 1000, 1),
            },
        )

    engine = Engine(on_finish, on_first_byte=metrics.first_token)
    entries = named_keys(config.auth)
    keys = tuple(secret for secret, _ in entries)
    named = tuple(n for _, n in entries)
    plain = Policy(None, config.auth.stage_control)
    return Runtime(config, upstreams, plans, engine, keys, hooks, named, plain)
