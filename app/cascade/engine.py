"""The cascade engine: stages in order, score, decide, escalate; the attempt log. No fastapi here.

``Engine.run`` returns either a ``Completed`` answer (non-stream clients) or a ``Streamed`` one whose
``events`` yield the SSE bytes to send. Before it returns, nothing has been sent, so any failure can
still become a proper HTTP error status. The last stage of a streaming request streams straight
through: ``run`` returns as soon as its first chunk arrived, and the rest is relayed as it comes.
Every request ends in exactly one ``on_finish(trace, ok, seconds)`` call (metrics, log, trace store).

The stage loop lives here; its helpers each have a module: ``calls`` (asking a stage's upstream),
``accounting`` (what an attempt cost and how it ended), ``streams`` (the streamed answers and their
ownership), ``failures`` (one client error when no stage answered).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from app.cascade.accounting import account, charge_in_flight, record_failure, usage_of
from app.cascade.calls import EarlyAbort, ask_logprobs, collect_streamed
from app.cascade.failures import all_failed, summary
from app.cascade.plan import Plan, Stage
from app.cascade.relay import StreamRelay
from app.cascade.streams import Relayed, Replayed, Streamed
from app.cascade.trace import Attempt, Trace
from app.errors import DeadlineExceeded, ProxyError, UpstreamError, UpstreamProtocolError
from app.protocol import completion_to_chunks, include_usage, new_id, shape_completion, wants_logprobs
from app.scoring.base import Answer, ScoreContext, score_stage

Json = dict[str, Any]
FinishHook = Callable[[Trace, bool, float], None]
log = logging.getLogger("cascade.engine")


@dataclass(slots=True)
class Completed:
    body: Json
    trace: Trace


class Engine:
    def __init__(
        self, on_finish: FinishHook, *, on_first_byte: Callable[[str, float], None] | None = None
    ) -> None:
        self._on_finish = on_finish
        self._on_first_byte = on_first_byte
        # Keep the streamed last stage's text on its attempt (the trace store labels from it).
        self.keep_text = False

    async def run(self, plan: Plan, body: Json, *, request_id: str, stream: bool) -> Completed | Streamed:
        started = time.perf_counter()
        trace = Trace(plan.name, request_id, new_id(), stream, plan.final.upstream.cfg.price, started=started)
        trace.request = body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + plan.deadline_s
        try:
            async with asyncio.timeout_at(deadline):
                result = await self._stages(plan, body, trace, stream, deadline)
        except TimeoutError as exc:
            self._deadline_passed(trace, plan)
            charge_in_flight(trace, plan, body)
            served = self._fallback(plan, trace, body, stream)
            if served is not None:
                return served
            self.finish(trace, False)
            raise DeadlineExceeded(
                f"The cascade deadline of {plan.deadline_s:g}s passed. {summary(trace)}"
            ) from exc
        except ProxyError:
            self.finish(trace, False)
            raise
        except BaseException:
            # Cancelled (client gone, shutdown) or a bug: account for what was spent, then propagate.
            charge_in_flight(trace, plan, body)
            self.finish(trace, False)
            raise
        return result

    # --- the stage loop --------------------------------------------------------------------------------

    async def _stages(
        self, plan: Plan, body: Json, trace: Trace, stream: bool, deadline: float
    ) -> Completed | Streamed:
        previous: list[Answer] = []
        last = len(plan.stages) - 1
        thresholds = list(plan.thresholds)
        start = plan.first_stage(body) if plan.router is not None else 0
        trace.routed = start > 0
        for stage in plan.stages[start:]:
            final = stage.index == last
            att = Attempt(stage.index, stage.upstream.name, threshold=thresholds[stage.index])
            trace.attempts.append(att)
            t0 = time.perf_counter()
            skip = stage.upstream.blocked()
            if skip is not None:
                att.outcome, att.reason, att.detail = "error", "upstream_error", skip
                att.error_kind, att.retry_after = "circuit_open", stage.upstream.breaker.retry_after()
                if not final:
                    att.escalation_reason = "upstream_error"
                continue
            # A stage that cannot fit in what is left of the deadline is not started (and not paid for).
            left = deadline - asyncio.get_running_loop().time()
            need = stage.upstream.cfg.min_budget_s
            if left < need:
                att.outcome, att.reason, att.error_kind = "error", "timeout", "deadline"
                att.detail = f"not started: {max(left, 0.0):.2f}s of the deadline left, needs {need:g}s"
                # The deadline ends the cascade here as surely as if it had passed mid-stage: same fallback.
                served = self._fallback(plan, trace, body, stream)
                if served is not None:
                    return served
                raise DeadlineExceeded(
                    f"The cascade deadline of {plan.deadline_s:g}s cannot fit stage {stage.index}. "
                    f"{summary(trace)}"
                )
            att.sent = True
            if final and stream:
                try:
                    return await self._open_stream(stage, body, trace, att, t0, deadline)
                except UpstreamError as err:
                    record_failure(att, err, t0, body, final=True)
                    break
            up = stage.upstream
            try:
                if stage.early_abort and not final:
                    completion = await collect_streamed(stage, body)
                else:
                    req = ask_logprobs(stage, body, up.prepare(body, stream=False))
                    completion = (await up.complete(req)).body
            except UpstreamError as err:
                record_failure(att, err, t0, body, final)
                continue
            except EarlyAbort as abort:
                att.latency_ms = (time.perf_counter() - t0) * 1000
                account(att, stage, body, abort.partial)
                att.outcome, att.reason, att.detail = "rejected", "early_abort", abort.reason
                att.score, att.escalation_reason = 0.0, "early_abort"
                continue
            att.latency_ms = (time.perf_counter() - t0) * 1000
            account(att, stage, body, completion)
            if final:
                return self._accept(att, trace, body, completion, stream, reason="last stage")
            choices = completion["choices"]
            ch0 = choices[0]
            answer = Answer(
                ch0.get("message") or {}, ch0.get("finish_reason"), completion, up.name, stage.index
            )
            threshold = att.threshold if att.threshold is not None else 0.0
            # The attempt's scoring spend is the scorers' ledger: calls in flight when the request
            # ends (deadline, client gone) are on it already, at their estimated prompt cost.
            ctx = ScoreContext(plan.name, stage.index, body, answer, tuple(previous), att.scoring)
            verdict = await score_stage(stage.scorers, ctx, threshold)
            att.score = verdict.value
            att.scores = verdict.scores
            att.reasons = verdict.reasons
            if verdict.value >= threshold:
                return self._accept(
                    att, trace, body, completion, stream, reason=verdict.reason or "score >= threshold"
                )
            att.outcome = "rejected"
            att.escalation_reason = "low_score"
            att.reason = "low_score"
            att.detail = verdict.reason
            previous.append(answer)
        served = self._fallback(plan, trace, body, stream)
        if served is not None:
            return served
        raise all_failed(trace)

    def _fallback(self, plan: Plan, trace: Trace, body: Json, stream: bool) -> Completed | Streamed | None:
        """``fallback: best_rejected``: the last stage failed, so serve the highest-scored answer an
        earlier stage gave (the later stage on a tie), marked as a fallback; None when there is none."""
        if plan.fallback != "best_rejected":
            return None
        best: Attempt | None = None
        for a in trace.attempts:
            usable = a.outcome == "rejected" and a.reason == "low_score" and isinstance(a.answer, dict)
            if usable and (best is None or (a.score or 0.0) >= (best.score or 0.0)):
                best = a
        if best is None:
            return None
        trace.fallback = "best_rejected"
        score = f"{best.score:.2f}" if best.score is not None else "none"
        why = f"fallback: the last stage failed; the best earlier answer (score {score})"
        return self._accept(best, trace, body, best.answer, stream, reason=why)

    def _accept(
        self, att: Attempt, trace: Trace, body: Json, completion: Json, stream: bool, *, reason: str
    ) -> Completed | Streamed:
        att.outcome = "accepted"
        att.reason = "accepted"
        att.detail = reason
        trace.accepted = trace.serving = att
        keep_lp = wants_logprobs(body)
        shape_completion(
            completion,
            completion_id=trace.completion_id,
            fallback_model=_model_of(trace, completion),
            keep_logprobs=keep_lp,
        )
        if att.usage_estimated or not isinstance(completion.get("usage"), dict):
            completion["usage"] = usage_of(att)
        completion["cascade"] = trace.extension()
        if not stream:
            self.finish(trace, True)
            return Completed(completion, trace)
        chunks = completion_to_chunks(completion, with_usage=include_usage(body), keep_logprobs=keep_lp)
        chunks[-1]["cascade"] = completion["cascade"]
        replay = Replayed(self, trace, chunks)
        return Streamed(trace, replay)

    # --- the streamed last stage -------------------------------------------------------------------------

    async def _open_stream(
        self, stage: Stage, body: Json, trace: Trace, att: Attempt, t0: float, deadline: float
    ) -> Streamed:
        up = stage.upstream
        stack = AsyncExitStack()
        try:
            chunks = await stack.enter_async_context(up.stream(up.prepare(body, stream=True)))
            first = await chunks.batch()
            if not first:
                raise UpstreamProtocolError(up.name, "stream ended before any chunk")
        except BaseException:
            await stack.aclose()
            raise
        # From here the open stream belongs to the ``Relayed`` (and, through the ``Streamed``, to the
        # caller): its ``end`` closes it, whether or not the events ever start.
        trace.serving = att
        relay = StreamRelay(
            trace.completion_id,
            keep_logprobs=wants_logprobs(body),
            with_usage=include_usage(body),
            fallback_model=up.cfg.model,
        )
        if self.keep_text:
            relay.keep_text()
        run = Relayed(self, stage, body, trace, att, t0, deadline, stack, chunks, first, relay)
        return Streamed(trace, run)

    # --- endings -------------------------------------------------------------------------------------------

    def first_byte(self, trace: Trace) -> None:
        if self._on_first_byte is not None:
            self._on_first_byte(trace.cascade, time.perf_counter() - trace.started)

    def finish(self, trace: Trace, ok: bool) -> None:
        try:
            self._on_finish(trace, ok, time.perf_counter() - trace.started)
        except Exception:  # accounting must never turn a served answer into an error
            log.exception("recording a finished request failed")

    def _deadline_passed(self, trace: Trace, plan: Plan) -> None:
        if trace.attempts and trace.attempts[-1].outcome == "error" and not trace.attempts[-1].reason:
            a = trace.attempts[-1]
            a.reason, a.error_kind, a.detail = "timeout", "timeout", "cancelled at the cascade deadline"


# --- helpers --------------------------------------------------------------------------------------------


def _model_of(trace: Trace, completion: Json) -> str:
    m = completion.get("model")
    return m if isinstance(m, str) and m else trace.cascade
