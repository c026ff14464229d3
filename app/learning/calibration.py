"""From labelled traces to per-stage thresholds: the rows, the fit and the guard rails. Pure; numpy.

One row per labelled request of a cascade. ``correct[k]`` is whether stage k's answer is as good as the
last stage's (1 = as good; ``app.learning.labels``), the last stage's own being 1 unless a user said
otherwise. A request is labelled when it has a reference answer for the stage that served it: it
reached the last stage and got free labels, or it was accepted early and got a shadow label, or a user
labelled it. Its weight is the inverse of its realised chance of being labelled:

* ``p̂[k]`` = the share of the requests accepted at stage ``k`` (in the fit's window, with the same
  decay) that are labelled, by any source: about 1 for stage K-1 when answers are closed forms, the
  realised shadow rate for earlier stages (busy, over budget, circuit open and failed shadow calls all
  lower it below ``shadow_rate``). Nominal rates would bias every estimate whenever calls are skipped.
* a labelled request accepted at stage ``k`` weighs ``decay / p̂[k]``; ``decay`` halves every
  ``half_life_labels`` newer labelled requests (drift: new traffic outweighs old), and only the newest
  ``window_labels`` labelled requests count.
* The estimates are unbiased when being labelled does not depend on the answer's quality at a given
  accepted stage: true of shadow draws and their skips; users who mostly report bad answers break it.
* User scores become labels at ``user_pass_score``; a user label overrides a free or shadow label of the
  same answer. The last stage's cost is what it cost (escalated), what the shadow call cost (shadow),
  or the trace's baseline (user).

Without the counts of requests per accepted stage (``LabelledData.accepted`` is None) the stored
nominal weights are used (1, 1/shadow_rate). Stages a request never reached (a middle stage, when an
earlier one accepted) are filled in with that stage's weighted mean label and mean cost, and always
accept: a deliberately pessimistic guess for quality, so a fit errs towards escalating. Scores of
failed attempts are NaN (never accepted).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from app.learning.labels import user_label
from app.learning.search import Search, policy_grid, replicate_weights
from app.learning.store import LabelledData
from app.learning.thresholds import (
    CascadeEval,
    FloatArray,
    ThresholdSearch,
    candidate_thresholds,
    candidates_per_stage,
    choose_thresholds,
    evaluate_cascade,
)

ALWAYS = 1e300  # score of a stage the request never reached: above every finite threshold

AttemptT = tuple[str, float | None, float]  # outcome, score, cost
LabelT = tuple[str, int | None, float, float, float]  # source, stage, value, nominal weight, cost


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
    rates: dict[int, float] = field(default_factory=dict)  # realised labelling rate per accepted stage
    accepted: dict[int, float] = field(default_factory=dict)  # (decayed) requests per accepted stage

    @property
    def n(self) -> int:
        return int(self.scores.shape[0])


@dataclass(slots=True)
class Entry:
    """One labelled request, ready to become a row."""

    seq: int  # order of arrival (the fit's time axis)
    accepted: int
    kind: str  # escalated | shadow | user
    scores: list[float]
    correct: list[float]
    cost: list[float]
    nominal: float  # the stored weight (1 or 1/shadow_rate)
    sources: Counter[str]


def make_entry(
    seq: int,
    n_stages: int,
    accepted: int | None,
    baseline: float,
    attempts: Mapping[int, AttemptT],
    labels: Sequence[LabelT],
    K: int,
    pass_score: float = 0.5,
) -> Entry | None:
    """The row of one request (labels in id order: later ones win), or None when it has no reference."""
    if n_stages != K or accepted is None:
        return None
    got: dict[int, tuple[str, float]] = {}
    user: dict[int | None, float] = {}
    shadow = False
    shadow_cost = 0.0
    nominal = 1.0
    for source, stage, value, weight, cost in labels:
        if source == "user":
            user[stage] = user_label(float(value), pass_score)
        elif stage is not None:
            got[int(stage)] = (source, float(value))
        if source == "shadow":
            shadow = True
            shadow_cost += float(cost)
            nominal = max(nominal, float(weight))
    for stage, value in user.items():
        got[accepted if stage is None else int(stage)] = ("user", value)
    if accepted == K - 1 and K - 1 in attempts and got:
        kind, last_cost = "escalated", attempts[K - 1][2]
    elif shadow and accepted < K - 1:
        kind, last_cost = "shadow", shadow_cost
    elif accepted in got:
        kind, last_cost = "user", float(baseline)
    else:
        return None
    s, c, x = [], [], []
    used: Counter[str] = Counter()
    for k in range(K - 1):
        if k in attempts:
            outcome, score, cost = attempts[k]
            s.append(math.nan if score is None else float(score))
            x.append(cost)
            if k in got:
                c.append(got[k][1])
                used[got[k][0]] += 1
            else:
                c.append(0.0 if outcome == "error" else math.nan)
        else:
            s.append(ALWAYS)
            c.append(math.nan)
            x.append(math.nan)
    s.append(0.0)
    c.append(got[K - 1][1] if K - 1 in got else 1.0)
    x.append(last_cost)
    return Entry(seq, accepted, kind, s, c, x, nominal, used)


def assemble(data: LabelledData, n_stages: int, *, pass_score: float = 0.5) -> Rows:
    """Rows of every labelled request in ``data`` (no decay): ``cascade calibrate``, ``fit-scorer``."""
    K = n_stages
    labels: dict[str, list[LabelT]] = defaultdict(list)
    last_id = 0
    for lid, tid, stage, source, value, weight, cost in data.labels:  # ordered by id
        last_id = max(last_id, int(lid))
        labels[tid].append((source, stage, float(value), float(weight), float(cost)))
    attempts: dict[str, dict[int, AttemptT]] = defaultdict(dict)
    for tid, stage, outcome, score, cost in data.attempts:
        attempts[tid][int(stage)] = (outcome, score, float(cost))
    entries = []
    for i, (tid, n, accepted, baseline) in enumerate(data.traces):
        e = make_entry(i, n, accepted, baseline, attempts.get(tid, {}), labels.get(tid, []), K, pass_score)
        if e is not None:
            entries.append(e)
    if data.accepted is None:
        return to_rows(entries, K, [e.nominal for e in entries], last_id)
    return weigh(entries, K, data.accepted, last_id=last_id)


SEGMENT_LABELS = 10  # labelled requests per stratum of time when rates are measured along the stream


def weigh(
    entries: Sequence[Entry],
    K: int,
    population: Mapping[int, float] | Sequence[tuple[int, int]],
    *,
    half_life: int = 0,
    window: int = 0,
    last_id: int = 0,
) -> Rows:
    """Rows weighted by decay / realised labelling rate (module docstring).

    ``entries`` in arrival order. ``population``: every request (labelled or not) as ``(seq,
    accepted_stage)`` in arrival order, or already counted per accepted stage (one rate per stage).
    Along the stream the rate is measured per stratum of time: the requests accepted at a stage are cut,
    in arrival order, into runs holding ``SEGMENT_LABELS`` labelled ones, and each labelled request
    stands for its run. Rates that change over time (spend caps binding now and then, while the
    thresholds and so the accepted answers change too) would otherwise bias the fit."""
    if window and len(entries) > window:
        entries = entries[-window:]
    seqs = np.asarray([e.seq for e in entries], dtype=np.int64)
    decay = _decay(seqs, seqs, half_life)
    labelled: dict[int, float] = defaultdict(float)
    for e, d_e in zip(entries, decay, strict=True):
        labelled[e.accepted] += float(d_e)
    if isinstance(population, Mapping):
        totals = {int(k): float(v) for k, v in population.items()}
        # A request counted as labelled is one of the population too: the rate is at most 1.
        rate = {k: min(1.0, v / totals[k]) if totals.get(k) else 1.0 for k, v in labelled.items()}
        w = [float(d_e) / rate[e.accepted] for e, d_e in zip(entries, decay, strict=True)]
    else:
        start = int(seqs[0]) if seqs.size else 0
        pop = np.asarray([p for p in population if p[0] >= start], dtype=np.int64).reshape(-1, 2)
        d = _decay(pop[:, 0], seqs, half_life)
        totals = {int(k): float(d[pop[:, 1] == k].sum()) for k in np.unique(pop[:, 1])}
        w = _stratified(entries, decay, pop, d)
    rates = {k: min(1.0, v / totals[k]) if totals.get(k) else 1.0 for k, v in labelled.items()}
    rows = to_rows(entries, K, w, last_id)
    rows.rates = dict(sorted(rates.items()))
    rows.accepted = {k: round(v, 3) for k, v in sorted(totals.items())}
    return rows


def _stratified(entries: Sequence[Entry], decay: FloatArray, pop: np.ndarray, d: FloatArray) -> list[float]:
    """Per accepted stage, runs of the population with SEGMENT_LABELS labelled requests each (the last,
    shorter run joins the one before): a labelled request weighs its decay x (the run's decayed
    requests / its decayed labelled ones)."""
    index = {e.seq: i for i, e in enumerate(entries)}
    w = [0.0] * len(entries)
    for k in np.unique(pop[:, 1]):
        runs: list[tuple[float, float, list[int]]] = []  # (requests, labelled, entry indexes)
        mass = lab = 0.0
        members: list[int] = []
        for seq, dk in zip(pop[pop[:, 1] == k, 0], d[pop[:, 1] == k], strict=True):
            mass += float(dk)
            i = index.get(int(seq))
            if i is not None and entries[i].accepted == k:
                lab += float(decay[i])
                members.append(i)
                if len(members) == SEGMENT_LABELS:
                    runs.append((mass, lab, members))
                    mass, lab, members = 0.0, 0.0, []
        if runs and (members or mass):
            m0, l0, i0 = runs.pop()
            runs.append((m0 + mass, l0 + lab, i0 + members))
        elif members:
            runs.append((mass, lab, members))
        for m, lb, idx in runs:
            factor = max(1.0, m / lb) if lb > 0 else 1.0
            for i in idx:
                w[i] = float(decay[i]) * factor
    # Labelled requests missing from the population (not expected) keep their decay and rate 1.
    return [wi if wi > 0 else float(dc) for wi, dc in zip(w, decay, strict=True)]


def _decay(at: np.ndarray, labelled: np.ndarray, half_life: int) -> FloatArray:
    """0.5 ** (newer labelled requests / half_life) for requests arriving at ``at``."""
    if not half_life or not at.size:
        return np.ones(at.shape[0])
    newer = labelled.shape[0] - np.searchsorted(labelled, at, side="right")
    return np.asarray(0.5 ** (newer / float(half_life)), dtype=np.float64)


def to_rows(entries: Sequence[Entry], K: int, weights: Sequence[float], last_id: int = 0) -> Rows:
    kinds: Counter[str] = Counter(e.kind for e in entries)
    used: Counter[str] = Counter()
    for e in entries:
        used.update(e.sources)
    rows = Rows(
        np.asarray([e.scores for e in entries], dtype=np.float64).reshape(-1, K),
        np.asarray([e.correct for e in entries], dtype=np.float64).reshape(-1, K),
        np.asarray([e.cost for e in entries], dtype=np.float64).reshape(-1, K),
        np.asarray(weights, dtype=np.float64),
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
        seen = s < ALWAYS
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
    optimism: float = 0.0  # the selection's measured optimism, paid by the choice (``honest=True``)


def fit(
    rows: Rows,
    target_quality: float,
    *,
    margin_z: float = 1.0,
    bounds: tuple[float, float] = (0.0, 1.0),
    current: Sequence[float] | None = None,
    n_candidates: int = 40,
    honest: bool = False,
    replicates: int = 64,
) -> Calibration:
    """Cheapest thresholds whose weighted quality (less ``margin_z`` standard errors) meets the target.

    ``honest=True`` (``cascade calibrate``, ``fit-scorer --from-store``, the online tuner unless
    ``learning.optimism_correction`` is false): the choice is made over bootstrap replicates of the rows
    as well (:mod:`app.learning.search`), and must reach the target plus the optimism that choosing the
    cheapest of many threshold combinations measurably has, with ``margin_z`` bootstrap standard errors
    to spare.

    Deterministic: the same rows give the same thresholds. A chosen threshold (an observed score) is
    moved halfway down to the next lower observed score, which keeps the accept set and leaves room
    for float noise; "always accept" becomes the lower bound and "never accept" the upper one.
    """
    # The honest search takes every observed score of a lone scored stage (within the grid budget);
    # the plain one keeps n_candidates quantiles.
    per = candidates_per_stage(len(rows.observed), n_candidates) if honest else n_candidates
    cands = [candidate_thresholds(obs, per) for obs in rows.observed]
    search = choose_thresholds(
        rows.scores,
        rows.correct,
        rows.cost,
        target_quality,
        rows.weights,
        candidates=cands,
        margin_z=margin_z,
    )
    optimism = 0.0
    if honest and rows.n:
        W = replicate_weights(rows.n, replicates, 0, rows.weights)
        honest_search = Search(np.ones(W.shape[1]), target_quality, margin_z)
        honest_search.add(("cascade",), policy_grid(rows.scores[:, :-1], rows.correct, rows.cost, cands, W))
        pick = honest_search.result()
        optimism = pick.optimism
        best = evaluate_cascade(rows.scores, rows.correct, rows.cost, pick.thresholds, rows.weights)
        search = ThresholdSearch(best, pick.feasible, target_quality, search.table)
    unit = to_unit(search.best.thresholds, rows, bounds)
    chosen = evaluate_cascade(rows.scores, rows.correct, rows.cost, unit, rows.weights)
    now = None
    if current is not None and len(current) == len(unit):
        now = evaluate_cascade(rows.scores, rows.correct, rows.cost, list(current), rows.weights)
    return Calibration(search, unit, chosen, now, optimism)


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
    old: Sequence[float],
    proposed: Sequence[float],
    max_step: float,
    bounds: tuple[float, float],
    *,
    up: float | None = None,
) -> tuple[float, ...]:
    """Move each threshold towards the proposal by at most ``max_step`` down (accepting more) and
    ``up`` (default ``max_step``) up (escalating more), staying within ``bounds``."""
    rise = max_step if up is None else up
    out = []
    for o, p in zip(old, proposed, strict=True):
        step = max(-max_step, min(rise, p - o))
        out.append(_clamp(o + step, bounds))
    return tuple(out)
