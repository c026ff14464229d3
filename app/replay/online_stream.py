"""The stream of ``cascade replay --online`` and its target, from recorded rows. Pure.

``build_stream`` shuffles a dataset's rows (and, for ``--drift``, appends another dataset's rows under the
cascade's model names, mapped by place in the cost order); ``tuner_target`` translates the replay's
target (relative to the best single model's accuracy) into ``learning.target_quality`` (a share of
answers as good as the last stage's) on the train rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from app.learning.labels import verdict
from app.learning.rows import ModelAnswer, Row
from app.learning.search import policy_grid
from app.learning.thresholds import candidate_thresholds, choose_thresholds, evaluate_cascade
from app.replay.dataset import Dataset, best_single, model_summary


@dataclass(frozen=True)
class Item:
    """One request of the stream: the row as served (answers keyed by the cascade's models) and as
    recorded (its own dataset's models, for the best single model)."""

    row: Row
    native: Row
    source: str


@dataclass
class Stream:
    items: list[Item]
    drift_at: int | None
    best: dict[str, str]  # source dataset -> its best single model (over the stream's rows)
    drift_map: dict[str, str] = field(default_factory=dict)  # cascade model -> OTHER's model


# --- the stream -------------------------------------------------------------------------------------------


def _shuffled(rows: Sequence[Row], rng: random.Random, passes: int) -> list[Row]:
    out: list[Row] = []
    for _ in range(passes):
        order = list(rows)
        rng.shuffle(order)
        out += order
    return out


def drift_mapping(chain: Sequence[str], models: Sequence[str], other: Sequence[str]) -> dict[str, str]:
    """Each chain model (a model of ``models``, cheapest first) -> the model of ``other`` (cheapest
    first) at the same relative place in the cost order."""
    out: dict[str, str] = {}
    for m in chain:
        r = models.index(m) / (len(models) - 1) if len(models) > 1 else 0.0
        out[m] = other[int(r * (len(other) - 1) + 0.5)]
    out[chain[0]] = other[0]
    out[chain[-1]] = other[-1]
    return out


def build_stream(
    ds: Dataset,
    chain: Sequence[str],
    other: Dataset | None,
    seed: int,
    passes: int = 1,
    limit: int | None = None,
) -> Stream:
    """Every row of ``ds`` shuffled by ``seed``, ``passes`` times; with ``other``, the first half of that
    and then ``other``'s rows under the cascade's model names (``drift_mapping``); at most ``limit``."""
    rng = random.Random(seed)
    first = [Item(r, r, ds.name) for r in _shuffled(ds.rows, rng, passes)]
    best = {ds.name: best_single(model_summary(ds.rows, ds.models))}
    if other is None:
        items = first
        return Stream(items[:limit] if limit else items, None, best)
    mapping = drift_mapping(chain, ds.models, other.models)
    half = len(first) // 2
    second = []
    for r in _shuffled(other.rows, rng, passes):
        answers: dict[str, ModelAnswer] = {m: r.answers[mapping[m]] for m in chain}
        second.append(
            Item(Row(f"drift:{r.id}", r.prompt, r.split, answers, r.reference, r.dataset), r, other.name)
        )
    best[other.name] = best_single(model_summary(other.rows, other.models))
    items = first[:half] + second
    return Stream(items[:limit] if limit else items, half, best, mapping)


# --- the target -------------------------------------------------------------------------------------------


def label_values(row: Row, chain: Sequence[str]) -> list[float]:
    """What the labels say of each stage's answer on a recorded row: exact match with the last
    stage's answer for closed forms, else what the replay judge says (as good: correct, or the last
    one is not)."""
    last = row.answers[chain[-1]]
    out = []
    for m in chain[:-1]:
        a = row.answers[m]
        v = verdict("auto", a.answer, last.answer, row.prompt, have_judge=True)
        out.append(
            v.value if v.how == "exact" and v.value is not None else float(a.correct or not last.correct)
        )
    return [*out, 1.0]


class TunerTarget(NamedTuple):
    quality: float  # ``learning.target_quality`` for the run
    at_offline: float  # the labels' quality at the offline thresholds
    floor: float | None  # ``label_floor``: None when even the last stage alone misses the target


def tuner_target(
    rows: Sequence[Row],
    models: Sequence[str],
    chain: Sequence[str],
    scores: Any,
    target: float,
    margin_z: float = 1.0,
    at: Sequence[float] | None = None,
) -> TunerTarget:
    """``learning.target_quality`` for a replay target relative to the best single model: on the train
    rows, the labels' quality (share of answers as good as the last stage's) at the offline thresholds
    ``at`` (a fit's: with ``scores`` as its scorers serve them, ``train_scores``), or else at the thresholds
    an offline fit chooses there (the cheapest whose accuracy less ``margin_z`` standard errors reaches
    ``target`` x the best single model's; module doc); raised to ``label_floor`` where that is higher.

    Where those thresholds serve the first stage alone (it accepts every train row), the target is the
    label floor, lower or higher: no thresholds are cheaper than that point, so asking for its label
    quality protects nothing and only makes the tuner, whose estimate of it is as often under as over
    and which must clear it by a margin and the optimism of its choice, escalate on noise (generated
    world 0, Yi-34B alone meeting the target: the runs from the loose start, i.e. from the offline
    thresholds themselves, ended saving 60-66 % of what those save). The floor still asks for a label
    quality at which the cheapest thresholds serve the target on the train rows."""
    cost = np.asarray([[r.answers[m].cost_usd for m in chain] for r in rows])
    agree = np.asarray([label_values(r, chain) for r in rows])
    summary = model_summary(rows, models)
    acc_best = summary[best_single(summary)].accuracy
    correct = np.asarray([[float(r.answers[m].correct) for m in chain] for r in rows])
    if at is None:
        at = choose_thresholds(scores, correct, cost, target * acc_best, margin_z=margin_z).best.thresholds
    at_offline = evaluate_cascade(scores, agree, cost, list(at))
    quality = round(at_offline.quality, 4)
    floor = label_floor(scores, agree, correct, cost, target * acc_best)
    floor = None if floor is None else round(floor, 4)
    aim = max(quality, floor or 0.0)
    if floor is not None and at_offline.accept[0] >= 1.0 - 1e-9:
        aim = floor  # the offline thresholds serve the first stage alone: nothing is cheaper (docstring)
    return TunerTarget(min(0.999, max(0.5, aim)), quality, floor)


def label_floor(scores: Any, agree: Any, correct: Any, cost: Any, goal: float) -> float | None:
    """The lowest label quality at which the tuner's choice is sure to serve ``goal`` accuracy on these
    rows, or None when even the last stage alone does not.

    The tuner serves the cheapest thresholds whose label quality reaches its target. Where "as good as
    the last stage's answer" tracks correctness, the offline operating point's label quality is a fine
    target; where it does not (the last model right ~88 % of the time among near-equal models: an early
    answer that differs from it is as often right as wrong), thresholds with the same label quality
    can serve far less (a generated world: 0.793 at the offline thresholds, 0.956 of the best model
    there, and 0.829 at the cheapest thresholds with that label quality). So every combination of
    candidate thresholds is evaluated both ways, and the floor is the lowest label quality ``L`` such
    that for every ``L' >= L`` the cheapest combination with label quality ``>= L'`` serves ``goal``."""
    s = np.asarray(scores, dtype=np.float64)
    n = s.shape[0]
    if n == 0 or s.shape[1] < 2:
        return None
    cands = [candidate_thresholds(s[:, k], 40) for k in range(s.shape[1] - 1)]
    ones = np.ones((n, 1))
    by_label = policy_grid(s[:, :-1], agree, cost, cands, ones)
    by_truth = policy_grid(s[:, :-1], correct, cost, cands, ones)
    label, truth, spend = by_label.quality[:, 0], by_truth.quality[:, 0], by_label.cost[:, 0]
    floor = None
    cheapest = np.inf
    pick = -1
    order = np.lexsort((spend, -label))  # label quality, highest first (cheapest first among equals)
    for i, g in enumerate(order):
        if spend[g] < cheapest:
            cheapest, pick = float(spend[g]), int(g)
        if i + 1 < len(order) and label[order[i + 1]] == label[g]:
            continue  # one label value at a time: its cheapest combination is known after the last one
        if truth[pick] < goal - 1e-12:
            break
        floor = float(label[g])
    return floor


def train_scores(fitted: Any, rows: Sequence[Row]) -> Any:
    """(n_rows, K) stage scores of the fitted chain's learned scorers, as the proxy serves them, on
    recorded rows (last column 0).

    The tuner's target is measured with these, not with the out-of-fold scores the fit chose its
    thresholds on: the tuner sees served scores, and where the scorers find little to tell answers apart
    (WinoGrande: each fold model gives a multiple-choice letter's answers a score of its own, the mean
    model one score for all of them) the offline thresholds accept other answers served than out of
    fold. On WinoGrande's train rows they served Yi-34B for 70 % of the requests at a label quality of
    0.919 (0.918 on the test rows), where the out-of-fold scores put 62 % and 0.926: a target the offline
    thresholds themselves do not meet, which the tuner reached by escalating more."""
    ms = fitted.models
    out = np.zeros((len(rows), len(ms)))
    for i, r in enumerate(rows):
        previous: list[str] = []
        for k, m in enumerate(ms[:-1]):
            out[i, k] = fitted.score(k, r.prompt, r.answers[m].answer, previous)
            previous.append(r.answers[m].answer)
    return out
