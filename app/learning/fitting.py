"""Fitting learned scorers: L2-regularised logistic regression by Newton's method (numpy).

The model and its file format are :mod:`app.scoring.model` (serving needs no numpy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.scoring.feature_spec import FeatureSpec, feature_names
from app.scoring.model import LogisticModel


def fit_logistic(
    x: Sequence[Sequence[float]] | Any,
    y: Sequence[bool | int | float] | Any,
    *,
    l2: float = 1.0,
    class_weight: str | Mapping[int, float] | None = None,
    sample_weight: Sequence[float] | Any | None = None,
    feature_spec: FeatureSpec | None = None,
    names: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    max_iter: int = 50,
    tol: float = 1e-8,
) -> LogisticModel:
    """Fit by Newton's method on the (weighted) penalised log-loss.

    ``l2`` is the penalty on standardised coefficients (the intercept is not penalised), relative to
    the total sample weight: loss = sum_i w_i * logloss_i / sum_i w_i + l2 / (2 n) * |coef|^2.
    ``class_weight``: ``None`` (the default: the output is P(label), what thresholds need),
    ``"balanced"`` (each class gets half the total weight; not a probability any more), or a
    ``{0: w0, 1: w1}`` mapping. ``sample_weight`` multiplies in (e.g. inverse sampling probabilities).
    """

    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if xa.ndim != 2 or xa.shape[0] != ya.shape[0]:
        raise ValueError("x must be 2-D with one row per label")
    n, d = xa.shape
    if n == 0:
        raise ValueError("no training rows")
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if sw.shape[0] != n:
        raise ValueError("sample_weight must have one value per row")
    pos = ya > 0.5
    if class_weight == "balanced":
        wp, wn = float(sw[pos].sum()), float(sw[~pos].sum())
        tot = wp + wn
        cw = np.where(pos, tot / (2 * wp) if wp > 0 else 0.0, tot / (2 * wn) if wn > 0 else 0.0)
    elif class_weight is None:
        cw = np.ones(n)
    elif isinstance(class_weight, Mapping):
        cw = np.where(pos, float(class_weight.get(1, 1.0)), float(class_weight.get(0, 1.0)))
    else:
        raise ValueError(f"unknown class_weight {class_weight!r}")
    w = sw * cw
    wsum = float(w.sum())
    if wsum <= 0:
        raise ValueError("total sample weight is zero")
    w = w / wsum  # weights sum to one

    mean = (w[:, None] * xa).sum(axis=0)
    var = (w[:, None] * (xa - mean) ** 2).sum(axis=0)
    scale = np.sqrt(var)
    const = scale < 1e-12
    scale[const] = 1.0
    mean[const] = 0.0  # constant columns: keep raw (they get ~0 weight through the penalty)
    z = (xa - mean) / scale
    z[:, const] = 0.0
    za = np.hstack([np.ones((n, 1)), z])
    lam = l2 / n
    pen = np.full(d + 1, lam)
    pen[0] = 0.0
    # start the intercept at the weighted log-odds
    p0 = float(np.clip((w * ya).sum(), 1e-6, 1 - 1e-6))
    beta = np.zeros(d + 1)
    beta[0] = math.log(p0 / (1 - p0))
    for _ in range(max_iter):
        eta = za @ beta
        p = 1.0 / (1.0 + np.exp(-np.clip(eta, -35, 35)))
        grad = za.T @ (w * (p - ya)) + pen * beta
        h_diag = w * p * (1 - p)
        hess = (za.T * h_diag) @ za + np.diag(pen + 1e-10)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        beta -= step
        if float(np.max(np.abs(step))) < tol:
            break
    spec = feature_spec or FeatureSpec(hash_dim=max(0, d - len(feature_names(FeatureSpec(hash_dim=0)))))
    nm = (
        list(names)
        if names is not None
        else (feature_names(spec) if spec.dim == d else [f"x{i}" for i in range(d)])
    )
    m = dict(meta or {})
    m.setdefault("n_train", int(n))
    m.setdefault("positive_rate", float(pos.mean()))
    m.setdefault("l2", float(l2))
    return LogisticModel(
        coef=[float(v) for v in beta[1:]],
        intercept=float(beta[0]),
        mean=[float(v) for v in mean],
        scale=[float(v) for v in scale],
        feature_spec=spec,
        names=nm,
        meta=m,
    )
