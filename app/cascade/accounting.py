"""What an attempt cost and how it ended: tokens and USD from the upstream's usage (estimated when it
reports none, or none that is plausible), the charge for a call cut off in flight, and an upstream
failure recorded on its attempt (its message withheld when it quotes the request)."""

from __future__ import annotations

import time
from typing import Any

from app.cascade.plan import Plan, Stage
from app.cascade.relay import StreamRelay
from app.cascade.trace import Attempt, Trace
from app.errors import UpstreamError, UpstreamStatusError
from app.protocol import estimate_prompt_tokens, estimate_tokens, token_count, withhold_quotes
from app.upstream.client import price_usd

Json = dict[str, Any]


def usage_of(att: Attempt) -> Json:
    return {
        "prompt_tokens": att.prompt_tokens,
        "completion_tokens": att.completion_tokens,
        "total_tokens": att.prompt_tokens + att.completion_tokens,
    }


def charge_in_flight(trace: Trace, plan: Plan, body: Json) -> None:
    """The request ended (client gone, deadline) while calls were in flight (one, or two when a stage
    was hedged): the upstream has read the prompt and bills it, so charge the estimated prompt tokens
    (flagged as estimated), as a stream cut short is charged for what it generated. An attempt that
    already failed on its own (an error reply) or was accounted is left alone."""
    for a in trace.attempts:
        if not a.sent or a.outcome != "error" or a.prompt_tokens or a.completion_tokens:
            continue
        if a.reason not in ("", "timeout") or a.error_kind not in (None, "timeout"):
            continue
        a.usage_estimated = True
        a.prompt_tokens = estimate_prompt_tokens(body)
        a.answer_cost_usd = price_usd(plan.stages[a.stage].upstream.cfg.price, a.prompt_tokens, 0, None)


def cancel_in_flight(trace: Trace) -> None:
    """The client left while calls were in flight: they end as ``cancelled`` (``client_disconnected``),
    not as upstream errors, and so does the request."""
    trace.cancelled = True
    for a in trace.attempts:
        if a.outcome == "error" and not a.reason:  # not settled: the call was still on
            a.outcome, a.reason, a.detail = "cancelled", "client_disconnected", "the request ended first"


def charge_cancelled(att: Attempt, stage: Stage, body: Json, partial: Json | None) -> None:
    """A call the cascade cancelled (a hedge race made it unneeded): charged what it generated,
    ``partial`` (what had arrived; its usage when complete), or else its estimated prompt."""
    if partial is not None and partial.get("choices"):
        account(att, stage, body, partial)
        att.answer = None  # not an answer of the cascade: the trace store must not label from it
        return
    att.usage_estimated = True
    att.prompt_tokens = estimate_prompt_tokens(body)
    att.answer_cost_usd = price_usd(stage.upstream.cfg.price, att.prompt_tokens, 0, None)


def account(att: Attempt, stage: Stage, body: Json, completion: Json) -> None:
    att.answer = completion
    usage = completion.get("usage")
    pt = ct = None
    if isinstance(usage, dict):
        pt, ct = token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
    if pt is not None and ct is not None:
        att.prompt_tokens, att.completion_tokens = pt, ct
    else:
        att.usage_estimated = True
        att.prompt_tokens = estimate_prompt_tokens(body)
        chars = 0
        for ch in completion.get("choices") or ():
            msg = ch.get("message") or {}
            c = msg.get("content")
            chars += len(c) if isinstance(c, str) else 0
            for tc in msg.get("tool_calls") or ():
                chars += len(str((tc.get("function") or {}).get("arguments") or ""))
        att.completion_tokens = estimate_tokens("x" * chars) if chars else 0
    reported = usage.get("cost") if isinstance(usage, dict) else None
    att.answer_cost_usd = price_usd(
        stage.upstream.cfg.price, att.prompt_tokens, att.completion_tokens, reported
    )


def account_stream(att: Attempt, stage: Stage, body: Json, relay: StreamRelay) -> Json:
    att.answer = relay
    usage = relay.usage
    pt = token_count(usage.get("prompt_tokens")) if usage else None
    ct = token_count(usage.get("completion_tokens")) if usage else None
    if pt is not None and ct is not None:
        att.prompt_tokens, att.completion_tokens = pt, ct
    else:
        att.usage_estimated = True
        att.prompt_tokens = estimate_prompt_tokens(body)
        att.completion_tokens = (relay.text_chars + 3) // 4
    reported = usage.get("cost") if usage else None
    att.answer_cost_usd = price_usd(
        stage.upstream.cfg.price, att.prompt_tokens, att.completion_tokens, reported
    )
    if att.usage_estimated or usage is None:
        return usage_of(att)
    # The upstream's own usage, details (cached, reasoning tokens) and reported cost included.
    return {**usage, **usage_of(att)}


def record_failure(att: Attempt, err: UpstreamError, t0: float, body: Json, final: bool) -> None:
    att.outcome = "error"
    att.reason = err.reason
    att.error_kind = err.kind
    # Upstream messages may quote the request (vLLM's validation errors do): never pass a prompt on.
    if isinstance(err, UpstreamStatusError):
        att.detail = f"HTTP {err.status}: {withhold_quotes(err.upstream_message, body)}"
    else:
        att.detail = withhold_quotes(err.detail, body)
    att.latency_ms = (time.perf_counter() - t0) * 1000
    if isinstance(err, UpstreamStatusError):
        att.status = err.status
        att.retry_after = err.retry_after
    if not final:
        att.escalation_reason = err.reason
