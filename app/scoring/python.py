"""``python`` scorers: your own class, loaded at startup from ``module:Class`` with ``options``.

The class needs ``async def score(self, request: dict, answer: dict) -> float | tuple[float, str]``,
where ``answer`` is the OpenAI ``message`` plus ``finish_reason``. Import or construction problems are
config errors reported at startup.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from app.config import PythonScorer as PythonConfig
from app.scoring.base import Score, ScoreContext


def load_class(spec: str) -> type[Any]:
    """``module:Class``, the module found on the import path and, after it, in the working directory
    (as ``python -m``, uvicorn and gunicorn find an app's modules; the ``cascade`` command's own path
    starts at its script's directory instead, so a scorer module next to the config was not found)."""
    module_name, _, attr = spec.partition(":")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)  # last: a file in the working directory never shadows an installed package
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not inspect.isclass(obj):
        raise TypeError(f"'{spec}' is not a class")
    return obj


class PythonScore:
    kind = "python"

    def __init__(self, cfg: PythonConfig) -> None:
        self.cfg = cfg
        cls = load_class(cfg.class_)
        self._impl = cls(**cfg.options)
        fn = getattr(self._impl, "score", None)
        if fn is None or not inspect.iscoroutinefunction(fn):
            raise TypeError(f"'{cfg.class_}' needs an 'async def score(self, request, answer)' method")

    async def score(self, ctx: ScoreContext) -> Score:
        out = await self._impl.score(ctx.request, ctx.answer.as_scorer_input())
        if isinstance(out, tuple) and len(out) == 2:
            value, reason = out
        else:
            value, reason = out, ""
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"{self.cfg.class_}.score returned {type(value).__name__}, not a number")
        return Score(float(value), str(reason)[:200])
