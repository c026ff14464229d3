"""Labelled rows: one prompt, and for each model its answer, whether it was right and what it cost.

What fitting a cascade needs (:mod:`app.learning.train`); recorded datasets (:mod:`app.replay.dataset`)
are read into these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelAnswer:
    answer: str
    correct: bool
    cost_usd: float
    cost_estimated: bool = False
    score: float | None = None


@dataclass(frozen=True)
class Row:
    id: str
    prompt: str
    split: str
    answers: Mapping[str, ModelAnswer]
    reference: Any = None
    dataset: str = ""
