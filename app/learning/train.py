"""Fit learned stage scorers and a whole cascade (models, order, thresholds) from labelled rows.

This is what `cascade replay` and `cascade fit-scorer` (a dataset's train rows) and
`cascade fit-scorer --from-store` (labelled traces, per stage) need; pure (numpy, no HTTP), deterministic.

API::

    crossfit_stage_scorer(examples, labels, weights=None, ...) -> CrossFit   # .model, .oof
        # examples: StageExample(prompt, answer, previous=(), logprobs=None, finish_reason=None)

    fitted = fit_cascade(rows, models=None, target_quality=0.95, relative=True, max_stages=3,
                         margin_z=0.0, chain=None, weights=None, replicates=64, folds=5, router=True)
        # rows: app.learning.rows.Row (train rows); models: candidates (default: all in every row)
        # relative=True: quality is measured against the best single model (per bootstrap replicate)
    fitted.models        # e.g. ["mixtral", "yi", "gpt-4"] (<= max_stages, cheapest first)
    fitted.thresholds    # K-1 floats in [0, 1]; 1.0 = never accept (stage only feeds agreement)
    fitted.scorers       # K-1 LogisticModel; stage k's scorer sees (prompt, answer_k, answers_0..k-1)
    fitted.scoring       # K-1 of "learned" | "agreement+learned" (the learned score averaged with
                         # agreement with the previous stage's answer, 1 or 0)
    fitted.stage_scorers(k, path) -> [{"type": "learned", "model": path}, ...]   # stage k's config
    fitted.router, fitted.router_threshold, fitted.router_info   # route-then-cascade, when it paid
    fitted.score(k, prompt, answer, previous) -> float; fitted.routed(prompt) -> bool
    fitted.save(directory) -> {"stage0": path, ..., "router": path}   # + cascade.json summary

At request time stage ``k`` (not last) is accepted when its score is ``>= thresholds[k]``: the learned
scorer's (``{type: learned, model: <stage k file>}``), or, where ``scoring[k]`` is
``"agreement+learned"``, the mean of ``{type: agreement}`` (1 when the answer agrees with the previous
stage's) and the learned scorer's. The learned scorer already sees agreement among its features
(``agree_prev``, ``prev_choice_*``, ...), but as one feature among many, shrunk by the L2 penalty: on
data where agreement is the best evidence there is, the one-line rule "accept when the next model
agrees" was more accurate at its escalation rate than any threshold of the learned score (5 of 15
generated worlds, ``bench/synthetic.py``). The blend's thresholds above 0.5 mean "agrees and the
learned score is at least 2t - 1", at 0.5 the rule itself, below it "agrees or the learned score is at
least 2t". The chain is chosen with learned scorers; the chosen chain is then searched both ways and the
blend kept where it is cheaper at the same aim (paying at least the chain search's optimism). Offering
the blend to every chain let the search pick chains that were lucky on the fitting rows (a generated
world at 0.98: train 0.988, test 0.961); on the chosen chain alone it changed no shared-set figure and
saved 20 points more on one generated world at 0.98 (55 -> 75 %, quality 0.983 -> 0.982).

Method: per chain prefix an L2 logistic regression on the engineered features, cross-fitted and
calibrated (:mod:`app.learning.crossfit`); every chain of up to ``max_stages`` models (3 by default, at
most 4) in mean-cost order (FrugalGPT's space) and every combination of candidate thresholds on the
out-of-fold scores (40 per scored stage, 11 with three scored stages) is searched, the contenders of a
quick pass over bootstrap replicates, and the cheapest policy reaching the target plus the search's measured
optimism (plus ``margin_z`` bootstrap standard errors) wins (:mod:`app.learning.search`). Then the
router is fitted and kept only when it pays (:mod:`app.learning.routing`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.answers import agrees
from app.learning.crossfit import CrossFit, crossfit, fold_ids
from app.learning.routing import RouterFit, fit_router, request_for
from app.learning.rows import Row
from app.learning.search import (
    PolicyGrid,
    Search,
    live_stages,
    policy_grid,
    reference_quality,
    replicate_weights,
)
from app.learning.thresholds import (
    best_single_model,
    candidate_thresholds,
    candidates_per_stage,
    served_stages,
    single_model_stats,
)
from app.scoring.feature_spec import FeatureSpec
from app.scoring.features import extract_features, with_previous
from app.scoring.model import LogisticModel
from app.scoring.prompt_features import request_prompt_features

DEFAULT_SPEC = FeatureSpec(hash_dim=0)
DEFAULT_L2 = 10.0
DEFAULT_MAX_STAGES = 3  # at most 4: three cheap answers voting before the last (README, Learned scorer)
DEFAULT_MARGIN_Z = 0.0  # the optimism is paid; a margin on top is a choice (--margin-z)
DEFAULT_CANDIDATES = 40
DEFAULT_REPLICATES = 64
DEFAULT_FOLDS = 5
SHORTLIST = 24  # chains that get the full bootstrap search (Search.shortlist)
LEARNED = "learned"
BLENDED = "agreement+learned"  # the mean of the agreement scorer (with the previous stage) and the learned


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


def crossfit_stage_scorer(
    examples: Sequence[StageExample],
    labels: Sequence[bool | float],
    weights: Sequence[float] | None = None,
    spec: FeatureSpec = DEFAULT_SPEC,
    l2: float = DEFAULT_L2,
    meta: Mapping[str, Any] | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> CrossFit:
    """One stage's scorer from labelled answers (label: the answer was good enough), cross-fitted:
    ``.model`` outputs P(good), ``.oof`` are out-of-fold scores of the examples for choosing thresholds."""
    y = np.asarray([float(v) for v in labels])
    k = folds if len(y) >= 2 * folds else 1
    fold = fold_ids(len(y), k, seed, strata=y > 0.5)
    return crossfit(featurize(examples, spec), y, fold, l2=l2, weights=weights, feature_spec=spec, meta=meta)


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
    oof_scores: list[list[float]] = field(default_factory=list)  # per scored stage, per fitting row
    router: LogisticModel | None = None  # route-then-cascade, when it paid on the fitting rows
    router_threshold: float | None = None
    router_info: dict[str, Any] = field(default_factory=dict)  # chosen or not, and why
    scoring: list[str] = field(default_factory=list)  # per scored stage, LEARNED (default) or BLENDED

    def scoring_of(self, stage: int) -> str:
        return self.scoring[stage] if stage < len(self.scoring) else LEARNED

    def probability(self, stage: int, prompt: str, answer: str, previous: Sequence[str] = ()) -> float:
        """Stage ``stage``'s learned scorer: the probability that the answer is right."""
        model = self.scorers[stage]
        return model.predict_proba(extract_features(prompt, answer, previous, spec=model.feature_spec))

    def score(self, stage: int, prompt: str, answer: str, previous: Sequence[str] = ()) -> float:
        """Stage ``stage``'s score, as the proxy computes it from ``stage_scorers``."""
        p = self.probability(stage, prompt, answer, previous)
        if self.scoring_of(stage) == BLENDED:
            return (float(agrees(answer, previous, prompt)) + p) / 2.0
        return p

    def stage_scorers(self, stage: int, model_path: str) -> list[dict[str, Any]]:
        """The ``scorers`` of stage ``stage`` in a config (its learned scorer saved at ``model_path``)."""
        learned: dict[str, Any] = {"type": "learned", "model": model_path}
        if self.scoring_of(stage) == BLENDED:
            return [{"type": "agreement"}, learned]
        return [learned]

    def routed(self, prompt: str) -> bool:
        """Whether the router sends this (single user message) request straight to the last stage."""
        if self.router is None or self.router_threshold is None:
            return False
        x = request_prompt_features(request_for(prompt), self.router.feature_spec)
        return self.router.predict_proba(x) >= self.router_threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "thresholds": list(self.thresholds),
            "scoring": [self.scoring_of(k) for k in range(len(self.scorers))],
            "target_quality": self.target_quality,
            "feasible": self.feasible,
            "train": dict(self.train),
            "single_models": dict(self.single_models),
            "candidates": list(self.candidates),
            "router": dict(self.router_info),
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
        if self.router is not None:
            self.router.save(d / "router.json")
            paths["router"] = str(d / "router.json")
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
        self._agree: dict[tuple[str, ...], Any] = {}

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

    def agreement(self, chain: tuple[str, ...]) -> Any:
        """Per row 1.0 where the last model's answer agrees with the earlier ones' (``agrees``)."""
        if chain not in self._agree:
            self._agree[chain] = np.asarray(
                [
                    1.0
                    if agrees(
                        r.answers[chain[-1]].answer, [r.answers[p].answer for p in chain[:-1]], r.prompt
                    )
                    else 0.0
                    for r in self.rows
                ]
            )
        return self._agree[chain]


