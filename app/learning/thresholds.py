"""Threshold fitting and cascade search (FrugalGPT / RouteLLM style), numpy only.

A cascade of ``K`` stages runs stage 0; stage ``k < K-1`` is accepted when its score ``>= thresholds[k]``,
else the next stage runs; the last stage is always accepted. A row's cost is the sum of the costs of
every stage tried, its quality the quality (correctness, 0..1) of the accepted answer. A threshold of
``math.inf`` means "never accept" (the stage's answer only feeds later stages, e.g. for agreement);
``-math.inf`` means "always accept".

API::

    evaluate_cascade(scores, correct, cost, thresholds, weights=None) -> CascadeEval
    choose_thresholds(scores, correct, cost, target_quality, weights=None, n_candidates=40)
        -> ThresholdSearch      # .best (cheapest meeting the target, else the most accurate), .table
    search_cascades(models, correct, cost, score_fn, target_quality, max_stages=3, weights=None)
        -> CascadeSearch        # .best: CascadeChoice(models, thresholds, quality, cost, ...)
    single_model_stats(correct, cost, weights=None) -> {model: (quality, mean cost)}

Arrays are ``(n_rows, n_stages)`` (``scores[:, K-1]`` is ignored) or, for ``search_cascades``, per-model
``(n_rows,)``. ``weights`` (per row, e.g. inverse shadow-sampling probabilities) make every mean a weighted
mean, so labels from sampled traffic stay unbiased. Candidate thresholds for a stage are the distinct
score values when there are few, else ``n_candidates`` quantiles of that stage's scores (plus +inf),
searched exhaustively (for <= 3 stages: at most n_candidates^2 combinations, vectorised).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CascadeEval:
    thresholds: tuple[float, ...]
    quality: float
    cost: float
    reach: tuple[float, ...]  # share of rows reaching each stage (reach[0] == 1)
    accept: tuple[float, ...]  # share of rows accepted at each stage
    quality_se: float = 0.0  # standard error of `quality` (weighted, rows independent)

    @property
    def escalation_rate(self) -> tuple[float, ...]:
        """Alias of ``reach``: the share of requests that reach each stage."""
        return self.reach

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": [json_float(t) for t in self.thresholds],
            "quality": self.quality,
            "cost": self.cost,
            "reach": list(self.reach),
            "accept": list(self.accept),
            "quality_se": self.quality_se,
        }


def json_float(t: float) -> float | str:
    if math.isinf(t):
        return "inf" if t > 0 else "-inf"
    return t


@dataclass
class ThresholdSearch:
    best: CascadeEval
    feasible: bool
    target_quality: float
    table: list[CascadeEval] = field(default_factory=list)  # cost/quality Pareto frontier, by cost


def _as2d(a: Any, name: str) -> FloatArray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (n_rows, n_stages)")
    return arr


def _weights(weights: Any, n: int) -> FloatArray:
    if weights is None:
        return np.full(n, 1.0 / max(n, 1))
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError("weights must have one value per row")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    s = float(w.sum())
    if s <= 0:
        raise ValueError("weights sum to zero")
    return w / s


def evaluate_cascade(
    scores: Any, correct: Any, cost: Any, thresholds: Sequence[float], weights: Any = None
) -> CascadeEval:
    """Quality, mean cost and stage shares of one cascade with fixed thresholds."""
    s, c, k = _as2d(scores, "scores"), _as2d(correct, "correct"), _as2d(cost, "cost")
    n, K = c.shape
    if s.shape != (n, K) or k.shape != (n, K):
        raise ValueError("scores, correct and cost must have the same shape")
    if len(thresholds) != K - 1:
        raise ValueError(f"{K} stages need {K - 1} thresholds")
    w = _weights(weights, n)
    alive = np.ones(n, dtype=bool)
    tot = 0.0
    reach: list[float] = []
    acc: list[float] = []
    got = np.zeros(n)
    for j in range(K):
        reach.append(float(w[alive].sum()))
        tot += float((w * k[:, j])[alive].sum())
        take = alive & (s[:, j] >= thresholds[j]) if j < K - 1 else alive.copy()
        acc.append(float(w[take].sum()))
        got[take] = c[take, j]
        alive = alive & ~take
    qual = float(w @ got)
    se = math.sqrt(max(0.0, float((w * w) @ (got - qual) ** 2)))
    return CascadeEval(tuple(float(t) for t in thresholds), qual, tot, tuple(reach), tuple(acc), se)


def served_stages(scores: Any, thresholds: Sequence[float]) -> npt.NDArray[np.int64]:
    """Per row, the stage whose answer ``thresholds`` serve: the earliest scored stage whose score
    reaches its threshold, else the last (``scores`` ``(n, K-1)`` or wider; NaN never reaches)."""
    s = np.asarray(scores, dtype=np.float64)
    K = len(thresholds) + 1
    served = np.full(s.shape[0], K - 1, dtype=np.int64)
    for j in range(K - 2, -1, -1):
        served[s[:, j] >= thresholds[j]] = j
    return served


GRID_BUDGET = 1600  # threshold combinations searched per chain: 40 x 40 for two scored stages


def candidates_per_stage(n_scored: int, least: int = 40, budget: int = GRID_BUDGET) -> int:
    """Threshold candidates per scored stage: ``least``, or more while the grid of every combination
    stays within ``budget``; for three scored stages or more, what the budget allows (11 for 1,600;
    2,197 combinations with "always" and "never"). A two-stage cascade's one threshold is then searched
    over up to ``budget`` observed scores instead of 40 quantiles: a 40-quantile step moves 2.5 % of
    the requests, about a point of quality where the cheap model is right 60 % of the time, and the
    cheapest step over the target overshot it by half that on average (GSM8K)."""
    if n_scored <= 0:
        return least
    if n_scored >= 3:  # three thresholds: the budget itself bounds the grid (40^3 would be 64,000)
        return max(2, int(budget ** (1.0 / n_scored) + 1e-9))
    return max(least, int(budget ** (1.0 / n_scored) + 1e-9))


def candidate_thresholds(values: Any, n_candidates: int = 40, weights: Any = None) -> list[float]:
    """Distinct values when few, else quantiles; always with +inf (never accept)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    uniq = np.unique(v)
    if uniq.size <= n_candidates:
        cands = [float(x) for x in uniq]
    else:
        qs = np.linspace(0.0, 1.0, n_candidates)
        cands = sorted({float(x) for x in np.quantile(v, qs, method="inverted_cdf")})
    return [-math.inf, *cands, math.inf] if cands else [-math.inf, math.inf]


