"""Fit learned stage scorers and a whole cascade (models, order, thresholds) from labelled rows.

This is what `cascade replay` (on a dataset's train rows) and `cascade calibrate` (on labelled traces)
need; it is pure (numpy, no HTTP) and deterministic.

API::

    fit_stage_scorer(examples, labels, weights=None, spec=DEFAULT_SPEC, l2=DEFAULT_L2) -> LogisticModel
        # examples: StageExample(prompt, answer, previous=(), logprobs=None, finish_reason=None)

    fitted = fit_cascade(rows, models=None, target_quality=0.95, relative=True, max_stages=3,
                         margin_z=1.0, chain=None, weights=None)
        # rows: app.replay.dataset.Row (train rows); models: candidates (default: all in every row)
        # relative=True: target = target_quality * accuracy of the best single model on these rows
    fitted.models        # e.g. ["mixtral", "yi", "gpt-4"] (<= max_stages, cheapest first)
    fitted.thresholds    # K-1 floats in [0, 1]; 1.0 = never accept (stage only feeds agreement)
    fitted.scorers       # K-1 LogisticModel; stage k's scorer sees (prompt, answer_k, answers_0..k-1)
    fitted.score(k, prompt, answer, previous) -> float
    fitted.save(directory) -> {"stage0": path, ...}   # scorer JSON files + cascade.json summary

At request time stage ``k`` (not last) is accepted when ``scorers[k]`` scores its answer
``>= thresholds[k]``; the scorer already contains agreement with earlier stages (features
``agree_prev``, ``prev_choice_*``, ...), so a config only needs ``{type: learned, model: <stage k file>}``
on stage ``k``.

Method (see bench/replay_research/REPORT.md): per chain prefix a class-balanced L2 logistic regression on
the engineered features (no hashed text features by default: they overfit at a few hundred rows); its
in-sample scores on the rows choose the thresholds (exhaustive over score quantiles), so the fitted
scorer and its thresholds are consistent; ``margin_z`` keeps the quality target with a one-sided margin
of ``margin_z`` standard errors. Chains are tried in increasing mean-cost order (FrugalGPT-style), the
cheapest feasible one wins.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.learning.fitting import fit_logistic
from app.learning.rows import Row
from app.learning.thresholds import (
    CascadeChoice,
    best_single_model,
    evaluate_cascade,
    search_cascades,
    single_model_stats,
)
from app.scoring.features import FeatureSpec, extract_features, with_previous
from app.scoring.model import LogisticModel

DEFAULT_SPEC = FeatureSpec(hash_dim=0)
DEFAULT_L2 = 10.0


@dataclass(frozen=True)
class StageExample:
    prompt: str
    answer: str
    previous: tuple[str, ...] = ()
    logprobs: tuple[float, ...] | None = None
    finish_reason: str | None = None


def featurize(examples: Sequence[StageExample], spec: FeatureSpec = DEFAULT_SPEC) -> list[list[float]]:
    return [
        extract_features(e.prompt, e.answer, e.previous, e.logprobs, e.finish_reason, spec) for e in examples
    ]


def fit_stage_scorer(
    examples: Sequence[StageExample],
    labels: Sequence[bool | float],
    weights: Sequence[float] | None = None,
    spec: FeatureSpec = DEFAULT_SPEC,
    l2: float = DEFAULT_L2,
    meta: Mapping[str, Any] | None = None,
) -> LogisticModel:
    """One stage's scorer from labelled answers (label: the answer was good enough)."""
    return fit_logistic(
        featurize(examples, spec),
        [float(v) for v in labels],
        l2=l2,
        sample_weight=weights,
        feature_spec=spec,
        meta=meta,
    )


def _to_unit(t: float) -> float:
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    return min(1.0, max(0.0, t))


