"""The scorer seam: what a scorer sees, what it returns, and how a stage's scores combine.

A scorer turns one answer into a ``Score`` in [0, 1] with a short reason; it never decides. The stage
score is the weighted mean of its scorers; a ``veto`` scorer scoring below the stage threshold forces 0.
Scorers of one stage run concurrently, each under its own timeout and ``on_error`` policy, so one slow
or broken scorer can neither hang a request nor crash it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from app.config import ScorerCommon
from app.errors import CascadeBaseError

Json = dict[str, Any]
log = logging.getLogger("cascade.scoring")


@dataclass(slots=True)
class Spend:
    """Tokens and money a scorer spent on an upstream (judge, self-verify, extra samples)."""

    upstream: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    estimated: bool = False  # the call was cut off (or reported no usage): its estimated prompt cost


@dataclass(slots=True)
class Score:
    value: float
    reason: str = ""
    spend: list[Spend] = field(default_factory=list)


@dataclass(slots=True)
class Answer:
    """One stage's answer: choice 0's message plus the whole reply (other choices, logprobs, usage)."""

    message: Json
    finish_reason: str | None
    completion: Json
    upstream: str
    stage: int

    @classmethod
    def of(cls, completion: Json, upstream: str, stage: int) -> Answer:
        """The answer of a non-streamed completion (choice 0; an empty message when it has none). The
        engine builds its answers inline, on the hot path."""
        choices = completion.get("choices") or ()
        ch0 = choices[0] if choices and isinstance(choices[0], dict) else {}
        return cls(ch0.get("message") or {}, ch0.get("finish_reason"), completion, upstream, stage)

    @property
    def text(self) -> str:
        c = self.message.get("content")
        return c if isinstance(c, str) else ""

    @property
    def logprobs(self) -> Json | None:
        choices = self.completion.get("choices") or ()
        lp = choices[0].get("logprobs") if choices else None
        return lp if isinstance(lp, dict) else None

    def as_scorer_input(self) -> Json:
        """The ``answer`` given to user scorers: the OpenAI message plus ``finish_reason``."""
        return {**self.message, "finish_reason": self.finish_reason}


@dataclass(slots=True)
class ScoreContext:
    cascade: str
    stage: int
    request: Json  # the client's request body, as received
    answer: Answer
    previous: Sequence[Answer] = ()  # answers of earlier stages of this request, in stage order
    # What scoring this answer costs: paid calls go on it as they are sent (``app.scoring.paid``), so a
    # call cut off by a timeout, the deadline or the client leaving is still charged.
    spent: list[Spend] = field(default_factory=list)


class Abstain(CascadeBaseError):
    """Raised by a scorer that has no opinion on this answer (e.g. logprob on a tool call): it is left
    out of the stage's mean, whatever its ``on_error`` policy."""


@runtime_checkable
class Scorer(Protocol):
    """``kind`` is the scorer type, used as the ``scorer`` metric label."""

    kind: str

    async def score(self, ctx: ScoreContext) -> Score: ...


@runtime_checkable
class StreamCheck(Protocol):
    """A scorer that can also reject an answer while it is still streaming (early abort)."""

    def check_partial(self, request: Json, text: str) -> str | None:
        """Return a reason to abort now, or None to keep streaming."""
        ...


@dataclass(slots=True)
class Configured:
    scorer: Scorer
    cfg: ScorerCommon
    name: str  # unique within the stage: the type, suffixed "#2", "#3" when repeated
    # Pure CPU scorers (heuristic, logprob, agreement, learned) never wait on I/O: they run without a
    # timeout timer, which is most of their cost on the hot path.
    inline: bool = False

    def __post_init__(self) -> None:
        self.inline = bool(getattr(self.scorer, "inline", False))


@dataclass(slots=True)
class StageScore:
    value: float
    reason: str
    scores: dict[str, float]
    reasons: dict[str, str]
    spend: list[Spend]


def unique_names(kinds: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for k in kinds:
        seen[k] = seen.get(k, 0) + 1
        out.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
    return out


async def _run_one(item: Configured, ctx: ScoreContext) -> Score | None:
    """Run one scorer under its timeout; apply ``on_error``. None means "ignore this scorer"."""
    policy = item.cfg.on_error
    try:
        if item.inline:
            s = await item.scorer.score(ctx)
        else:
            async with asyncio.timeout(item.cfg.timeout_s):
                s = await item.scorer.score(ctx)
        if not 0.0 <= s.value <= 1.0 or s.value != s.value:
            raise ValueError(f"score {s.value!r} is outside [0, 1]")
        return s
    except Abstain:
        return None
    except TimeoutError:
        reason = f"timeout after {item.cfg.timeout_s:g}s"
    except Exception as exc:  # a scorer is user-pluggable code: its failure is policy, not a crash
        log.warning(
            "scorer %s failed: %s", item.name, type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG)
        )
        reason = f"error: {type(exc).__name__}"
    if policy == "ignore":
        return None
    return Score(1.0 if policy == "accept" else 0.0, reason)


async def score_stage(items: Sequence[Configured], ctx: ScoreContext, veto_below: float) -> StageScore:
    if len(items) == 1:
        results: list[Score | None] = [await _run_one(items[0], ctx)]
    else:
        results = list(await asyncio.gather(*(_run_one(it, ctx) for it in items)))
    scores: dict[str, float] = {}
    reasons: dict[str, str] = {}
    spend = ctx.spent  # the paid calls, settled or cut off; plus what scorers report themselves
    total = weight = 0.0
    vetoed: str | None = None
    for it, s in zip(items, results, strict=True):
        if s is None:
            continue
        scores[it.name] = round(s.value, 6)
        if s.reason:
            reasons[it.name] = s.reason
        spend.extend(s.spend)
        total += s.value * it.cfg.weight
        weight += it.cfg.weight
        if it.cfg.veto and s.value < veto_below and vetoed is None:
            vetoed = f"{it.name}: {s.reason}" if s.reason else it.name
    if vetoed is not None:
        return StageScore(0.0, f"veto {vetoed}", scores, reasons, spend)
    if weight == 0:
        return StageScore(0.0, "no scorer gave a score", scores, reasons, spend)
    value = total / weight
    # The stage reason is the weakest scorer's, which is what an operator wants to see on a rejection.
    weakest = min(scores, key=lambda n: scores[n]) if scores else ""
    return StageScore(value, reasons.get(weakest, ""), scores, reasons, spend)
