"""A light learned answer scorer: L2-regularised, class-weighted logistic regression.

Prediction is pure Python, so a serving process only needs the JSON file; fitting (numpy, Newton / IRLS)
is :func:`app.learning.fitting.fit_logistic`.

API::

    model = fit_logistic(X, y, l2=1.0, class_weight=None, sample_weight=None,
                              feature_spec=FeatureSpec(), meta={...})
    model.predict_proba(x) -> float                 # x: one feature vector (list[float])
    model.predict_proba_many(X) -> list[float]
    model.save(path); LogisticModel.load(path)      # versioned JSON, carries the feature spec

    model.score(prompt, answer, previous=(), logprobs=None, finish_reason=None) -> float in [0, 1]
                                                    # what a `{type: learned, model: PATH}` scorer calls

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

from app.scoring.feature_spec import FeatureSpec
from app.scoring.features import extract_features

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

    def score(
        self,
        prompt: str,
        answer: str,
        previous: Sequence[str] = (),
        logprobs: Sequence[float] | None = None,
        finish_reason: str | None = None,
    ) -> float:
        """Request time: the probability that ``answer`` is good enough, from texts."""
        x = extract_features(prompt, answer, previous, logprobs, finish_reason, self.feature_spec)
        return self.predict_proba(x)

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