def scorings(n_models: int) -> list[tuple[str, ...]]:
    """The ways a chain of ``n_models`` can be scored: the first stage by its learned scorer (nothing
    earlier to agree with), every middle stage by the learned scorer or the blend."""
    scored = max(0, n_models - 1)
    if scored == 0:
        return [()]
    return [(LEARNED, *rest) for rest in itertools.product((LEARNED, BLENDED), repeat=scored - 1)]


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


@dataclass(frozen=True)
class _Eval:
    quality: float
    cost: float
    reach: list[float]  # share of rows whose request reached each stage
    skipped: list[float]  # share of rows the router sent past each stage


def _evaluate(
    s: Any, c: Any, k: Any, thresholds: Sequence[float], weights: Any, route: Any, rho: float
) -> _Eval:
    """One policy on the fitting rows (the cross-fitted scores), the router's skips included."""
    n, K = c.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    served = served_stages(s, thresholds[: K - 1])
    routed = np.zeros(n, dtype=bool) if route is None else np.asarray(route) >= rho
    served[routed] = K - 1
    paid = np.where(routed, k[:, K - 1], np.cumsum(k, axis=1)[np.arange(n), served])
    reach = [
        float(w[(served >= j) & ~routed].sum()) if j < K - 1 else float(w[served == j].sum())
        for j in range(K)
    ]
    skipped = [float(w[routed].sum()) if j < K - 1 else 0.0 for j in range(K)]
    return _Eval(float(w @ c[np.arange(n), served]), float(w @ paid), reach, skipped)


