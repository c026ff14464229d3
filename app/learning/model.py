"""A light learned answer scorer: L2-regularised, class-weighted logistic regression.

Fitting uses numpy (Newton / IRLS, exact and fast for a few hundred to a few thousand features);
prediction is pure Python, so a serving process only needs the JSON file.

API::

    model = LogisticModel.fit(X, y, l2=1.0, class_weight="balanced", sample_weight=None,
                              feature_spec=FeatureSpec(), meta={...})
    model.predict_proba(x) -> float                 # x: one feature vector (list[float])
    model.predict_proba_many(X) -> list[float]
    model.save(path); LogisticModel.load(path)      # versioned JSON, carries the feature spec

    scorer = LearnedScorer.load(path)               # what a `{type: learned, model: PATH}` scorer wraps
    scorer.score(prompt, answer, previous=(), logprobs=None, finish_reason=None) -> float in [0, 1]

File format (``format: "cascade-learned-scorer"``, ``version: 1``)::

    {"format": "cascade-learned-scorer", "version": 1, "kind": "logistic",
     "feature_spec": {...FeatureSpec.to_dict()...}, "feature_names": [...],
     "mean": [...], "scale": [...], "coef": [...], "intercept": float, "meta": {...}}

The score is ``sigmoid(intercept + sum(coef_i * (x_i - mean_i) / scale_i))``: the estimated probability
that the answer is correct (good enough), given the prompt, the answer and the earlier stages' answers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.learning.features import FeatureSpec, extract_features, feature_names

MODEL_FORMAT = "cascade-learned-scorer"
MODEL_VERSION = 1


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass
class LogisticModel:
    """Standardised logistic regression; see the module docstring."""

    coef: list[float]
    intercept: float
    mean: list[float]
    scale: list[float]
    feature_spec: FeatureSpec = field(default_factory=FeatureSpec)
    names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.coef)
        if len(self.mean) != n or len(self.scale) != n:
            raise ValueError("coef, mean and scale must have the same length")
        # fold standardisation into one weight vector for fast prediction
        self._w = [c / s for c, s in zip(self.coef, self.scale, strict=True)]
        self._b = self.intercept - sum(w * m for w, m in zip(self._w, self.mean, strict=True))
        self._nz = [(i, w) for i, w in enumerate(self._w) if w != 0.0]

    @property
    def dim(self) -> int:
        return len(self.coef)

    @property
    def folded(self) -> tuple[list[float], float]:
        """(weights, bias) on raw features: ``decision(x) = bias + sum(weights_i * x_i)``."""
        return list(self._w), self._b

    # ------------------------------------------------------------------ prediction (pure python)
    def decision(self, x: Sequence[float]) -> float:
        if len(x) != len(self._w):
            raise ValueError(f"feature vector has {len(x)} values, model wants {len(self._w)}")
        z = self._b
        for i, w in self._nz:
            z += w * x[i]
        return z

    def predict_proba(self, x: Sequence[float]) -> float:
        """Probability in (0, 1): the decision is clipped to [-30, 30], so never exactly 0 or 1."""
        return _sigmoid(min(30.0, max(-30.0, self.decision(x))))

    def predict_proba_many(self, xs: Sequence[Sequence[float]]) -> list[float]:
        return [self.predict_proba(x) for x in xs]

    # ------------------------------------------------------------------ fitting (numpy)
    @classmethod
    def fit(
        cls,
        x: Sequence[Sequence[float]] | Any,
        y: Sequence[bool | int | float] | Any,
        *,
        l2: float = 1.0,
        class_weight: str | Mapping[int, float] | None = "balanced",
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
        ``class_weight``: ``"balanced"`` (each class gets half the total weight), a ``{0: w0, 1: w1}``
        mapping, or ``None``. ``sample_weight`` multiplies in (e.g. inverse sampling probabilities).
        """
        import numpy as np

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
        return cls(
            coef=[float(v) for v in beta[1:]],
            intercept=float(beta[0]),
            mean=[float(v) for v in mean],
            scale=[float(v) for v in scale],
            feature_spec=spec,
            names=nm,
            meta=m,
        )

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "kind": "logistic",
            "feature_spec": self.feature_spec.to_dict(),
            "feature_names": list(self.names),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LogisticModel:
        if d.get("format") != MODEL_FORMAT:
            raise ValueError(f"not a {MODEL_FORMAT} file (format={d.get('format')!r})")
        if int(d.get("version", -1)) != MODEL_VERSION:
            raise ValueError(f"unsupported {MODEL_FORMAT} version {d.get('version')!r}")
        if d.get("kind", "logistic") != "logistic":
            raise ValueError(f"unsupported model kind {d.get('kind')!r}")
        spec = FeatureSpec.from_dict(dict(d["feature_spec"]))
        coef = [float(v) for v in d["coef"]]
        if len(coef) != spec.dim:
            raise ValueError(
                f"model has {len(coef)} coefficients but its feature spec has {spec.dim} features"
            )
        return cls(
            coef=coef,
            intercept=float(d["intercept"]),
            mean=[float(v) for v in d["mean"]],
            scale=[float(v) for v in d["scale"]],
            feature_spec=spec,
            names=[str(v) for v in d.get("feature_names", [])],
            meta=dict(d.get("meta", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LogisticModel:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def top_features(self, k: int = 15) -> list[tuple[str, float]]:
        """Largest standardised coefficients by magnitude: (name, coef)."""
        names = self.names if len(self.names) == len(self.coef) else [f"x{i}" for i in range(len(self.coef))]
        order = sorted(range(len(self.coef)), key=lambda i: -abs(self.coef[i]))
        return [(names[i], self.coef[i]) for i in order[:k]]


class LearnedScorer:
    """Request-time wrapper: text in, probability out. Stateless after loading; thread-safe."""

    def __init__(self, model: LogisticModel) -> None:
        self.model = model
        self.spec = model.feature_spec

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LearnedScorer:
        return cls(LogisticModel.load(path))

    def features(
        self,
        prompt: str,
        answer: str,
        previous: Sequence[str] = (),
        logprobs: Sequence[float] | None = None,
        finish_reason: str | None = None,
    ) -> list[float]:
        return extract_features(prompt, answer, previous, logprobs, finish_reason, self.spec)

    def score(
        self,
        prompt: str,
        answer: str,
        previous: Sequence[str] = (),
        logprobs: Sequence[float] | None = None,
        finish_reason: str | None = None,
    ) -> float:
        return self.model.predict_proba(self.features(prompt, answer, previous, logprobs, finish_reason))
