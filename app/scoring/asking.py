"""Scorers that ask a model a question about the answer: ``judge`` (another upstream grades it) and
``self_verify`` (the stage's own model says whether it is correct). Their calls are paid for and show
up as ``scoring`` spend (``app.scoring.paid``)."""

from __future__ import annotations

import math
import re
from typing import Any

from app.config import JudgeScorer as JudgeConfig
from app.config import SelfVerifyScorer as SelfVerifyConfig
from app.errors import ScorerError
from app.protocol import prompt_text
from app.scoring import paid
from app.scoring.base import Score, ScoreContext
from app.upstream.client import Upstream

Json = dict[str, Any]

JUDGE_PROMPT = (
    "You are a strict grader. Below is a conversation and a candidate answer to its last message.\n"
    "Rate how correct, complete and helpful the answer is, from 1 (wrong or useless) to 10 (fully "
    "correct and helpful). Reply with the number only.\n\n"
    "### Conversation\n{question}\n\n### Candidate answer\n{answer}\n\n### Rating (1-10)"
)
VERIFY_PROMPT = (
    "{question}\n\nProposed answer:\n{answer}\n\nIs the proposed answer correct? Reply with Yes or No only."
)
_MAX_CHARS = 12_000
_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)(?:\s*/\s*(100|10)\b)?")


class ScorerCallError(ScorerError):
    """A scoring call answered, but not with a verdict (its cost is on the context's ledger)."""


def _render(template: str, request: Json, answer: str) -> str:
    question = prompt_text(request)[-_MAX_CHARS:]
    return template.replace("{question}", question).replace("{answer}", answer[-_MAX_CHARS:])


def _question(template: str, ctx: ScoreContext, *, max_tokens: int) -> Json:
    """The request that asks the question ``template`` about this answer, greedily and briefly."""
    content = _render(template, ctx.request, _answer_text(ctx))
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_tokens}


def _answer_text(ctx: ScoreContext) -> str:
    if ctx.answer.text:
        return ctx.answer.text
    calls = ctx.answer.message.get("tool_calls") or []
    return "\n".join(
        f"call {c.get('function', {}).get('name')}({c.get('function', {}).get('arguments')})" for c in calls
    )


def _content(reply: Json) -> str:
    try:
        c = reply["choices"][0]["message"].get("content")
    except (KeyError, IndexError, AttributeError, TypeError):
        return ""
    return c if isinstance(c, str) else ""


def parse_grade(text: str) -> float | None:
    """A 1-10 (or x/10, x/100, or 0-1 decimal) grade in free text -> [0, 1]; None when there is none."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    value = float(m.group(1))
    if m.group(2) == "100":
        return max(0.0, min(1.0, value / 100))
    if "." in m.group(1) and value <= 1.0 and m.group(2) is None:
        return value
    return max(0.0, min(1.0, (value - 1) / 9))


class _Asking:
    """A scorer that asks an upstream one question about the answer (``prompt``, or the default)."""

    default_prompt = ""

    def __init__(self, cfg: JudgeConfig | SelfVerifyConfig, asked: Upstream) -> None:
        self.cfg = cfg
        self._up = asked
        self._template = cfg.prompt or self.default_prompt


class Judge(_Asking):
    """Another upstream (``upstream``) grades the answer 1-10."""

    kind = "judge"
    default_prompt = JUDGE_PROMPT

    async def score(self, ctx: ScoreContext) -> Score:
        reply = await paid.complete(ctx, self._up, _question(self._template, ctx, max_tokens=8))
        text = _content(reply)
        grade = parse_grade(text)
        if grade is None:
            raise ScorerCallError("the judge gave no grade")
        return Score(grade, f"judge {self._up.name} rated {text.strip()[:20]}")


def yes_probability(reply: Json) -> float | None:
    """P(yes) / (P(yes) + P(no)) from the first token's top logprobs, or None without logprobs."""
    try:
        first = reply["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError):
        return None
    yes = no = 0.0
    candidates = first.get("top_logprobs") or [first]
    for t in candidates:
        tok = str(t.get("token", "")).strip().lower()
        lp = t.get("logprob")
        if not isinstance(lp, int | float):
            continue
        if tok in ("yes", "y", "true", "correct"):
            yes += math.exp(lp)
        elif tok in ("no", "n", "false", "incorrect"):
            no += math.exp(lp)
    if yes + no == 0:
        return None
    return yes / (yes + no)


class SelfVerify(_Asking):
    """The stage's own model says whether its answer is correct."""

    kind = "self_verify"
    default_prompt = VERIFY_PROMPT

    async def score(self, ctx: ScoreContext) -> Score:
        body = _question(self._template, ctx, max_tokens=2)
        if self._up.cfg.logprobs:
            body.update(logprobs=True, top_logprobs=5)
        reply = await paid.complete(ctx, self._up, body)
        p = yes_probability(reply)
        if p is not None:
            return Score(p, f"P(yes) = {p:.2f}")
        verdict = _content(reply).strip().lower()
        if verdict.startswith("yes"):
            return Score(1.0, "said yes")
        if verdict.startswith("no"):
            return Score(0.0, "said no")
        raise ScorerCallError("no yes/no verdict")
