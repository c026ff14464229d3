"""Build a stage's scorers from config. The only place that knows every scorer type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.config import ConfigError, HeuristicScorer, HttpScorer, StageConfig
from app.scoring.base import Configured, Scorer, unique_names
from app.scoring.heuristic import Heuristic
from app.scoring.http import HttpScore
from app.upstream.client import Upstream
from app.upstream.transport import Transport


@dataclass(slots=True)
class ScorerDeps:
    http: Transport
    upstreams: Mapping[str, Upstream]


def build_stage_scorers(path: str, stage: StageConfig, deps: ScorerDeps) -> list[Configured]:
    names = unique_names([sc.type for sc in stage.scorers])
    out: list[Configured] = []
    problems: list[str] = []
    for j, (sc, name) in enumerate(zip(stage.scorers, names, strict=True)):
        scorer: Scorer
        if isinstance(sc, HeuristicScorer):
            scorer = Heuristic(sc)
        elif isinstance(sc, HttpScorer):
            scorer = HttpScore(sc, deps.http)
        else:
            problems.append(f"{path}.scorers[{j}]: scorer type '{sc.type}' is not available in this build")
            continue
        out.append(Configured(scorer, sc, name))
    if problems:
        raise ConfigError(problems)
    return out
