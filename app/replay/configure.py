"""What `cascade replay` runs: the cascade config pointed at the replay upstream, and its thresholds.

Two sources:

* :func:`fitted_config` (no ``--config``): the chain, thresholds and learned scorer files that
  :func:`app.learning.train.fit_cascade` chose on the train rows become a one-cascade config; every stage
  has a ``{type: learned, model: <file>}`` scorer, with ``{type: agreement}`` beside it where the fit
  blends the two (``FittedCascade.stage_scorers``).
* :func:`mapped_config` (``--config``): the user's cascade with each upstream it uses mapped onto a dataset
  model (its ``model`` id, else its name: exact, case-insensitive, or without the ``org/`` prefix;
  ``--map UPSTREAM=MODEL`` overrides) and its scorers kept as written. :func:`calibrate_thresholds`
  (``--target-quality``) then chooses that cascade's thresholds on the train rows: it runs the stage
  scorers the proxy builds from the same config, in-process, on every train row's recorded answers, and
  searches the cheapest thresholds whose train quality - ``margin_z`` x SE reaches the target (the
  search ``fit_cascade`` uses).

Every replay upstream charges the recorded cost (``price: {reported: true}``), never retries and has
no circuit breaker, so the run is deterministic.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.config import (
    CircuitConfig,
    Config,
    JudgeScorer,
    Price,
    ServerConfig,
    parse_config,
)
from app.errors import CascadeBaseError
from app.learning.rows import Row
from app.learning.thresholds import candidate_thresholds, candidates_per_stage, choose_thresholds
from app.learning.train import FittedCascade
from app.replay.upstream import ROW_ID_FIELD, Served, build_completion

REPLAY_CASCADE = "replay"
UPSTREAM_TIMEOUT_S = 60.0


class ReplayError(CascadeBaseError):
    """A replay that cannot run as asked (bad dataset, unmapped model, missing extra): exit code 2."""


@dataclass
class ReplayPlan:
    """The cascade to replay: its config (pointing at the replay upstream) and what it means."""

    config: Config
    cascade: str
    upstream_models: dict[str, str]  # upstream name -> dataset model
    stages: list[str]  # dataset model per stage
    thresholds: list[float]
    curve: list[tuple[float, float]] = field(default_factory=list)  # train (cost, accuracy) frontier
    notes: list[str] = field(default_factory=list)

    @property
    def routed(self) -> bool:
        """Whether the cascade has a router (route-then-cascade)."""
        return self.config.cascades[self.cascade].router is not None


def request_body(model: str, row: Row) -> dict[str, Any]:
    """The chat request the replay sends for a row."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": row.prompt}],
        "metadata": {ROW_ID_FIELD: row.id},
    }


def upstream_names(models: Sequence[str]) -> dict[str, str]:
    """Dataset model -> a plain upstream name (``org/Model`` -> ``org-Model``), unique."""
    out: dict[str, str] = {}
    used: set[str] = {REPLAY_CASCADE}
    for m in models:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", m).strip("-") or "model"
        name, i = base, 2
        while name in used:
            name, i = f"{base}-{i}", i + 1
        used.add(name)
        out[m] = name
    return out


def _replay_upstream(url: str, model: str, logprobs: bool = False) -> dict[str, Any]:
    return {
        "base_url": f"{url}/v1",
        "model": model,
        "price": {"reported": True},
        "timeout_s": UPSTREAM_TIMEOUT_S,
        "max_retries": 0,
        "circuit": False,
        "logprobs": logprobs,
    }


def fitted_config(
    fitted: FittedCascade, scorer_paths: Sequence[str], url: str, router_path: str | None = None
) -> ReplayPlan:
    names = upstream_names(fitted.models)
    stages: list[dict[str, Any]] = []
    for k, m in enumerate(fitted.models):
        st: dict[str, Any] = {"upstream": names[m]}
        if k < len(fitted.models) - 1:
            st["threshold"] = fitted.thresholds[k]
            st["scorers"] = fitted.stage_scorers(k, scorer_paths[k])
        stages.append(st)
    cascade: dict[str, Any] = {"deadline_s": 600, "stages": stages}
    if router_path is not None and fitted.router_threshold is not None:
        cascade["router"] = {"model": router_path, "threshold": fitted.router_threshold}
    raw = {
        "server": {"log_level": "warning"},
        "upstreams": {names[m]: _replay_upstream(url, m) for m in fitted.models},
        "cascades": {REPLAY_CASCADE: cascade},
    }
    cfg = parse_config(raw, env={})
    return ReplayPlan(
        cfg,
        REPLAY_CASCADE,
        {names[m]: m for m in fitted.models},
        list(fitted.models),
        list(fitted.thresholds),
    )


