"""What the trace store keeps of one request: pure functions from a finished ``Trace`` to rows.

Built off the request path (the store's writer thread), from a trace that no one changes any more.
Without ``store_text`` no prompt or answer text is kept; what labels need is kept text-free: the hash
of each answer's normalised form (``normalize_answer``: choice letter, final number or normalised text),
lengths, finish reasons, and every scorer's score and reason.

Labels say whether a stage's answer is as good as the last stage's (1.0) or not (0.0), decided as
``app.learning.labels`` defines it, or carry a user's raw 0..1 score. ``weight`` is the nominal inverse
sampling probability (1 for free labels, 1/shadow_rate for shadow labels), kept for reference: fits
weight by the realised share of requests that got a label (``app.learning.calibration``).

``TraceRow.sampling`` says what happened about labels for the request: for an answer accepted early,
the shadow draw (``not_drawn``, ``drawn``, or skipped: ``busy``, ``budget``, ``circuit_open``), then
its outcome (``labelled``, ``upstream_error``, ``no_answer``, ``no_label``); for an answer of the last
stage ``free`` (exact labels), ``judge`` (the judge is asked, then ``labelled`` or a skip reason) or
``no_label`` (free form and no judge); empty for failed requests and one-stage cascades.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.answers import canonical_answer, message_text, messages_to_prompt
from app.cascade.relay import StreamRelay
from app.cascade.trace import Attempt, Trace
from app.config import CascadeConfig, Config
from app.learning.labels import EXACT, JUDGE, verdict

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
    answer_hash: str | None  # hash of the canonical answer (``normalized``); None when there was no answer
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
    sampling: str = ""  # what happened about labels (module docstring)


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
        return message_text(reply.message(0)), reply.finish_reasons.get(0)
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
    """The form ``answer_hash`` hashes: the agreement rule's (``app.answers.canonical_answer``), so equal
    tool calls and JSON answers hash alike whatever their key order."""
    return canonical_answer(text, prompt)


@dataclass(slots=True)
class Built:
    """What one finished request leaves: its row, its free labels, and the earlier stages whose
    answers only the judge can label (``judge``: stage -> answer text, next to ``reference``)."""

    row: TraceRow
    labels: list[LabelRow]
    judge: dict[int, str] = field(default_factory=dict)
    reference: str = ""
    prompt: str = ""
    skipped: str = ""  # why the request got no free label although it reached the last stage


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
    compare: str = "auto",
    have_judge: bool = False,
    sampling: str = "",
) -> Built:
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
        sampling=sampling,
    )
    texts: dict[int, str] = {}
    for att in trace.attempts:
        got = answer_of(att.answer)
        norm = normalized(got[0], prompt) if got is not None else None
        if got is not None:
            texts[att.stage] = got[0]
        row.attempts.append(_attempt_row(att, got, norm, store_text))
    out = Built(row, [], prompt=prompt)
    last = n_stages - 1
    if not (ok and a is not None and a.stage == last and last > 0):
        return out
    if last not in texts:
        out.skipped = row.sampling = "no_answer"
        return out
    ref = out.reference = texts[last]
    skipped = ""
    for att in trace.attempts[:-1]:
        if att.stage in texts:
            v = verdict(compare, texts[att.stage], ref, prompt, have_judge=have_judge)
            if v.how == EXACT:
                assert v.value is not None
                detail = v.reason or EXACT
                out.labels.append(LabelRow(row.id, att.stage, "free", v.value, 1.0, created, 0.0, detail))
            elif v.how == JUDGE:
                out.judge[att.stage] = texts[att.stage]
            else:
                skipped = v.reason
        elif att.outcome == "error":
            out.labels.append(LabelRow(row.id, att.stage, "free", 0.0, 1.0, created, 0.0, "error"))
    if out.judge:
        row.sampling = "judge"
    elif out.labels:
        row.sampling = "free"
    else:
        row.sampling = "no_label"
        out.skipped = skipped or "no_label"
    return out


def attempt_row(att: Attempt, got: tuple[str, str | None] | None, text: bool, prompt: str = "") -> AttemptRow:
    """The stored row of an attempt (``got``: its answer's text and finish reason, when it has one)."""
    return _attempt_row(att, got, normalized(got[0], prompt) if got is not None else None, text)


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
