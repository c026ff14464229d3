"""The cascade engine: stages in order, score, decide, escalate; the attempt log. No fastapi here.

``Engine.run`` returns either a ``Completed`` answer (non-stream clients) or a ``Streamed`` one whose
``events`` yield the SSE bytes to send. Before it returns, nothing has been sent, so any failure can
still become a proper HTTP error status. The last stage of a streaming request streams straight
through: ``run`` returns as soon as its first chunk arrived, and the rest is relayed as it comes.
Every request ends in exactly one ``on_finish(trace, ok, seconds)`` call (metrics, log, trace store).

The stage loop lives here; its helpers each have a module: ``calls`` (asking a stage's upstream),
``hedge`` (a stage raced by the next one), ``control`` (a request's window of stages), ``accounting``
(what an attempt cost and how it ended), ``streams`` (the streamed answers and their ownership),
``failures`` (one client error when no stage answered).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.cascade.accounting import account, cancel_in_flight, charge_in_flight, record_failure, usage_of
from app.cascade.assemble import Assembler
from app.cascade.calls import EarlyAbort, Opened, ask_logprobs, collect_streamed, open_stream
from app.cascade.control import Window
from app.cascade.failures import all_failed, summary
from app.cascade.hedge import Call, Race, abandon, discard, outcome, race, start, wait
from app.cascade.plan import Plan, Stage
from app.cascade.relay import StreamRelay
from app.cascade.streams import Relayed, Replayed, Streamed
from app.cascade.trace import Attempt, Trace, client_left
from app.errors import CascadeBaseError, DeadlineExceeded, ProxyError, UpstreamError
from app.protocol import completion_to_chunks, include_usage, new_id, shape_completion, wants_logprobs
from app.scoring.base import Answer, ScoreContext, score_stage

Json = dict[str, Any]
FinishHook = Callable[[Trace, bool, float], None]
log = logging.getLogger("cascade.engine")


@dataclass(slots=True)
class Completed:
    body: Json
    trace: Trace


E = TypeVar("E", bound=BaseException)


def _detached(exc: E) -> E:
    """``exc`` without its traceback and chain: kept in a local of the frame its traceback runs through,
    it made a reference cycle holding every frame of the failed call (the request body, its serialised
    payload, the reply) until a full garbage collection, which a tuned collector rarely runs: 100 failed
    1 MB requests held 320 MB. What a failure needs later is on the exception itself."""
    exc.__traceback__ = None
    exc.__cause__ = exc.__context__ = None
    return exc


class Engine:
    def __init__(
        self, on_finish: FinishHook, *, on_first_byte: Callable[[str, float], None] | None = None
    ) -> None:
        self._on_finish = on_finish
        self._on_first_byte = on_first_byte
        # Keep the streamed last stage's text on its attempt (the trace store labels from it).
        self.keep_text = False

    async def run(
        self,
        plan: Plan,
        body: Json,
        *,
        request_id: str,
        stream: bool,
        window: Window | None = None,
        key: str | None = None,
    ) -> Completed | Streamed:
        """Run ``body`` through ``plan``: every stage, or ``window``'s (per-request control)."""
        started = time.perf_counter()
        trace = Trace(plan.name, request_id, new_id(), stream, plan.final.upstream.cfg.price, started=started)
        trace.request = body
        trace.key = key
        trace.final_stage = plan.final.index
        trace.final_latency = plan.final.upstream.latency
        loop = asyncio.get_running_loop()
        deadline = loop.time() + plan.deadline_s
        calls: list[Call] = []  # stages running as tasks (hedging); stopped when the request ends
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    result = await self._stages(plan, body, trace, stream, deadline, window, calls)
                finally:
                    if calls:
                        await abandon(calls, body)
        except _NoTime as late:
            # The deadline ends the cascade before a stage as surely as if it had passed mid-stage.
            served = self._fallback(plan, trace, body, stream)
            if served is not None:
                return served
            self.finish(trace, False)
            raise DeadlineExceeded(f"{late} {summary(trace)}") from None
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
        except BaseException as exc:
            # Cancelled (client gone, shutdown) or a bug: account for what was spent, then propagate.
            charge_in_flight(trace, plan, body)
            if client_left(exc):
                cancel_in_flight(trace)
            self.finish(trace, False)
            raise
        return result

    # --- the stage loop --------------------------------------------------------------------------------

    async def _stages(
        self,
        plan: Plan,
        body: Json,
        trace: Trace,
        stream: bool,
        deadline: float,
        window: Window | None,
        calls: list[Call],
    ) -> Completed | Streamed:
        last = len(plan.stages) - 1 if window is None else window.last
        if window is not None and window.first > 0:
            start = window.first
        elif plan.router is not None and last == len(plan.stages) - 1:
            start = plan.first_stage(body)
            trace.routed = start > 0
        else:
            start = 0
        previous: list[Answer] = []
        thresholds = list(plan.thresholds)
        hedge: Call | None = None  # the next stage, started early beside a slow one
        for stage in plan.stages[start : last + 1]:
            final = stage.index == last
            call: Call | None = None
            if hedge is not None and hedge.stage is stage:
                call, hedge = hedge, None
                att, t0 = call.att, call.t0
                att.hedge = "won"  # the cascade went on to the stage it had started early
            else:
                att = self._attempt(stage, trace, thresholds, final)
                t0 = time.perf_counter()
                if not self._admit(plan, stage, att, final, deadline):
                    continue
            if call is None and not final and stage.hedge_after is not None:
                delay = stage.hedge_delay()
                if delay is not None:
                    r = Race(plan, body, trace, thresholds, last, stream, deadline, calls)
                    call, hedge = await self._hedged(r, stage, att, delay)
                    if call is None:
                        continue  # the hedge answered first: this stage was cancelled
            res: Json | Opened | UpstreamError | EarlyAbort
            if call is not None:
                res = await outcome(call)
                t0 = call.t0
            else:  # the common case, spelled out (no task, no extra coroutine): the hot path
                try:
                    if final and stream and (stage.stream_tools or not body.get("tools")):
                        res = await open_stream(stage, body)
                    elif stage.early_abort and not final and (stage.stream_tools or not body.get("tools")):
                        res = await collect_streamed(stage, body)
                    else:
                        up = stage.upstream
                        res = (
                            await up.complete(ask_logprobs(stage, body, up.prepare(body, stream=False)))
                        ).body
                except (UpstreamError, EarlyAbort) as exc:
                    res = _detached(exc)
            if isinstance(res, UpstreamError):
                record_failure(att, res, t0, body, final)
                if final and stream:
                    break
                continue
            if isinstance(res, EarlyAbort):
                att.latency_ms = (time.perf_counter() - t0) * 1000
                account(att, stage, body, res.partial)
                att.outcome, att.reason, att.detail = "rejected", "early_abort", res.reason
                att.score, att.escalation_reason = 0.0, "early_abort"
                continue
            if isinstance(res, Opened):
                return self._relay(stage, body, trace, att, t0, deadline, res)
            completion = res
            att.latency_ms = (time.perf_counter() - t0) * 1000
            account(att, stage, body, completion)
            stage.upstream.latency.observe(att.latency_ms / 1000, att.completion_tokens)
            if final:
                return self._accept(att, trace, body, completion, stream, reason="last stage")
            choices = completion["choices"]
            ch0 = choices[0]
            up = stage.upstream
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
                if hedge is not None:
                    hedge.att.hedge = "lost"
                    await discard(hedge, body, "hedge_lost", f"stage {stage.index} answered and was accepted")
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

    def _attempt(self, stage: Stage, trace: Trace, thresholds: list[float | None], final: bool) -> Attempt:
        att = Attempt(stage.index, stage.upstream.name, threshold=None if final else thresholds[stage.index])
        trace.attempts.append(att)
        return att

    def _admit(self, plan: Plan, stage: Stage, att: Attempt, final: bool, deadline: float) -> bool:
        """Whether the stage may be called now: False (recorded on its attempt) when its circuit is
        open; DeadlineExceeded (or the fallback, through ``_NoTime``) when it cannot fit in what is left
        of the deadline (not started, not paid for)."""
        skip = stage.upstream.blocked()
        if skip is not None:
            att.outcome, att.reason, att.detail = "error", "upstream_error", skip
            att.error_kind, att.retry_after = "circuit_open", stage.upstream.breaker.retry_after()
            if not final:
                att.escalation_reason = "upstream_error"
            return False
        left = deadline - asyncio.get_running_loop().time()
        need = stage.upstream.cfg.min_budget_s
        if left < need:
            att.outcome, att.reason, att.error_kind = "error", "timeout", "deadline"
            att.detail = f"not started: {max(left, 0.0):.2f}s of the deadline left, needs {need:g}s"
            raise _NoTime(f"The cascade deadline of {plan.deadline_s:g}s cannot fit stage {stage.index}.")
        att.sent = True
        return True

    async def _ask(
        self, stage: Stage, body: Json, final: bool, stream: bool, asm: Assembler | None
    ) -> Json | Opened:
        """One call to the stage's upstream: the streamed last stage opened, or a whole answer."""
        if final and stream and (stage.stream_tools or not body.get("tools")):
            return await open_stream(stage, body)
        if asm is not None or (stage.early_abort and not final):
            return await collect_streamed(stage, body, asm)
        up = stage.upstream
        req = ask_logprobs(stage, body, up.prepare(body, stream=False))
        return (await up.complete(req)).body

    async def _hedged(
        self, r: Race, stage: Stage, att: Attempt, delay: float
    ) -> tuple[Call | None, Call | None]:
        """Run ``stage`` as a task; when it has not answered after ``delay``, start the next stage
        beside it. Returns (this stage's call, the hedge): this stage's is None when the hedge
        answered first and it was cancelled; the hedge is None when none was started."""
        asm = Assembler()
        call = start(stage, att, self._ask(stage, r.body, False, r.stream, asm), asm)
        r.calls.append(call)
        if await wait(call, delay):
            return call, None
        nxt = r.plan.stages[stage.index + 1]
        # No hedge on an upstream that would refuse the call now, or that cannot fit the deadline.
        left = r.deadline - asyncio.get_running_loop().time()
        if nxt.upstream.breaker.blocked() is not None or left < nxt.upstream.cfg.min_budget_s:
            return call, None
        final = nxt.index == r.last
        hatt = self._attempt(nxt, r.trace, r.thresholds, final)
        hatt.sent = True
        r.trace.hedged = True
        hasm = None if final and r.stream else Assembler()
        hedge = start(nxt, hatt, self._ask(nxt, r.body, final, r.stream, hasm), hasm)
        r.calls.append(hedge)
        await race(call, hedge)
        if not call.task.done() and hedge.answered():
            # The hedge answered while this stage still had not: the cascade moves on to it.
            await discard(call, r.body, "hedge", f"stage {nxt.index} (hedge) answered first")
            att.escalation_reason = "hedge"
            return None, hedge
        return call, hedge

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

    def _relay(
        self, stage: Stage, body: Json, trace: Trace, att: Attempt, t0: float, deadline: float, opened: Opened
    ) -> Streamed:
        # From here the open stream belongs to the ``Relayed`` (and, through the ``Streamed``, to the
        # caller): its ``end`` closes it, whether or not the events ever start.
        up = stage.upstream
        trace.serving = att
        trace.relay_latency = up.latency
        relay = StreamRelay(
            trace.completion_id,
            keep_logprobs=wants_logprobs(body),
            with_usage=include_usage(body),
            fallback_model=up.cfg.model,
        )
        if self.keep_text:
            relay.keep_text()
        run = Relayed(
            self, stage, body, trace, att, t0, deadline, opened.stack, opened.chunks, opened.first, relay
        )
        return Streamed(trace, run)

    # --- endings -------------------------------------------------------------------------------------------

    def first_byte(self, trace: Trace) -> None:
        if self._on_first_byte is not None:
            self._on_first_byte(trace.cascade, time.perf_counter() - trace.started)

    def finish(self, trace: Trace, ok: bool) -> None:
        a = trace.serving
        if trace.relay_latency is not None and a is not None and a.outcome == "accepted":
            trace.relay_latency.observe(a.latency_ms / 1000, a.completion_tokens)
        try:
            self._on_finish(trace, ok, time.perf_counter() - trace.started)
        except Exception:  # accounting must never turn a served answer into an error
            log.exception("recording a finished request failed")

    def _deadline_passed(self, trace: Trace, plan: Plan) -> None:
        for a in trace.attempts:  # the call in flight (two when a stage was hedged)
            if a.outcome == "error" and not a.reason:
                a.reason, a.error_kind, a.detail = "timeout", "timeout", "cancelled at the cascade deadline"


# --- helpers --------------------------------------------------------------------------------------------


class _NoTime(CascadeBaseError):
    """A stage cannot fit in what is left of the deadline (becomes DeadlineExceeded or the fallback)."""


def _model_of(trace: Trace, completion: Json) -> str:
    m = completion.get("model")
    return m if isinstance(m, str) and m else trace.cascade