def _short(name: str) -> str:
    return name.lower().rsplit("/", 1)[-1]


def match_model(wanted: str, models: Sequence[str]) -> str | None:
    """The dataset model named ``wanted``: exact, else the only one equal case-insensitively, else the
    only one equal without the ``org/`` prefixes."""
    if wanted in models:
        return wanted
    for hits in (
        [m for m in models if m.lower() == wanted.lower()],
        [m for m in models if _short(m) == _short(wanted)],
    ):
        if len(hits) == 1:
            return hits[0]
    return None


def _pick_cascade(cfg: Config, name: str | None) -> str:
    if name is not None:
        if name not in cfg.cascades:
            raise ReplayError(
                f"--cascade: the config has no cascade '{name}' (has: {', '.join(cfg.cascades)})"
            )
        return name
    if not cfg.cascades:
        raise ReplayError("the config defines no cascade to replay")
    return "default" if "default" in cfg.cascades else next(iter(cfg.cascades))


def mapped_config(
    cfg: Config,
    models: Sequence[str],
    url: str,
    cascade: str | None = None,
    explicit: Mapping[str, str] | None = None,
) -> ReplayPlan:
    """The user's cascade, every upstream it uses pointed at the replay upstream (see module doc)."""
    explicit = dict(explicit or {})
    name = _pick_cascade(cfg, cascade)
    ccfg = cfg.cascades[name]
    used: list[str] = []
    notes: list[str] = []
    for st in ccfg.stages:
        used.append(st.upstream)
        for sc in st.scorers:
            if isinstance(sc, JudgeScorer):
                used.append(sc.upstream)
            if sc.type in ("judge", "self_verify", "consistency"):
                notes.append(
                    f"{sc.type} scorers ask for new generations, which a recorded dataset does not have: "
                    "they fail and follow their on_error"
                )
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for up in dict.fromkeys(used):
        if up in explicit:
            got = explicit[up] if explicit[up] in models else None
        else:
            got = match_model(cfg.upstreams[up].model, models) or match_model(up, models)
        if got is None:
            problems.append(
                f"upstreams.{up}: model '{cfg.upstreams[up].model}' is not a model of this dataset "
                f"(use --map {up}=MODEL; models: {', '.join(models)})"
            )
        else:
            mapping[up] = got
    if problems:
        raise ReplayError("\n".join(problems))
    ups = {
        up: cfg.upstreams[up].model_copy(
            update={
                "base_url": f"{url}/v1",
                "model": mapping[up],
                "api_key": None,
                "headers": {},
                "price": Price(reported=True),
                "max_retries": 0,
                "circuit": CircuitConfig(enabled=False),
                "max_concurrency": None,
                "min_budget_s": 0.0,
            }
        )
        for up in mapping
    }
    new = Config(
        server=ServerConfig(log_level="warning"),
        upstreams=ups,
        cascades={name: ccfg},
        learning=None,
    )
    thresholds = [float(st.threshold) for st in ccfg.stages[:-1] if st.threshold is not None]
    return ReplayPlan(
        new,
        name,
        mapping,
        [mapping[st.upstream] for st in ccfg.stages],
        thresholds,
        notes=sorted(set(notes)),
    )


def with_thresholds(plan: ReplayPlan, thresholds: Sequence[float]) -> ReplayPlan:
    ccfg = plan.config.cascades[plan.cascade]
    stages = tuple(
        st.model_copy(update={"threshold": float(thresholds[i])}) if i < len(thresholds) else st
        for i, st in enumerate(ccfg.stages)
    )
    cfg = plan.config.model_copy(
        update={"cascades": {plan.cascade: ccfg.model_copy(update={"stages": stages})}}
    )
    return ReplayPlan(
        cfg,
        plan.cascade,
        plan.upstream_models,
        plan.stages,
        [float(t) for t in thresholds],
        plan.curve,
        plan.notes,
    )


# --- calibration of a user cascade's thresholds ------------------------------------------------------------