def _pareto(evals: list[CascadeEval]) -> list[CascadeEval]:
    out: list[CascadeEval] = []
    best_q = -math.inf
    for e in sorted(evals, key=lambda e: (e.cost, -e.quality)):
        if e.quality > best_q + 1e-12:
            out.append(e)
            best_q = e.quality
    return out


# Policies x rows held at once when a search builds (policies x rows) matrices: ~40 MB of temporaries at
# most, which an online fit in the proxy's process pays on every refit (also search.policy_grid).
BLOCK_CELLS = 1 << 20


def choose_thresholds(
    scores: Any,
    correct: Any,
    cost: Any,
    target_quality: float,
    weights: Any = None,
    n_candidates: int = 40,
    candidates: Sequence[Sequence[float]] | None = None,
    margin_z: float = 0.0,
) -> ThresholdSearch:
    """Cheapest thresholds whose (weighted) quality >= ``target_quality`` (absolute, 0..1).

    ``margin_z`` > 0 asks for ``quality - margin_z * quality_se >= target_quality`` instead: a one-sided
    confidence margin against fitting thresholds to noise (1.0 ~ 84 %, 1.64 ~ 95 %).

    When no candidate reaches the target, ``best`` is the highest-quality candidate (cheapest among
    ties) and ``feasible`` is False. ``table`` is the cost/quality Pareto frontier of all candidates.
    """
    s, c, k = _as2d(scores, "scores"), _as2d(correct, "correct"), _as2d(cost, "cost")
    n, K = c.shape
    if s.shape != (n, K) or k.shape != (n, K):
        raise ValueError("scores, correct and cost must have the same shape")
    w = _weights(weights, n)
    if K == 1:
        e = evaluate_cascade(s, c, k, (), w)
        ok = e.quality - margin_z * e.quality_se >= target_quality - 1e-12
        return ThresholdSearch(e, ok, target_quality, [e])
    if K > 4:
        raise ValueError("at most 4 stages are supported")
    if candidates is None:
        cand = [candidate_thresholds(s[:, j], n_candidates) for j in range(K - 1)]
    else:
        if len(candidates) != K - 1:
            raise ValueError("candidates: one list per scored stage")
        cand = [list(cj) for cj in candidates]

    evals: list[CascadeEval] = []
    last = K - 2  # index of the last scored stage: vectorised over its candidates
    t_last = np.asarray(cand[last], dtype=np.float64)
    wc = w[:, None] * c
    wk = w[:, None] * k
    w2 = w * w
    w2c = w2[:, None] * c
    w2cc = w2[:, None] * c * c
    w2_sum = float(w2.sum())
    # What the last scored stage's candidates sum, served there (take) or by the last stage (rest).
    cols = np.stack(
        [wc[:, last], wc[:, K - 1], w2cc[:, last], w2cc[:, K - 1], w2c[:, last], w2c[:, K - 1],
         wk[:, K - 1], w],
        axis=1,
    )  # fmt: skip
    for prefix in itertools.product(*cand[:last]):
        alive = np.ones(n, dtype=bool)
        q0 = 0.0
        s2_0 = 0.0
        t_0 = 0.0
        c0 = 0.0
        reach: list[float] = []
        acc: list[float] = []
        for j, t in enumerate(prefix):
            reach.append(float(w[alive].sum()))
            c0 += float(wk[alive, j].sum())
            take = alive & (s[:, j] >= t)
            acc.append(float(w[take].sum()))
            q0 += float(wc[take, j].sum())
            s2_0 += float(w2cc[take, j].sum())
            t_0 += float(w2c[take, j].sum())
            alive &= ~take
        # stage `last` with every candidate threshold at once, then stage K-1 takes the rest
        r_last = float(w[alive].sum())
        c_last = float(wk[alive, last].sum()) + c0
        # (candidates, rows) in blocks: a boolean block is multiplied as float64, and 1,600 candidates
        # over 8,000 rows at once held ~100 MB of temporaries (an online fit runs in the proxy's process).
        take_sums = np.empty((t_last.shape[0], cols.shape[1]))
        rest_sums = np.empty_like(take_sums)
        step = max(1, BLOCK_CELLS // max(1, n))
        for lo in range(0, t_last.shape[0], step):
            take = alive[None, :] & (s[None, :, last] >= t_last[lo : lo + step, None])
            take_sums[lo : lo + step] = take @ cols
            rest_sums[lo : lo + step] = (alive[None, :] & ~take) @ cols
        q_m = q0 + take_sums[:, 0] + rest_sums[:, 1]
        s2_m = s2_0 + take_sums[:, 2] + rest_sums[:, 3]
        t_m = t_0 + take_sums[:, 4] + rest_sums[:, 5]
        se_m = np.sqrt(np.maximum(0.0, s2_m - 2 * q_m * t_m + q_m * q_m * w2_sum))
        cost_m = c_last + rest_sums[:, 6]
        acc_m = take_sums[:, 7]
        rest_w = rest_sums[:, 7]
        for i in range(t_last.shape[0]):
            evals.append(
                CascadeEval(
                    (*(float(t) for t in prefix), float(t_last[i])),
                    float(q_m[i]),
                    float(cost_m[i]),
                    (*reach, r_last, float(rest_w[i])),
                    (*acc, float(acc_m[i]), float(rest_w[i])),
                    float(se_m[i]),
                )
            )
    feasible = [e for e in evals if e.quality - margin_z * e.quality_se >= target_quality - 1e-12]
    if feasible:
        best = min(feasible, key=lambda e: (e.cost, -e.quality))
    else:
        best = max(evals, key=lambda e: (e.quality, -e.cost))
    return ThresholdSearch(best, bool(feasible), target_quality, _pareto(evals))


# ----------------------------------------------------------------------------------------------------
# cascade search over models and orders
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CascadeChoice:
    models: tuple[str, ...]
    thresholds: tuple[float, ...]
    quality: float
    cost: float
    reach: tuple[float, ...]
    feasible: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "thresholds": [json_float(t) for t in self.thresholds],
            "quality": self.quality,
            "cost": self.cost,
            "reach": list(self.reach),
            "feasible": self.feasible,
        }


