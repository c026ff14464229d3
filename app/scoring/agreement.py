"""Agreement scorers: answers that agree are evidence of a right answer.

``consistency`` samples the stage's model k-1 more times (one call with ``n`` when the upstream honours
it, else parallel calls) and scores the share of samples whose canonical answer equals the scored
answer's; an empty answer scores 0. ``agreement`` compares the answer with the answers earlier stages
of the same request already produced (paid for, so free here), by the rule the fit and the replay
baselines use (``app.answers.agreeing``). Both compare canonical answers
(``app.answers.canonical_answer``): the choice letter, the final number, canonical JSON for tool calls
and JSON answers, else normalised text.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.answers import agreeing, canonical_answer, message_text
from app.config import AgreementScorer as AgreementConfig
from app.config import ConsistencyScorer as ConsistencyConfig
from app.protocol import prompt_text
from app.scoring import paid
from app.scoring.base import Score, ScoreContext
from app.upstream.client import Upstream

Json = dict[str, Any]


class Consistency:
    kind = "consistency"

    def __init__(self, cfg: ConsistencyConfig, own: Upstream) -> None:
        self.cfg = cfg
        self._up = own

    async def _sample(self, ctx: ScoreContext, n: int) -> list[str]:
        body = {
            k: v
            for k, v in ctx.request.items()
            if k not in ("stream", "stream_options", "logprobs", "top_logprobs")
        }
        body["temperature"] = self.cfg.temperature
        up = self._up
        if up.cfg.supports_n:
            body["n"] = n
            replies = [await paid.complete(ctx, up, body)]
        else:
            body.pop("n", None)
            calls = [asyncio.ensure_future(paid.complete(ctx, up, body)) for _ in range(n)]
            try:
                replies = list(await asyncio.gather(*calls))
            except BaseException:
                for call in calls:  # one failed (or the scorer was cut off): stop the others
                    call.cancel()
                raise
        texts: list[str] = []
        for r in replies:
            for ch in r.get("choices") or ():
                message = ch.get("message") if isinstance(ch, dict) else None
                texts.append(message_text(message) if isinstance(message, dict) else "")
        return texts

    async def score(self, ctx: ScoreContext) -> Score:
        prompt = prompt_text(ctx.request)
        mine = canonical_answer(message_text(ctx.answer.message), prompt)
        if not mine:
            return Score(0.0, "empty answer")  # samples that are empty too are no evidence
        texts = await self._sample(ctx, self.cfg.k - 1)
        if not texts:
            return Score(0.0, "no samples")
        same = sum(1 for t in texts if canonical_answer(t, prompt) == mine)
        return Score(same / len(texts), f"{same}/{len(texts)} samples agree")


class Agreement:
    kind = "agreement"
    inline = True  # pure CPU: no timeout timer needed

    def __init__(self, cfg: AgreementConfig) -> None:
        self.cfg = cfg

    async def score(self, ctx: ScoreContext) -> Score:
        earlier = [(a, t) for a in ctx.previous if (t := message_text(a.message)).strip()]
        if not earlier:
            # Nothing to agree with (the earlier stages failed or answered nothing): not agreeing, 0, as
            # ``agreeing`` has it for the fit and the baselines. Not an error: it used to raise, which
            # logged a warning per request and let ``on_error: accept`` score it 1.
            return Score(0.0, "no earlier answer to agree with")
        i = agreeing(
            message_text(ctx.answer.message),
            [t for _, t in earlier],
            prompt_text(ctx.request),
            any_earlier=self.cfg.with_ != "previous",
        )
        if i is not None:
            a = earlier[i][0]
            return Score(1.0, f"agrees with stage {a.stage} ({a.upstream})")
        a = earlier[-1][0]
        return Score(0.0, f"disagrees with stage {a.stage} ({a.upstream})")