@dataclass
class FittedCascade:
    models: list[str]
    thresholds: list[float]
    scorers: list[LogisticModel]
    target_quality: float  # absolute, on the fitting rows
    feasible: bool
    train: dict[str, Any] = field(default_factory=dict)
    single_models: dict[str, dict[str, float]] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def score(self, stage: int, prompt: str, answer: str, previous: Sequence[str] = ()) -> float:
        model = self.scorers[stage]
        return model.predict_proba(extract_features(prompt, answer, previous, spec=model.feature_spec))

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "thresholds": list(self.thresholds),
            "target_quality": self.target_quality,
            "feasible": self.feasible,
            "train": dict(self.train),
            "single_models": dict(self.single_models),
            "candidates": list(self.candidates),
        }

    def save(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """Write ``stage{k}.json`` (one learned-scorer file per scored stage) and ``cascade.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths: dict[str, str] = {}
        for k, m in enumerate(self.scorers):
            p = d / f"stage{k}.json"
            m.save(p)
            paths[f"stage{k}"] = str(p)
        (d / "cascade.json").write_text(
            json.dumps(self.to_dict(), indent=1, sort_keys=True), encoding="utf-8"
        )
        paths["cascade"] = str(d / "cascade.json")
        return paths


class _ChainFeatures:
    """Feature matrices per chain prefix, reusing each model's base vectors."""

    def __init__(self, rows: Sequence[Row], spec: FeatureSpec) -> None:
        self.rows = rows
        self.spec = spec
        self._base: dict[str, list[list[float]]] = {}
        self._chain: dict[tuple[str, ...], Any] = {}

    def base(self, model: str) -> list[list[float]]:
        if model not in self._base:
            self._base[model] = [
                extract_features(r.prompt, r.answers[model].answer, (), spec=self.spec) for r in self.rows
            ]
        return self._base[model]

    def matrix(self, chain: tuple[str, ...]) -> Any:
        if chain not in self._chain:
            base = self.base(chain[-1])
            if len(chain) == 1:
                mat = np.asarray(base, dtype=np.float64)
            else:
                mat = np.asarray(
                    [
                        with_previous(
                            b,
                            r.prompt,
                            r.answers[chain[-1]].answer,
                            [r.answers[p].answer for p in chain[:-1]],
                            self.spec,
                        )
                        for b, r in zip(base, self.rows, strict=True)
                    ],
                    dtype=np.float64,
                )
            self._chain[chain] = mat
        return self._chain[chain]


def _midpoint_thresholds(thresholds: Sequence[float], score_cols: Sequence[Any]) -> list[float]:
    """Move each finite threshold halfway down to the next lower observed score (same accept set)."""
    out: list[float] = []
    for t, col in zip(thresholds, score_cols, strict=False):
        if math.isinf(t):
            out.append(_to_unit(t))
            continue
        lower = col[col < t]
        mid = (t + float(lower.max())) / 2.0 if lower.size else 0.0
        out.append(_to_unit(mid))
    return out


def fit_cascade(
    rows: Sequence[Row],
    models: Sequence[str] | None = None,
    *,
    target_quality: float = 0.95,
    relative: bool = True,
    max_stages: int = 3,
    order: str = "cost",
    margin_z: float = 1.0,
    l2: float = DEFAULT_L2,
    spec: FeatureSpec = DEFAULT_SPEC,
    chain: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    n_candidates: int = 40,
) -> FittedCascade:
    """Choose models, order, stage scorers and thresholds on labelled ``rows`` (see module doc)."""
    if not rows:
        raise ValueError("no rows to fit on")
    cand_models = (
        list(models)
        if models is not None
        else [m for m in rows[0].answers if all(m in r.answers for r in rows)]
    )
    if chain is not None:
        missing = [m for m in chain if m not in cand_models and not all(m in r.answers for r in rows)]
        if missing:
            raise ValueError(f"models not in every row: {missing}")
    correct = {m: np.asarray([1.0 if r.answers[m].correct else 0.0 for r in rows]) for m in cand_models}
    cost = {m: np.asarray([r.answers[m].cost_usd for r in rows]) for m in cand_models}
    if chain is not None:
        for m in chain:
            correct.setdefault(m, np.asarray([1.0 if r.answers[m].correct else 0.0 for r in rows]))
            cost.setdefault(m, np.asarray([r.answers[m].cost_usd for r in rows]))
    stats = single_model_stats(correct, cost, weights)
    best = best_single_model({m: stats[m] for m in cand_models}) if cand_models else ""
    target = target_quality * stats[best][0] if relative else target_quality

    feats = _ChainFeatures(rows, spec)
    fitted_models: dict[tuple[str, ...], LogisticModel] = {}
    sw = None if weights is None else np.asarray(weights, dtype=np.float64)

    def scorer_for(ch: tuple[str, ...]) -> LogisticModel:
        if ch not in fitted_models:
            y = correct[ch[-1]]
            fitted_models[ch] = fit_logistic(
                feats.matrix(ch),
                y,
                l2=l2,
                sample_weight=sw,
                feature_spec=spec,
                meta={"stage": len(ch) - 1, "model": ch[-1], "previous": list(ch[:-1]), "n_train": len(rows)},
            )
        return fitted_models[ch]

    def score_fn(ch: tuple[str, ...]) -> Any:
        mdl = scorer_for(ch)
        mat = feats.matrix(ch)
        w, b = mdl.folded
        z = np.clip(mat @ np.asarray(w) + b, -30.0, 30.0)
        return 1.0 / (1.0 + np.exp(-z))

    if chain is not None:
        sr = search_cascades(
            list(chain),
            correct,
            cost,
            score_fn,
            target,
            max_stages=len(chain),
            weights=weights,
            order="any",
            n_candidates=n_candidates,
            margin_z=margin_z,
        )
        exact = [c for c in sr.candidates if c.models == tuple(chain)]
        choice: CascadeChoice = exact[0]
    else:
        sr = search_cascades(
            cand_models,
            correct,
            cost,
            score_fn,
            target,
            max_stages=max_stages,
            weights=weights,
            order=order,
            n_candidates=n_candidates,
            margin_z=margin_z,
        )
        choice = sr.best
    ch = choice.models
    cols = [np.asarray(score_fn(ch[: j + 1])) for j in range(len(ch) - 1)]
    thresholds = _midpoint_thresholds(choice.thresholds, cols)
    scorers = [scorer_for(ch[: j + 1]) for j in range(len(ch) - 1)]
    s = np.stack([*cols, np.zeros(len(rows))], axis=1)
    c = np.stack([correct[m] for m in ch], axis=1)
    k = np.stack([cost[m] for m in ch], axis=1)
    ev = evaluate_cascade(s, c, k, thresholds, weights)
    top = sorted(sr.candidates, key=lambda x: (not x.feasible, x.cost))[:20]
    return FittedCascade(
        models=list(ch),
        thresholds=thresholds,
        scorers=scorers,
        target_quality=target,
        feasible=choice.feasible,
        train={
            "quality": ev.quality,
            "quality_se": ev.quality_se,
            "cost_usd": ev.cost,
            "reach": list(ev.reach),
            "n": len(rows),
            "best_single": best,
            "best_single_quality": stats[best][0] if best else 0.0,
            "best_single_cost_usd": stats[best][1] if best else 0.0,
        },
        single_models={m: {"accuracy": q, "cost_usd": cst} for m, (q, cst) in stats.items()},
        candidates=[x.to_dict() for x in top],
    )
