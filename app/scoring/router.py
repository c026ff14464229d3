"""Route-then-cascade at request time: the prompt-only router of a cascade (``cascades.NAME.router``).

Loaded at startup like a learned scorer (a ``cascade-learned-scorer`` file whose feature spec has
``kind: prompt``); scoring is pure Python on :mod:`app.scoring.prompt_features` (tens of microseconds).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.config import ConfigError, RouterConfig
from app.scoring.model import LogisticModel
from app.scoring.prompt_features import request_prompt_features


class Router:
    def __init__(self, model: LogisticModel, threshold: float) -> None:
        if model.feature_spec.kind != "prompt":
            raise ValueError("the model is a stage scorer (feature spec kind 'answer'), not a router")
        self.model = model
        self.threshold = threshold

    @classmethod
    def load(cls, cfg: RouterConfig, where: str) -> Router:
        try:
            return cls(LogisticModel.load(cfg.model), cfg.threshold)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError([f"{where}.router.model: cannot load {cfg.model!r}: {exc}"]) from exc

    def score(self, request: Mapping[str, Any]) -> float:
        """P(the earlier stages' answers would be rejected), from the request alone."""
        return self.model.predict_proba(request_prompt_features(request, self.model.feature_spec))

    def skips(self, request: Mapping[str, Any]) -> bool:
        return self.score(request) >= self.threshold
