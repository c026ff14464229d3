"""Offline replay: run a fitted cascade over recorded rows without HTTP, and build the report object.

The HTTP `cascade replay` must reproduce these numbers (same scorer files, same thresholds, same
recorded answers and costs); use this to cross-check it and for research.

API::

    run = simulate(fitted, rows)          # SimulationResult: accuracy, cost_usd (mean per request),
                                          # escalation_rate (share reaching each stage), accepted_stage
    report = replay_report(dataset, fitted, run=None, test=None)   # the `cascade replay --json` object
    report_object(name, n_train, test_rows, models, stages, thresholds, accuracy, cost_usd, escalation_rate)

Costs in the report are mean USD per request (`cost_usd`), savings and quality relative to the best
single model on the test rows (most accurate; cheapest on ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.learning.rows import Row
from app.learning.train import FittedCascade
from app.replay.dataset import Dataset, best_single, model_summary, oracle, quality_vs_best, savings_vs_best


@dataclass(frozen=True)
class SimulationResult:
    accuracy: float
    cost_usd: float
    escalation_rate: list[float]
    accepted_stage: list[int]
    scores: list[list[float]]
    skipped_share: list[float]  # per stage, the share of requests the router sent past it


def simulate(fitted: FittedCascade, rows: Sequence[Row]) -> SimulationResult:
    K = len(fitted.models)
    n = len(rows)
    reached = [0] * K
    correct = 0
    skipped = 0
    total = 0.0
    accepted: list[int] = []
    all_scores: list[list[float]] = []
    for r in rows:
        answers: list[str] = []
        scores: list[float] = []
        if K > 1 and fitted.routed(r.prompt):  # route-then-cascade: straight to the last stage
            reached[K - 1] += 1
            rec = r.answers[fitted.models[-1]]
            total += rec.cost_usd
            accepted.append(K - 1)
            correct += int(rec.correct)
            skipped += 1
            all_scores.append(scores)
            continue
        for k, m in enumerate(fitted.models):
            reached[k] += 1
            rec = r.answers[m]
            total += rec.cost_usd
            if k == K - 1:
                accepted.append(k)
                correct += int(rec.correct)
                break
            s = fitted.score(k, r.prompt, rec.answer, answers)
            scores.append(s)
            if s >= fitted.thresholds[k]:
                accepted.append(k)
                correct += int(rec.correct)
                break
            answers.append(rec.answer)
        all_scores.append(scores)
    return SimulationResult(
        accuracy=correct / n if n else 0.0,
        cost_usd=total / n if n else 0.0,
        escalation_rate=[x / n if n else 0.0 for x in reached],
        accepted_stage=accepted,
        scores=all_scores,
        skipped_share=[skipped / n if n and k < K - 1 else 0.0 for k in range(K)],
    )


def report_object(
    name: str,
    n_train: int,
    test: Sequence[Row],
    models: Sequence[str],
    stages: Sequence[str],
    thresholds: Sequence[float],
    accuracy: float,
    cost_usd: float,
    escalation_rate: Sequence[float],
) -> dict[str, Any]:
    """The `cascade replay --json` object (CONTRACT section 3) for a run over ``test``."""
    summ = model_summary(test, models)
    bs = best_single(summ)
    orc = oracle(test, models)
    best_cost = summ[bs].mean_cost_usd
    return {
        "dataset": name,
        "n_train": n_train,
        "n_test": len(test),
        "stages": list(stages),
        "thresholds": list(thresholds),
        "accuracy": accuracy,
        "cost_usd": cost_usd,
        "escalation_rate": list(escalation_rate),
        "best_single": {"model": bs, "accuracy": summ[bs].accuracy, "cost_usd": best_cost},
        "single_models": {m: {"accuracy": v.accuracy, "cost_usd": v.mean_cost_usd} for m, v in summ.items()},
        "savings_vs_best": savings_vs_best(cost_usd, best_cost),
        "quality_vs_best": quality_vs_best(accuracy, summ[bs].accuracy),
        "oracle": {"accuracy": orc.accuracy, "cost_usd": orc.mean_cost_usd},
    }


def replay_report(
    dataset: Dataset,
    fitted: FittedCascade,
    run: SimulationResult | None = None,
    test: Sequence[Row] | None = None,
) -> dict[str, Any]:
    """The report of ``fitted`` simulated on ``test`` (default: the dataset's test rows)."""
    rows = dataset.test if test is None else list(test)
    run = run or simulate(fitted, rows)
    return report_object(
        dataset.name,
        len(dataset.train),
        rows,
        dataset.models,
        fitted.models,
        fitted.thresholds,
        run.accuracy,
        run.cost_usd,
        run.escalation_rate,
    )
