"""Cross-fitted, calibrated scorers: scores for choosing thresholds that the scorer never saw.

A scorer's scores on the rows it was fitted on are better than its scores will be on new answers, so
thresholds chosen on them accept too much. Here each row is scored by a model fitted on the other
folds (out-of-fold, "OOF"); a one-feature logistic fit on those OOF decision values (Platt scaling)
maps them to P(correct); the model served is the mean of the fold models (one linear model) with that
calibration folded in, so its output is a probability on the same scale the thresholds were chosen on.

API::

    folds = fold_ids(n, k=5, seed=0, strata=None)        # int array, one fold per row
    cf = crossfit(X, y, folds, l2=10.0, weights=None, feature_spec=..., meta=...)
    cf.oof          # (n,) calibrated out-of-fold P(correct) per row
    cf.model        # the fold models' mean, calibrated (predict_proba = P(correct))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from app.learning.fitting import fit_logistic
from app.scoring.feature_spec import FeatureSpec, feature_names
from app.scoring.model import LogisticModel

FloatArray = npt.NDArray[np.float64]
PLATT_L2 = 1e-3  # the calibration map has two parameters: barely regularised


def fold_ids(n: int, k: int = 5, seed: int = 0, strata: Any = None) -> npt.NDArray[np.int64]:
    """Fold of each row: a seeded shuffle dealt round-robin, within each stratum when given (so
    every fold has about the same share of each label)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, dtype=np.int64)
    groups = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata).reshape(-1)
    offset = 0
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        rng.shuffle(idx)
        out[idx] = (np.arange(idx.size) + offset) % k
        offset += idx.size
    return out


@dataclass
class CrossFit:
    oof: FloatArray  # calibrated out-of-fold probabilities
    model: LogisticModel  # fitted on every row, calibrated
    platt: tuple[float, float]  # (slope, intercept) on the decision value


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0))), dtype=np.float64)


def _decision(model: LogisticModel, X: FloatArray) -> FloatArray:
    w, b = model.folded
    return np.asarray(X @ np.asarray(w, dtype=np.float64) + b, dtype=np.float64)


def crossfit(
    X: Any,
    y: Any,
    folds: Any,
    *,
    l2: float = 10.0,
    weights: Any = None,
    feature_spec: FeatureSpec | None = None,
    meta: Mapping[str, Any] | None = None,
) -> CrossFit:
    xa = np.asarray(X, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    fa = np.asarray(folds).reshape(-1)
    sw = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    n = ya.shape[0]
    z = np.zeros(n)
    fold_w: list[FloatArray] = []
    fold_b: list[float] = []
    for f in np.unique(fa):
        test = fa == f
        train = ~test
        if not train.any():
            continue
        m = fit_logistic(
            xa[train],
            ya[train],
            l2=l2,
            class_weight=None,
            sample_weight=None if sw is None else sw[train],
            feature_spec=feature_spec,
        )
        z[test] = _decision(m, xa[test])
        w, b = m.folded
        fold_w.append(np.asarray(w, dtype=np.float64))
        fold_b.append(b)
    if np.unique(fa).size < 2:  # one fold: nothing held out, the in-sample scores are all there is
        z = _decision(fit_logistic(xa, ya, l2=l2, class_weight=None, sample_weight=sw), xa)
    platt = fit_logistic(z[:, None], ya, l2=PLATT_L2, class_weight=None, sample_weight=sw)
    (a,), b = platt.folded
    if not np.isfinite(a) or a <= 0:  # OOF scores carry no signal: keep the order, calibrate the level
        a = 1e-3
        b = float(np.log(max(1e-6, ya.mean()) / max(1e-6, 1.0 - ya.mean())))
    calibration = {"method": "platt-oof", "slope": float(a), "intercept": float(b)}
    if len(fold_w) > 1:
        # The mean of the fold models (one linear model, no refit): on new rows its decision values are
        # spread like the out-of-fold ones the calibration and the thresholds were chosen on. (A model
        # refitted on every row measured the same on the replay sets; this one costs no extra fit.
        # Serving the fold models themselves, one per request, matches the spread exactly even for
        # features without signal, but was noisier after a drift: README, Learned scorer.)
        w_avg = np.mean(np.stack(fold_w), axis=0)
        coef, intercept = [float(a * v) for v in w_avg], a * float(np.mean(fold_b)) + b
        mean, scale = [0.0] * len(coef), [1.0] * len(coef)
        spec = feature_spec or FeatureSpec(hash_dim=max(0, len(coef) - len(FeatureSpec(hash_dim=0).names)))
        names = feature_names(spec) if spec.dim == len(coef) else [f"x{i}" for i in range(len(coef))]
        info = {**dict(meta or {}), "n_train": int(n), "positive_rate": float((ya > 0.5).mean()), "l2": l2}
    else:
        full = fit_logistic(
            xa, ya, l2=l2, class_weight=None, sample_weight=sw, feature_spec=feature_spec, meta=meta
        )
        coef, intercept = [a * c for c in full.coef], a * full.intercept + b
        mean, scale, spec, names, info = (
            list(full.mean),
            list(full.scale),
            full.feature_spec,
            full.names,
            full.meta,
        )
    calibrated = LogisticModel(
        coef=coef,
        intercept=intercept,
        mean=mean,
        scale=scale,
        feature_spec=spec,
        names=list(names),
        meta={**info, "calibration": calibration},
    )
    return CrossFit(_sigmoid(a * z + b), calibrated, (float(a), float(b)))
