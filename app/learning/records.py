"""What the trace store keeps of one request: pure functions from a finished ``Trace`` to rows.

Built off the request path (the store's writer thread), from a trace that no one changes any more.
Without ``store_text`` no prompt or answer text is kept; what labels need is kept text-free: the hash
of each answer's normalised form (``normalize_answer``: choice letter, final number or normalised text),
lengths, finish reasons, and every scorer's score and reason.

Labels say whether a stage's answer is as good as the last stage's (1.0) or not (0.0), or carry a user's
0..1 score. ``weight`` is the inverse of the probability that the label was sampled: 1 for free labels
(every request that reached the last stage gets them), 1/shadow_rate for shadow labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.answers import message_text, messages_to_prompt, normalize_answer
from app.cascade.relay import StreamRelay
from app.cascade.trace import Attempt, Trace
from app.config import CascadeConfig, Config

Json = dict[str, Any]

SOURCES = ("free", "shadow", "user")


@dataclass(slots=True)
class AttemptRow:
    stage: int
    upstream: str
    outcome: str
    reason: str
    score: float | None
    threshold: float | None
    scores: str  # JSON object scorer -> score
    reasons: str  # JSON object scorer -> reason
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    finish_reason: str | None
    answer_hash: str | None  # hash of the normalised answer; None when there was no answer
    answer_chars: int
    answer_text: str | None  # only with store_text


@dataclass(slots=True)
class TraceRow:
    id: str  # the chat completion id the client got
    request_id: str
    cascade: str
    plan: str  # fingerprint of the cascade's stages (upstreams, models, scorers; not thresholds)
    fit_version: int  # the fitted thresholds in force (0: the config's)
    created: float
    ok: bool
    stream: bool
    n_stages: int
    accepted_stage: int | None
    cost_usd: float
    baseline_usd: float
    latency_ms: float
    prompt_hash: str
    prompt_chars: int
    prompt_text: str | None
    attempts: list[AttemptRow] = field(default_factory=list)


@dataclass(slots=True)
class LabelRow:
    trace_id: str
    stage: int | None  # None: the answer the client got (user feedback)
    source: str  # free | shadow | user
    value: float
    weight: float
    created: float
    cost_usd: float = 0.0  # what getting the label cost (the shadow call)
    detail: str = ""


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def answer_of(reply: Any) -> tuple[str, str | None] | None:
    """(text, finish_reason) of a stage's reply, or None when it has none. A tool-call answer's text is
    its calls as compact JSON (``features.message_text``), so two stages calling the same tool the same
    way agree, and scorers fitted from traces see what the learned scorer sees at serving time."""
    if isinstance(reply, StreamRelay):
        if reply.texts is None:
            return None
        return reply.text(0), reply.finish_reasons.get(0)
    if not isinstance(reply, Mapping):
        return None
    choices = reply.get("choices")
    if not choices or not isinstance(choices[0], Mapping):
        return None
    ch0 = choices[0]
    msg = ch0.get("message") or {}
    text = message_text(msg) if isinstance(msg, Mapping) else ""
    fr = ch0.get("finish_reason")
    return text, fr if isinstance(fr, str) else None


def prompt_of(request: Json | None) -> str:
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return ""
    return messages_to_prompt([m for m in messages if isinstance(m, dict)])


def normalized(text: str, prompt: str) -> str:
    return normalize_answer(text, prompt)


def build_rows(
    trace: Trace,
    ok: bool,
    seconds: float,
    *,
    n_stages: int,
    plan: str,
    fit_version: int,
    created: float,
    store_text: bool,
) -> tuple[TraceRow, list[LabelRow]]:
    """The trace row and its free labels (when the request reached the last stage with an answer)."""
    prompt = prompt_of(trace.request)
    a = trace.accepted
    row = TraceRow(
        id=trace.completion_id,
        request_id=trace.request_id,
        cascade=trace.cascade,
        plan=plan,
        fit_version=fit_version,
        created=created,
        ok=ok,
        stream=trace.stream,
        n_stages=n_stages,
        accepted_stage=a.stage if a is not None and ok else None,
        cost_usd=trace.cost_usd,
        baseline_usd=trace.baseline_usd,
        latency_ms=seconds * 1000.0,
        prompt_hash=_hash(prompt),
        prompt_chars=len(prompt),
        prompt_text=prompt if store_text else None,
    )
    norms: dict[int, str] = {}
    for att in trace.attempts:
        got = answer_of(att.answer)
        norm = normalized(got[0], prompt) if got is not None else None
        if norm is not None:
            norms[att.stage] = norm
        row.attempts.append(_attempt_row(att, got, norm, store_text))
    labels: list[LabelRow] = []
    last = n_stages - 1
    if ok and a is not None and a.stage == last and last > 0 and last in norms:
        ref = norms[last]
        for att in trace.attempts[:-1]:
            if att.stage in norms:
                same = norms[att.stage] == ref
                labels.append(
                    LabelRow(row.id, att.stage, "free", 1.0 if same else 0.0, 1.0, created, 0.0, "match")
                )
            elif att.outcome == "error":
                labels.append(LabelRow(row.id, att.stage, "free", 0.0, 1.0, created, 0.0, "error"))
    return row, labels


def _attempt_row(
    att: Attempt, got: tuple[str, str | None] | None, norm: str | None, text: bool
) -> AttemptRow:
    return AttemptRow(
        stage=att.stage,
        upstream=att.upstream,
        outcome=att.outcome,
        reason=att.reason,
        score=att.score,
        threshold=att.threshold,
        scores=json.dumps(att.scores, sort_keys=True),
        reasons=json.dumps(att.reasons, sort_keys=True),
        prompt_tokens=att.prompt_tokens,
        completion_tokens=att.completion_tokens,
        cost_usd=att.cost_usd,
        latency_ms=att.latency_ms,
        finish_reason=got[1] if got is not None else None,
        answer_hash=_hash(norm) if norm is not None else None,
        answer_chars=len(got[0]) if got is not None else 0,
        answer_text=got[0] if got is not None and text else None,
    )


def plan_fingerprint(config: Config, cascade: CascadeConfig) -> str:
    """What makes scores comparable between traces: the stages' upstreams, their models and scorers.
    Thresholds are left out (tuning moves them); so are prices (cost is recorded per trace)."""
    stages: Sequence[Json] = [
        {
            "upstream": s.upstream,
            "model": config.upstreams[s.upstream].model if s.upstream in config.upstreams else None,
            "scorers": [sc.model_dump(mode="json", by_alias=True) for sc in s.scorers],
        }
        for s in cascade.stages
    ]
    return _hash(json.dumps(stages, sort_keys=True))


def passthrough_fingerprint(config: Config, upstream: str) -> str:
    return _hash(json.dumps({"upstream": upstream, "model": config.upstreams[upstream].model}))
