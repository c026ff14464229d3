"""``learned`` scorers: a light model fitted from labelled traces or a replay train split
(``cascade fit-scorer``), loaded from its JSON file at startup. Scoring is pure Python (well under 1 ms):
features of the prompt, the answer, the earlier stages' answers and logprob statistics, then a
logistic regression. The score is the estimated probability that the answer is good enough."""

from __future__ import annotations

from app.answers import message_text, messages_to_prompt
from app.config import LearnedScorer as LearnedConfig
from app.scoring.base import Answer, Score, ScoreContext
from app.scoring.model import LogisticModel as Model


def answer_text(answer: Answer) -> str:
    """The text the features see (content, or tool calls as compact JSON): the same form the trace
    store records, so scorers fitted from traces see at serving time what they were fitted on."""
    return message_text(answer.message)


class Learned:
    kind = "learned"
    inline = True  # pure CPU: no timeout timer needed

    def __init__(self, cfg: LearnedConfig) -> None:
        self.cfg = cfg
        self._model = Model.load(cfg.model)

    async def score(self, ctx: ScoreContext) -> Score:
        lp = ctx.answer.logprobs
        token_lps = None
        if lp and isinstance(lp.get("content"), list):
            token_lps = [
                t["logprob"]
                for t in lp["content"]
                if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)
            ]
        p = self._model.score(
            messages_to_prompt(ctx.request.get("messages") or []),
            answer_text(ctx.answer),
            previous=[answer_text(a) for a in ctx.previous],
            logprobs=token_lps or None,
            finish_reason=ctx.answer.finish_reason,
        )
        return Score(p, f"learned P(good) = {p:.2f}")
