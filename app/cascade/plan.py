"""What a request runs: a cascade's stages with their upstream clients, scorers and thresholds.

Plans are built once per config load. A pass-through request (model = an upstream name) runs a
one-stage plan named after that upstream. Thresholds live in a small mutable table so online tuning can
move them without rebuilding anything; each request reads them once, at its start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.cascade.control import Window
from app.config import Config
from app.errors import InvalidRequest, ModelNotFound
from app.scoring.base import Configured, StreamCheck
from app.scoring.registry import ScorerDeps, build_stage_scorers
from app.scoring.router import Router
from app.upstream.client import Upstream


@dataclass(slots=True)
class Stage:
    index: int
    upstream: Upstream
    threshold: float | None  # None on the last stage: always accepted
    scorers: Sequence[Configured] = ()
    stream_checks: Sequence[StreamCheck] = ()
    needs_logprobs: bool = False
    early_abort: bool = False
    # Hedged escalation: seconds after which the next stage starts in parallel, "p95" (learned from
    # the upstream's recent latency), or None (no hedging).
    hedge_after: float | str | None = None
    # The upstream streams answers to requests with tools (``stream_tools``); when not, such a request is
    # asked unstreamed even as the streamed last stage, and its answer replayed as chunks.
    stream_tools: bool = True

    def hedge_delay(self) -> float | None:
        """Seconds to wait before hedging this stage now; None: do not hedge (not configured, or a
        ``p95`` stage whose upstream has too few observations yet)."""
        h = self.hedge_after
        if h is None or isinstance(h, float):
            return h
        return self.upstream.latency.p95()


@dataclass(slots=True)
class Plan:
    name: str
    stages: Sequence[Stage]
    deadline_s: float
    passthrough: bool = False
    thresholds: list[float | None] = field(default_factory=list)
    fallback: str = "none"  # "best_rejected": serve the best earlier answer when the last stage fails
    router: Router | None = None  # route-then-cascade: may start a request at the last stage

    def first_stage(self, body: Mapping[str, Any]) -> int:
        """Where a request starts: the last stage when the router says the earlier ones would be
        rejected anyway, else stage 0."""
        if self.router is not None and len(self.stages) > 1 and self.router.skips(body):
            return len(self.stages) - 1
        return 0

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def check_n(self, body: Mapping[str, Any], window: Window | None = None) -> None:
        """``n`` > 1 needs every stage the request may reach (its ``window``; None: all) to honour
        ``n`` (``supports_n``): one that ignores it would answer with one choice where the client asked
        for several, so the request is refused (400, param ``n``) rather than answered short. A stage
        outside the window (``max_stage``, ``min_stage``, a key's cap) cannot answer it."""
        n = body.get("n")
        if n is None or n == 1:
            return
        reach = self.stages if window is None else self.stages[window.first : window.last + 1]
        for st in reach:
            if not st.upstream.cfg.supports_n:
                where = "" if self.passthrough else f" (stage {st.index} of cascade '{self.name}')"
                raise InvalidRequest(
                    f"'n': {n} choices were asked, but upstream '{st.upstream.name}'{where} does not "
                    "support n (supports_n: false in the proxy's config). Send n: 1 (or leave it out) "
                    "and make parallel requests instead.",
                    param="n",
                )


class Plans:
    def __init__(self, plans: Mapping[str, Plan], created: int) -> None:
        self._plans = dict(plans)
        self.created = created

    def resolve(self, model: str) -> Plan:
        plan = self._plans.get(model)
        if plan is None:
            raise ModelNotFound(
                f"The model '{model[:200]}' does not exist: "
                "it is neither a cascade nor an upstream of this proxy.",
                param="model",
            )
        return plan

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._plans.values())

    def get(self, name: str) -> Plan | None:
        return self._plans.get(name)


def build_plans(cfg: Config, upstreams: Mapping[str, Upstream], deps: ScorerDeps, created: int) -> Plans:
    plans: dict[str, Plan] = {}
    for name, up in upstreams.items():
        ucfg = cfg.upstreams[name]
        deadline = max(120.0, ucfg.timeout_s * (ucfg.max_retries + 1) + 10)
        stage = Stage(0, up, None, stream_tools=ucfg.stream_tools)
        plan = Plan(name, [stage], deadline, passthrough=True)
        plan.thresholds = [None]
        plans[name] = plan
    for cname, ccfg in cfg.cascades.items():
        stages = []
        for i, scfg in enumerate(ccfg.stages):
            scorers = build_stage_scorers(f"cascades.{cname}.stages[{i}]", scfg, deps)
            checks = (
                [c.scorer for c in scorers if isinstance(c.scorer, StreamCheck)] if scfg.early_abort else []
            )
            needs_lp = any(getattr(c.scorer, "needs_logprobs", False) for c in scorers)
            early = bool(checks)
            hedge = (
                float(scfg.hedge_after_s)
                if isinstance(scfg.hedge_after_s, int | float)
                else scfg.hedge_after_s
            )
            up = upstreams[scfg.upstream]
            stages.append(
                Stage(
                    i, up, scfg.threshold, scorers, checks, needs_lp, early, hedge,
                    stream_tools=cfg.upstreams[scfg.upstream].stream_tools,
                )
            )  # fmt: skip
        router = Router.load(ccfg.router, f"cascades.{cname}") if ccfg.router is not None else None
        plan = Plan(cname, stages, ccfg.deadline_s, fallback=ccfg.fallback, router=router)
        plan.thresholds = [s.threshold for s in stages]
        plans[cname] = plan
    return Plans(plans, created)
