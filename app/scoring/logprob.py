"""Token-probability confidence from the stage's own logprobs.

The engine asks the stage's upstream for ``logprobs`` whenever a stage has this scorer (and strips them
from the reply unless the client asked). Aggregates over the answer's token probabilities:
``p10`` (default; a low quantile: one very unsure token matters, answer length does not), ``mean``,
``min``, ``geo`` (geometric mean: exp of the mean logprob, the per-token likelihood of the answer) and
``first`` (the first token, which for short answers is often the decision itself).
"""

from __future__ import annotations

import math

from app.config import LogprobScorer as LogprobConfig
from app.errors import ScorerError
from app.scoring.base import Abstain, Score, ScoreContext


class MissingLogprobs(ScorerError):
    """The upstream sent no logprobs to score."""


def token_probs(logprobs: object) -> list[float]:
    """Probabilities of the answer tokens from an OpenAI-shaped ``logprobs`` object."""
    if not isinstance(logprobs, dict):
        return []
    content = logprobs.get("content")
    if not isinstance(content, list):
        return []
    out = []
    for t in content:
        lp = t.get("logprob") if isinstance(t, dict) else None
        if isinstance(lp, int | float) and not isinstance(lp, bool):
            out.append(math.exp(max(-100.0, min(0.0, float(lp)))))
    return out


def aggregate(probs: list[float], how: str) -> float:
    if how == "mean":
        return sum(probs) / len(probs)
    if how == "min":
        return min(probs)
    if how == "first":
        return probs[0]
    if how == "geo":
        # Geometric mean = exp(mean logprob): the per-token likelihood of the whole answer.
        return math.exp(sum(math.log(max(p, 1e-300)) for p in probs) / len(probs))
    ordered = sorted(probs)
    # Nearest-rank 10th percentile: with fewer than 10 tokens this is the least likely token.
    k = max(0, math.ceil(0.10 * len(ordered)) - 1)
    return ordered[k]


class Logprob:
    kind = "logprob"
    inline = True  # pure CPU: no timeout timer needed
    needs_logprobs = True

    def __init__(self, cfg: LogprobConfig) -> None:
        self.cfg = cfg

    async def score(self, ctx: ScoreContext) -> Score:
        probs = token_probs(ctx.answer.logprobs)
        if not probs:
            if ctx.answer.message.get("tool_calls"):
                # OpenAI gives no logprobs for tool-call tokens: nothing to judge, so no opinion.
                raise Abstain("no logprobs for a tool-call answer")
            raise MissingLogprobs("the upstream returned no logprobs")
        value = aggregate(probs, self.cfg.aggregate)
        return Score(value, f"{self.cfg.aggregate} token probability {value:.2f} over {len(probs)} tokens")