def candidate_chains(
    models: Sequence[str],
    mean_cost: Mapping[str, float],
    max_stages: int,
    min_stages: int = 1,
    accuracy: Mapping[str, float] | None = None,
) -> list[tuple[str, ...]]:
    """Every chain of ``min_stages`` to ``max_stages`` models in increasing mean-cost order (FrugalGPT's
    space); models of equal cost the less accurate first (escalating to the weaker of two models that
    cost the same is never a cascade)."""
    acc = accuracy or {}
    by_cost = sorted(models, key=lambda m: (mean_cost[m], acc.get(m, 0.0), m))
    out: list[tuple[str, ...]] = []
    for k in range(min_stages, max_stages + 1):
        out.extend(itertools.combinations(by_cost, k))
    return out


def fit_cascade(
    rows: Sequence[Row],
    models: Sequence[str] | None = None,
    *,
    target_quality: float = 0.95,
    relative: bool = True,
    max_stages: int = DEFAULT_MAX_STAGES,
    min_stages: int = 1,
    margin_z: float = DEFAULT_MARGIN_Z,
    l2: float = DEFAULT_L2,
    spec: FeatureSpec = DEFAULT_SPEC,
    chain: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    n_candidates: int = DEFAULT_CANDIDATES,
    replicates: int = DEFAULT_REPLICATES,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    router: bool = True,
    last_min_quality: float | None = None,
    agreement: bool = True,
) -> FittedCascade:
    """Choose models, order, stage scorers and thresholds on labelled ``rows`` (see module doc).

    ``agreement``: also search the chosen chain with the blend of agreement and the learned score on its
    middle stages (module doc).

    ``last_min_quality``: when the chosen chain's last model alone misses this quality on ``rows``
    (relative to the best single model's when ``relative``), the choice is made again among the chains
    whose last model reaches it: the cascade an online tuner can learn, its labels being "as good as the
    last stage's answer" (``app.replay.online``)."""
    if not rows:
        raise ValueError("no rows to fit on")
    cand_models = (
        list(models)
        if models is not None
        else [m for m in rows[0].answers if all(m in r.answers for r in rows)]
    )
    if chain is not None:
        missing = [m for m in chain if not all(m in r.answers for r in rows)]
        if missing:
            raise ValueError(f"models not in every row: {missing}")
    every = list(dict.fromkeys([*cand_models, *(chain or ())]))
    correct = {m: np.asarray([1.0 if r.answers[m].correct else 0.0 for r in rows]) for m in every}
    cost = {m: np.asarray([r.answers[m].cost_usd for r in rows]) for m in every}
    n = len(rows)
    stats = single_model_stats(correct, cost, weights)
    best = best_single_model({m: stats[m] for m in cand_models}) if cand_models else ""
    W = replicate_weights(n, replicates, seed, weights)
    if relative:
        reference = reference_quality(np.stack([correct[m] for m in cand_models], axis=1), W)
    else:
        reference = np.ones(W.shape[1])

    feats = _ChainFeatures(rows, spec)
    fold = fold_ids(n, folds, seed, strata=correct[best] if best else None)
    fitted: dict[tuple[str, ...], CrossFit] = {}

    def crossfitted(ch: tuple[str, ...]) -> CrossFit:
        if ch not in fitted:
            meta = {"stage": len(ch) - 1, "model": ch[-1], "previous": list(ch[:-1]), "n_train": n}
            fitted[ch] = crossfit(
                feats.matrix(ch), correct[ch[-1]], fold, l2=l2, weights=weights, feature_spec=spec, meta=meta
            )
        return fitted[ch]

    chains = (
        [tuple(chain)]
        if chain is not None
        else candidate_chains(
            cand_models,
            {m: stats[m][1] for m in every},
            max_stages,
            min_stages,
            {m: stats[m][0] for m in every},
        )
    )
    floor = (
        last_min_quality * (stats[best][0] if relative else 1.0) - 1e-12
        if last_min_quality is not None and chain is None and best
        else None
    )

    def columns(ch: tuple[str, ...], sc: tuple[str, ...] = ()) -> list[Any]:
        """The out-of-fold scores of each scored stage of ``ch``, scored as ``sc`` says (learned where
        it says nothing)."""
        cols = []
        for j in range(len(ch) - 1):
            oof = crossfitted(ch[: j + 1]).oof
            blend = j < len(sc) and sc[j] == BLENDED
            cols.append((feats.agreement(ch[: j + 1]) + oof) / 2.0 if blend else oof)
        return cols

    def grid(ch: tuple[str, ...], w: Any, per: int = n_candidates, sc: tuple[str, ...] = ()) -> PolicyGrid:
        cols = columns(ch, sc)
        if len(cols) >= 3:  # three thresholds: the grid's budget, not 40^3 combinations
            per = min(per, candidates_per_stage(len(cols)))
        s = np.stack(cols, axis=1) if cols else np.zeros((n, 0))
        c = np.stack([correct[m] for m in ch], axis=1)
        k = np.stack([cost[m] for m in ch], axis=1)
        thresholds = [
            sorted({*candidate_thresholds(col, per), *((0.5,) if how == BLENDED else ())})
            for col, how in zip(cols, sc or (LEARNED,) * len(cols), strict=True)
        ]  # the blend at 0.5 is the agreement rule itself
        return policy_grid(s, c, k, thresholds, w)

    def searched(among: list[tuple[str, ...]]) -> Search:
        if len(among) > SHORTLIST:  # a quick pass on the rows alone, then the bootstrap on the contenders
            pre = Search(reference[:1], target_quality, 0.0)
            for ch in among:
                pre.add(ch, grid(ch, W[:, :1]))
            four = max(len(ch) for ch in among) > 3  # Search.shortlist: merged, with the higher aim
            among = pre.shortlist(limit=SHORTLIST, above_limit=4 if four else 0, merge_prefixes=four)
        out = Search(reference, target_quality, margin_z)
        for ch in among:
            out.add(ch, grid(ch, W))
        return out

    search = searched(chains)
    pick = search.result()
    if floor is not None and stats[pick.chain[-1]][0] < floor:
        # The cheapest chain ends at a model under last_min_quality: search again among the chains whose
        # last model reaches it (there may be none: the best model the cheapest, min_stages 2). Where the
        # cheapest already ends at such a model it stands: narrowing the search would only move its
        # measured optimism (it moved one generated world's chain to one that missed the target).
        allowed = [ch for ch in chains if stats[ch[-1]][0] >= floor]
        if allowed:
            search = searched(allowed)
            pick = search.result()
    if agreement and len(pick.chain) >= 3:
        # The chosen chain scored both ways, the blend on its middle stages too: kept when cheaper at the
        # aim, paying at least the first search's optimism. Only on the chosen chain: offering the blend
        # to every chain let the search pick chains that were lucky on the rows (module doc).
        both = Search(reference, target_quality, margin_z)
        for sc in scorings(len(pick.chain)):
            both.add(pick.chain, grid(pick.chain, W, sc=sc), sc)
        refined = both.result(min_optimism=pick.optimism)
        if refined.feasible or not pick.feasible:
            pick = refined
    if chain is None and len(pick.chain) > 3:
        # A middle stage accepting every answer (a threshold at or under its lowest score): the stages
        # after it are never reached. The same policy without them (the shorter chain was searched too,
        # on a grid of other candidates: rounding can leave the longer one a hair cheaper), so no config
        # names an upstream no request reaches. Not where the last stage is kept for its quality
        # (``last_min_quality``: the labels' reference).
        cols_p = columns(pick.chain, pick.scoring)
        live = live_stages(
            [
                -math.inf if t <= float(np.min(col)) else t
                for t, col in zip(pick.thresholds, cols_p, strict=True)
            ]
        )
        if min_stages <= live < len(pick.chain) and (
            floor is None or stats[pick.chain[live - 1]][0] >= floor
        ):
            pick = dataclasses.replace(
                pick,
                chain=pick.chain[:live],
                thresholds=pick.thresholds[: live - 1],
                scoring=pick.scoring[: live - 1],
            )
    fine = candidates_per_stage(len(pick.chain) - 1, n_candidates)
    if len(pick.chain) == 2 and fine > n_candidates:
        # Chains are compared on one grid (n_candidates quantiles per scored stage); the chosen chain's
        # lone threshold is then searched over every observed score (within the grid budget), paying
        # at least the first search's optimism. A 40-quantile step moves 2.5 % of the requests, about
        # a point of quality where the cheap model is right 60 % of the time (GSM8K), and the cheapest
        # step over the aim overshot it by half that on average. (Comparing the chains on that finer
        # grid instead favoured two-stage chains for their finer steps alone.)
        refine = Search(reference, target_quality, margin_z)
        refine.add(pick.chain, grid(pick.chain, W, fine, sc=pick.scoring), pick.scoring)
        refined = refine.result(min_optimism=pick.optimism)
        if refined.feasible or not pick.feasible:
            pick = refined
    ch, scoring = pick.chain, pick.scoring
    cols = columns(ch, scoring)
    scorers = [crossfitted(ch[: j + 1]).model for j in range(len(ch) - 1)]
    c = np.stack([correct[m] for m in ch], axis=1)
    k = np.stack([cost[m] for m in ch], axis=1)
    s_cols = np.stack(cols, axis=1) if cols else np.zeros((n, 0))
    routing = (
        fit_router(
            rows, s_cols, c, k, pick, W, reference, target_quality,
            margin_z=margin_z, folds=fold, l2=l2, weights=weights,
        )
        if router and len(ch) > 1
        else RouterFit(False, "off" if not router else "a one-model cascade has nothing to skip")
    )  # fmt: skip
    raw = pick.thresholds
    if routing.chosen and routing.pick is not None:
        raw = routing.pick.thresholds[1:]
        pick = routing.pick
    thresholds = _midpoint_thresholds(raw, cols)
    if routing.chosen:
        # A scored stage accepting every answer (threshold 0) with the router: the stages between it and
        # the last are never reached (the router sends requests to the last stage). The same policy
        # without them: no upstream no request reaches, in the report or the config.
        dead = next((j for j, t in enumerate(thresholds[:-1]) if t <= 0.0), None)
        if dead is not None:
            keep = [*range(dead + 1), len(ch) - 1]
            ch = tuple(ch[j] for j in keep)
            thresholds, cols, scorers = thresholds[: dead + 1], cols[: dead + 1], scorers[: dead + 1]
            scoring = scoring[: dead + 1]
            c, k = c[:, keep], k[:, keep]
            s_cols = s_cols[:, : dead + 1]
    route = routing.oof if routing.chosen else None
    ev = _evaluate(s_cols, c, k, thresholds, weights, route, routing.threshold)
    ref0 = float(reference[0])
    return FittedCascade(
        models=list(ch),
        thresholds=thresholds,
        scorers=scorers,
        target_quality=target_quality * ref0 if relative else target_quality,
        feasible=pick.feasible,
        train={
            "quality": ev.quality,
            "quality_se": pick.se * ref0,
            "quality_vs_best": pick.quality if relative else ev.quality / max(1e-12, stats[best][0]),
            "quality_vs_best_corrected": pick.quality_corrected,
            "quality_vs_best_se": pick.se if relative else pick.se / max(1e-12, stats[best][0]),
            "optimism": pick.optimism,
            "aim": pick.aim,
            "cost_usd": ev.cost,
            "reach": list(ev.reach),
            "skipped_share": list(ev.skipped),
            "n": n,
            "best_single": best,
            "best_single_quality": stats[best][0] if best else 0.0,
            "best_single_cost_usd": stats[best][1] if best else 0.0,
            "replicates": replicates,
            "folds": folds,
            "margin_z": margin_z,
            "last_min_quality": last_min_quality,
        },
        single_models={m: {"accuracy": q, "cost_usd": cst} for m, (q, cst) in stats.items()},
        candidates=search.frontier(),
        oof_scores=[list(map(float, col)) for col in cols],
        router=routing.model if routing.chosen else None,
        router_threshold=routing.threshold if routing.chosen else None,
        router_info=routing.to_dict(),
        scoring=list(scoring),
    )
