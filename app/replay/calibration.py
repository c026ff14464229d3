"""Whether a fit's learned scorers say what they mean on new rows: P(right) against right. Pure; numpy.

Every learned scorer of a fitted cascade outputs the probability that its stage's answer is right
(``app.learning.crossfit``: no class balancing, Platt scaling on cross-fitted scores), and the
thresholds are chosen as if it were one. The replay report checks that on the test rows, which the
fit never saw: each scored stage's learned probability for its model's answer on every test row
(after the answers of the stages before it, as the proxy scores it), against whether that answer was
right. ``mean_score`` next to ``accuracy`` says whether it is biased, ``ece`` (expected calibration
error: the row-weighted gap between the mean score and the accuracy within ten equal-width bins of
the score) whether it is right across its range (``ece_if_calibrated``: what a perfectly calibrated
score with the same values shows on as many rows, the mean over 200 draws of the answers from the
scores: a few hundred rows leave a few points of it by chance alone), ``brier`` (the mean squared
error) both with sharpness, and ``auc`` how well it ranks (0.5: not at all). Blended stages
(agreement and the learned score, ``app.learning.train``) are checked on their learned part: the blend
is no probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.learning.routing import auc

BINS = 10
DRAWS = 200
_EMPTY = ("mean_score", "accuracy", "ece", "ece_if_calibrated", "brier", "auc")


def _ece(p: np.ndarray, y: np.ndarray, bins: np.ndarray) -> float:
    gaps = (
        abs(float(p[bins == b].mean() - y[bins == b].mean())) * int((bins == b).sum())
        for b in np.unique(bins)
    )
    return sum(gaps) / len(p)


def calibration(scores: Sequence[float], right: Sequence[bool]) -> dict[str, Any]:
    """``n``, ``mean_score``, ``accuracy``, ``ece``, ``ece_if_calibrated``, ``brier`` and ``auc`` of
    ``scores`` for ``right``."""
    p = np.asarray(scores, dtype=np.float64)
    y = np.asarray(right, dtype=np.float64)
    n = len(p)
    if not n:
        return {"n": 0, **dict.fromkeys(_EMPTY)}
    bins = np.minimum((p * BINS).astype(np.int64), BINS - 1)
    draws = np.random.default_rng(0).random((DRAWS, n)) < p  # answers drawn from the scores themselves
    return {
        "n": n,
        "mean_score": round(float(p.mean()), 4),
        "accuracy": round(float(y.mean()), 4),
        "ece": round(_ece(p, y, bins), 4),
        "ece_if_calibrated": round(float(np.mean([_ece(p, d.astype(np.float64), bins) for d in draws])), 4),
        "brier": round(float(((p - y) ** 2).mean()), 4),
        "auc": round(auc(p, y), 4),
    }