async def stage_scores(plan: ReplayPlan, rows: Sequence[Row], concurrency: int = 8) -> Any:
    """(n_rows, K) stage scores of ``rows`` (last column 0) with the scorers the proxy builds.

    Stage ``k`` is scored as if stages ``0..k-1`` had been rejected (their answers are ``previous``). A
    veto scorer makes the stage score ``min(weighted mean, veto score)``: accepting at a threshold
    ``t > 0`` then means exactly what the engine does (vetoed below ``t``, else mean ``>= t``).
    """
    from prometheus_client import CollectorRegistry

    from app.metrics import Metrics
    from app.runtime import build_runtime
    from app.scoring.base import Answer, ScoreContext, score_stage
    from app.upstream.transport import AiohttpTransport

    http = AiohttpTransport(max_connections=max(8, concurrency))
    await http.start()
    try:
        rt = build_runtime(plan.config, http, Metrics(CollectorRegistry()))
        cplan = rt.plans.get(plan.cascade)
        assert cplan is not None
        K = len(cplan.stages)
        out = np.zeros((len(rows), K))
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, row: Row) -> None:
            async with sem:
                body = request_body(plan.cascade, row)
                previous: list[Answer] = []
                for stage in cplan.stages[:-1]:
                    model = plan.upstream_models[stage.upstream.name]
                    completion = build_completion(
                        Served(row, model, row.answers[model], row.prompt), body, "chatcmpl-calibrate"
                    )
                    ans = Answer.of(completion, stage.upstream.name, stage.index)
                    ctx = ScoreContext(plan.cascade, stage.index, body, ans, tuple(previous))
                    v = await score_stage(stage.scorers, ctx, 0.0)
                    vetoes = [v.scores[c.name] for c in stage.scorers if c.cfg.veto and c.name in v.scores]
                    out[i, stage.index] = min([v.value, *vetoes])
                    previous.append(ans)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(rows)))
        return out
    finally:
        await http.close()


def _config_candidates(col: Any, n_candidates: int) -> list[float]:
    """Threshold candidates a config can express: +inf (never accept) becomes 1.0 when no score
    reaches 1.0, and is dropped otherwise; -inf (always accept) becomes 0.0."""
    cands = candidate_thresholds(col, n_candidates)
    top = float(np.max(col)) if len(col) else 0.0
    out = {0.0 if c == -math.inf else c for c in cands if c != math.inf}
    if top < 1.0:
        out.add(1.0)
    return sorted(x for x in out if 0.0 <= x <= 1.0)


def _midpoint(t: float, col: Any) -> float:
    """Halfway down to the next lower observed score: same accept set on train, robust to float noise."""
    if t <= 0.0 or t >= 1.0:
        return t
    lower = col[col < t]
    return (t + float(lower.max())) / 2.0 if lower.size else 0.0


def calibrate_thresholds(
    plan: ReplayPlan,
    rows: Sequence[Row],
    scores: Any,
    target_quality: float,
    all_models: Sequence[str],
    margin_z: float = 1.0,
    n_candidates: int = 40,
) -> ReplayPlan:
    """Cheapest thresholds for ``plan`` on ``rows`` with quality - margin_z x SE >= target_quality x the
    best single model's accuracy on ``rows``; the plan's train curve is the cost/accuracy frontier."""
    K = len(plan.stages)
    correct = np.asarray([[1.0 if r.answers[m].correct else 0.0 for m in plan.stages] for r in rows])
    cost = np.asarray([[r.answers[m].cost_usd for m in plan.stages] for r in rows])
    best_acc = max(sum(r.answers[m].correct for r in rows) / len(rows) for m in all_models)
    target = target_quality * best_acc
    if K == 1:
        return plan
    per = candidates_per_stage(K - 1, n_candidates)
    cands = [_config_candidates(scores[:, j], per) for j in range(K - 1)]
    ts = choose_thresholds(scores, correct, cost, target, candidates=cands, margin_z=margin_z)
    thresholds = [_midpoint(t, scores[:, j]) for j, t in enumerate(ts.best.thresholds)]
    out = with_thresholds(plan, thresholds)
    out.curve = [(e.cost, e.quality) for e in ts.table]
    if not ts.feasible:
        out.notes.append(
            f"no thresholds reach {target:.4f} train accuracy; "
            f"the most accurate is used ({ts.best.quality:.4f})"
        )
    return out


def train_curve(fitted: FittedCascade, rows: Sequence[Row]) -> list[tuple[float, float]]:
    """The train cost/accuracy frontier of the fitted chain over its thresholds (for the plot)."""
    ms = fitted.models
    if len(ms) < 2:
        return []
    cols = [
        [
            fitted.score(j, r.prompt, r.answers[ms[j]].answer, [r.answers[p].answer for p in ms[:j]])
            for r in rows
        ]
        for j in range(len(ms) - 1)
    ]
    s = np.stack([*(np.asarray(c) for c in cols), np.zeros(len(rows))], axis=1)
    c = np.asarray([[1.0 if r.answers[m].correct else 0.0 for m in ms] for r in rows])
    k = np.asarray([[r.answers[m].cost_usd for m in ms] for r in rows])
    table = choose_thresholds(s, c, k, 1.0).table
    return [(e.cost, e.quality) for e in table]
