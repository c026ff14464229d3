"""Build a stage's scorers from config. The only place that knows every scorer type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.config import (
    AgreementScorer,
    ConfigError,
    ConsistencyScorer,
    HeuristicScorer,
    HttpScorer,
    JudgeScorer,
    LearnedScorer,
    LogprobScorer,
    PythonScorer,
    ScorerCommon,
    SelfVerifyScorer,
    StageConfig,
)
from app.scoring.agreement import Agreement, Consistency
from app.scoring.asking import Judge, SelfVerify
from app.scoring.base import Configured, Scorer, unique_names
from app.scoring.heuristic import Heuristic
from app.scoring.http import HttpScore
from app.scoring.logprob import Logprob
from app.scoring.python import PythonScore
from app.upstream.client import Upstream
from app.upstream.transport import Transport


@dataclass(slots=True)
class ScorerDeps:
    http: Transport
    upstreams: Mapping[str, Upstream]


def _build(sc: ScorerCommon, stage: StageConfig, deps: ScorerDeps) -> Scorer:
    own = deps.upstreams[stage.upstream]
    if isinstance(sc, HeuristicScorer):
        return Heuristic(sc)
    if isinstance(sc, HttpScorer):
        return HttpScore(sc, deps.http)
    if isinstance(sc, LogprobScorer):
        return Logprob(sc)
    if isinstance(sc, JudgeScorer):
        return Judge(sc, deps.upstreams[sc.upstream])
    if isinstance(sc, SelfVerifyScorer):
        return SelfVerify(sc, own)
    if isinstance(sc, ConsistencyScorer):
        return Consistency(sc, own)
    if isinstance(sc, AgreementScorer):
        return Agreement(sc)
    if isinstance(sc, PythonScorer):
        return PythonScore(sc)
    if isinstance(sc, LearnedScorer):
        from app.scoring.learned import Learned

        return Learned(sc)
    raise ConfigError([f"scorer type '{getattr(sc, 'type', '?')}' is not available in this build"])


def build_stage_scorers(path: str, stage: StageConfig, deps: ScorerDeps) -> list[Configured]:
    names = unique_names([sc.type for sc in stage.scorers])
    out: list[Configured] = []
    problems: list[str] = []
    for j, (sc, name) in enumerate(zip(stage.scorers, names, strict=True)):
        try:
            out.append(Configured(_build(sc, stage, deps), sc, name))
        except ConfigError as exc:
            problems += [f"{path}.scorers[{j}]: {p}" for p in exc.problems]
        except Exception as exc:  # user code (python scorers, model files) failing to load
            problems.append(f"{path}.scorers[{j}]: cannot load: {type(exc).__name__}: {str(exc)[:200]}")
    if problems:
        raise ConfigError(problems)
    return out
