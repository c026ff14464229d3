"""From labelled traces to per-stage thresholds: the rows, the fit and the guard rails. Pure; numpy.

One row per labelled request of a cascade. ``correct[k]`` is how good stage k's answer is next to the
last stage's (1 = as good), the last stage's own being 1 unless a user said otherwise. A row needs a
reference answer from the last stage, and its weight is the inverse of the chance it got one:

* the request reached the last stage itself: every earlier answer is labelled for free, weight 1;
* it was accepted early and picked for shadow labelling (rate p): weight 1/p, and the last stage's
  cost is what the shadow call cost;
* it was accepted early and only a user labelled it: weight 1 (users label at an unknown rate, so this
  is the one biased source), the last stage's cost is the trace's baseline.

Stages a request never reached (a middle stage, when an earlier one accepted) are filled in with that
stage's weighted mean label and mean cost, and always accept: a deliberately pessimistic guess for
quality, so a fit errs towards escalating. Scores of failed attempts are NaN (never accepted).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from app.learning.store import LabelledData
from app.learning.thresholds import (
    CascadeEval,
    FloatArray,
    ThresholdSearch,
    candidate_thresholds,
    choose_thresholds,
    evaluate_cascade,
)

_ALWAYS = 1e300  # score of a stage the request never reached: above every finite threshold


@dataclass
class Rows:
    scores: FloatArray
    correct: FloatArray
    cost: FloatArray
    weights: FloatArray
    observed: list[FloatArray]  # per scored stage: the scores actually seen (for candidates)
    kinds: Counter[str] = field(default_factory=Counter)  # rows by reference: escalated, shadow, user
    labels: Counter[str] = field(default_factory=Counter)  # labels used, by source
    last_label_id: int = 0

    @property
    def n(self) -> int:
        return int(self.scores.shape[0])


def assemble(data: LabelledData, n_stages: int) -> Rows:
    K = n_stages
    by_trace: dict[str, dict[int, tuple[str, float]]] = defaultdict(dict)
    user: dict[str, dict[int | None, float]] = defaultdict(dict)
    shadow_w: dict[str, float] = {}
    shadow_cost: dict[str, float] = defaultdict(float)
    last_id = 0
    for lid, tid, stage, source, value, weight, cost in data.labels:  # ordered by id: later ones win
        last_id = max(last_id, int(lid))
        if source == "user":
            user[tid][stage] = float(value)
        elif stage is not None:
            by_trace[tid][int(stage)] = (source, float(value))
        if source == "shadow":
            shadow_w[tid] = max(shadow_w.get(tid, 0.0), float(weight))
            shadow_cost[tid] += float(cost)
    attempts: dict[str, dict[int, tuple[str, float | None, float]]] = defaultdict(dict)
    for tid, stage, outcome, score, cost in data.attempts:
        attempts[tid][int(stage)] = (outcome, score, float(cost))

    S, C, X, W = [], [], [], []
    kinds: Counter[str] = Counter()
    used: Counter[str] = Counter()
    for tid, n, accepted, baseline in data.traces:
        if n != K or accepted is None:
            continue
        labels = dict(by_trace.get(tid, {}))
        for stage, value in user.get(tid, {}).items():
            labels[accepted if stage is None else int(stage)] = ("user", value)
        atts = attempts.get(tid, {})
        if accepted == K - 1 and K - 1 in atts:
            kind, w, last_cost = "escalated", 1.0, atts[K - 1][2]
        elif tid in shadow_w:
            kind, w, last_cost = "shadow", shadow_w[tid], shadow_cost[tid]
        elif accepted in labels:
            kind, w, last_cost = "user", 1.0, float(baseline)
        else:
            continue
        s, c, x = [], [], []
        for k in range(K - 1):
            if k in atts:
                outcome, score, cost = atts[k]
                s.append(math.nan if score is None else float(score))
                x.append(cost)
                if k in labels:
                    c.append(labels[k][1])
                    used[labels[k][0]] += 1
                else:
                    c.append(0.0 if outcome == "error" else math.nan)
            else:
                s.append(_ALWAYS)
                c.append(math.nan)
                x.append(math.nan)
        s.append(0.0)
        c.append(labels[K - 1][1] if K - 1 in labels else 1.0)
        x.append(last_cost)
        S.append(s)
        C.append(c)
        X.append(x)
        W.append(w)
        kinds[kind] += 1
    rows = Rows(
        np.asarray(S, dtype=np.float64).reshape(-1, K),
        np.asarray(C, dtype=np.float64).reshape(-1, K),
        np.asarray(X, dtype=np.float64).reshape(-1, K),
        np.asarray(W, dtype=np.float64),
        [],
        kinds,
        used,
        last_id,
    )
    _impute(rows)
    return rows


def _impute(rows: Rows) -> None:
    for k in range(rows.scores.shape[1] - 1):
        s, c, x, w = rows.scores[:, k], rows.correct[:, k], rows.cost[:, k], rows.weights
        seen = s < _ALWAYS
        rows.observed.append(s[seen & np.isfinite(s)])
        known = seen & ~np.isnan(c)
        mean_c = float(np.average(c[known], weights=w[known])) if known.any() and w[known].sum() > 0 else 0.0
        c[np.isnan(c)] = mean_c
        mean_x = float(np.average(x[seen], weights=w[seen])) if seen.any() and w[seen].sum() > 0 else 0.0
        x[np.isnan(x)] = mean_x


@dataclass
class Calibration:
    search: ThresholdSearch
    thresholds: tuple[float, ...]  # in [0, 1], within the bounds: what goes into the config
    chosen: CascadeEval  # the rows evaluated at ``thresholds``
    current: CascadeEval | None  # ... and at the thresholds in force


def fit(
    rows: Rows,
    target_quality: float,
    *,
    margin_z: float = 1.0,
    bounds: tuple[float, float] = (0.0, 1.0),
    current: Sequence[float] | None = None,
    n_candidates: int = 40,
) -> Calibration:
    """Cheapest thresholds whose weighted quality (less ``margin_z`` standard errors) meets the target.

    Deterministic: the same rows give the same thresholds. A chosen threshold (an observed score) is
    moved halfway down to the next lower observed score, which keeps the accept set and leaves room
    for float noise; "always accept" becomes the lower bound and "never accept" the upper one.
    """
    cands = [candidate_thresholds(obs, n_candidates) for obs in rows.observed]
    search = choose_thresholds(
        rows.scores,
        rows.correct,
        rows.cost,
        target_quality,
        rows.weights,
        candidates=cands,
        margin_z=margin_z,
    )
    unit = to_unit(search.best.thresholds, rows, bounds)
    chosen = evaluate_cascade(rows.scores, rows.correct, rows.cost, unit, rows.weights)
    now = None
    if current is not None and len(current) == len(unit):
        now = evaluate_cascade(rows.scores, rows.correct, rows.cost, list(current), rows.weights)
    return Calibration(search, unit, chosen, now)


def to_unit(raw: Sequence[float], rows: Rows, bounds: tuple[float, float]) -> tuple[float, ...]:
    """Thresholds as the search found them (observed scores, +-inf) -> config values in ``bounds``."""
    return tuple(_clamp(_midpoint(t, obs), bounds) for t, obs in zip(raw, rows.observed, strict=True))


def _midpoint(t: float, observed: FloatArray) -> float:
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    lower = observed[observed < t]
    return (t + float(lower.max())) / 2.0 if lower.size else 0.0


def _clamp(t: float, bounds: tuple[float, float]) -> float:
    return round(min(bounds[1], max(bounds[0], t)), 6)


def guard(
    old: Sequence[float], proposed: Sequence[float], max_step: float, bounds: tuple[float, float]
) -> tuple[float, ...]:
    """Move each threshold towards the proposal by at most ``max_step``, staying within ``bounds``."""
    out = []
    for o, p in zip(old, proposed, strict=True):
        step = max(-max_step, min(max_step, p - o))
        out.append(_clamp(o + step, bounds))
    return tuple(out)