@dataclass
class CascadeSearch:
    best: CascadeChoice
    target_quality: float
    candidates: list[CascadeChoice]  # the best thresholds of every chain tried


def single_model_stats(
    correct: Mapping[str, Any], cost: Mapping[str, Any], weights: Any = None
) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for m, c in correct.items():
        ca = np.asarray(c, dtype=np.float64)
        w = _weights(weights, ca.shape[0])
        out[m] = (float(w @ ca), float(w @ np.asarray(cost[m], dtype=np.float64)))
    return out


def best_single_model(stats: Mapping[str, tuple[float, float]]) -> str:
    """Highest quality; ties (within 1e-9) go to the cheaper model."""
    return min(stats, key=lambda m: (-round(stats[m][0], 9), stats[m][1]))


def search_cascades(
    models: Sequence[str],
    correct: Mapping[str, Any],
    cost: Mapping[str, Any],
    score_fn: Callable[[tuple[str, ...]], Any],
    target_quality: float,
    max_stages: int = 3,
    weights: Any = None,
    order: str = "cost",
    n_candidates: int = 40,
    max_chains: int | None = None,
    margin_z: float = 0.0,
) -> CascadeSearch:
    """Pick models, order and thresholds (FrugalGPT-style) minimising mean cost s.t. quality >= target.

    ``score_fn(chain)`` returns the per-row scores of ``chain[-1]`` when it runs after ``chain[:-1]`` (it
    may use their answers, e.g. agreement); it is called once per distinct prefix, never for the last
    stage. ``margin_z``: see :func:`choose_thresholds`. ``order``: ``"cost"`` tries chains in increasing
    mean-cost order only, ``"any"`` every permutation. Single models are candidates too (1-stage
    cascades). When no chain reaches the target, the most accurate (then cheapest) one is returned with
    ``feasible`` False.
    """
    if order not in ("cost", "any"):
        raise ValueError("order must be 'cost' or 'any'")
    stats = single_model_stats({m: correct[m] for m in models}, cost, weights)
    by_cost = sorted(models, key=lambda m: stats[m][1])
    cache: dict[tuple[str, ...], FloatArray] = {}

    def scores_for(chain: tuple[str, ...]) -> FloatArray:
        if chain not in cache:
            cache[chain] = np.asarray(score_fn(chain), dtype=np.float64).reshape(-1)
        return cache[chain]

    chains: list[tuple[str, ...]] = []
    for n_stages in range(1, max_stages + 1):
        if order == "cost":
            chains.extend(itertools.combinations(by_cost, n_stages))
        else:
            chains.extend(itertools.permutations(models, n_stages))
    if max_chains is not None:
        chains = chains[:max_chains]
    results: list[CascadeChoice] = []
    for chain in chains:
        K = len(chain)
        c = np.stack([np.asarray(correct[m], dtype=np.float64) for m in chain], axis=1)
        k = np.stack([np.asarray(cost[m], dtype=np.float64) for m in chain], axis=1)
        cols = [scores_for(chain[: j + 1]) for j in range(K - 1)]
        s = np.stack([*cols, np.zeros(c.shape[0])], axis=1)
        ts = choose_thresholds(s, c, k, target_quality, weights, n_candidates, margin_z=margin_z)
        results.append(
            CascadeChoice(
                chain, ts.best.thresholds, ts.best.quality, ts.best.cost, ts.best.reach, ts.feasible
            )
        )
    feas = [r for r in results if r.feasible]
    if feas:
        best = min(feas, key=lambda r: (r.cost, -r.quality, len(r.models)))
    else:
        best = max(results, key=lambda r: (r.quality, -r.cost))
    return CascadeSearch(best, target_quality, results)
