"""The cascade engine: stages in order, score, decide, escalate; the attempt log. No fastapi here.

``Engine.run`` returns either a ``Completed`` answer (non-stream clients) or a ``Streamed`` one whose
``events`` yield the SSE bytes to send. Before it returns, nothing has been sent, so any failure can
still become a proper HTTP error status. The last stage of a streaming request streams straight
through: ``run`` returns as soon as its first chunk arrived, and the rest is relayed as it comes.
Every request ends in exactly one ``on_finish(trace, ok, seconds)`` call (metrics, log, trace store).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import orjson

from app.cascade.assemble import Assembler
from app.cascade.plan import Plan, Stage
from app.cascade.relay import StreamRelay
from app.cascade.trace import Attempt, Trace
from app.errors import (
    AllStagesFailed,
    CascadeBaseError,
    DeadlineExceeded,
    InvalidRequest,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
)
from app.protocol import (
    completion_to_chunks,
    estimate_prompt_tokens,
    estimate_tokens,
    include_usage,
    new_id,
    shape_completion,
    token_count,
    wants_logprobs,
    withhold_quotes,
)
from app.scoring.base import Answer, ScoreContext, score_stage
from app.upstream.client import price_usd
from app.upstream.sse import DONE, encode

Json = dict[str, Any]
FinishHook = Callable[[Trace, bool, float], None]
log = logging.getLogger("cascade.engine")

_CLIENT_4XX = frozenset({400, 404, 413, 422})


@dataclass(slots=True)
class Completed:
    body: Json
    trace: Trace


class Streamed:
    """A streamed answer, and who owns it. ``events`` yields the SSE bytes to send. Whoever gets this from
    ``Engine.run`` calls ``aclose()`` when done with it, however that went (sent in full, client gone,
    or never started because building the response failed): that closes the upstream stream and
    records the request, exactly once. When the events ran, their own clean-up did it already."""

    __slots__ = ("_end", "events", "trace")

    def __init__(
        self, trace: Trace, events: AsyncGenerator[bytes, None], end: Callable[[bool], Awaitable[None]]
    ) -> None:
        self.trace = trace
        self.events = events
        self._end = end

    async def aclose(self) -> None:
        await self.events.aclose()
        await self._end(False)


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
            _charge_in_flight(trace, plan, body)
            served = self._fallback(plan, trace, body, stream)
            if served is not None:
                return served
            self._finish(trace, False)
            raise DeadlineExceeded(
                f"The cascade deadline of {plan.deadline_s:g}s passed. {_summary(trace)}"
            ) from exc
        except ProxyError:
            self._finish(trace, False)
            raise
        except BaseException:
            # Cancelled (client gone, shutdown) or a bug: account for what was spent, then propagate.
            _charge_in_flight(trace, plan, body)
            self._finish(trace, False)
            raise
        return result

    # --- the stage loop --------------------------------------------------------------------------------

    async def _stages(
        self, plan: Plan, body: Json, trace: Trace, stream: bool, deadline: float
    ) -> Completed | Streamed:
        previous: list[Answer] = []
        last = len(plan.stages) - 1
        thresholds = list(plan.thresholds)
        for stage in plan.stages:
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
                    f"{_summary(trace)}"
                )
            att.sent = True
            if final and stream:
                try:
                    return await self._open_stream(stage, body, trace, att, t0, deadline)
                except UpstreamError as err:
                    _failed(att, err, t0, body, final=True)
                    break
            up = stage.upstream
            try:
                if stage.early_abort and not final:
                    completion = await _collect_streamed(stage, body)
                else:
                    req = _ask_logprobs(stage, body, up.prepare(body, stream=False))
                    completion = (await up.complete(req)).body
            except UpstreamError as err:
                _failed(att, err, t0, body, final)
                continue
            except _EarlyAbort as abort:
                att.latency_ms = (time.perf_counter() - t0) * 1000
                _account(att, stage, body, abort.partial)
                att.outcome, att.reason, att.detail = "rejected", "early_abort", abort.reason
                att.score, att.escalation_reason = 0.0, "early_abort"
                continue
            att.latency_ms = (time.perf_counter() - t0) * 1000
            _account(att, stage, body, completion)
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
        raise _all_failed(trace)

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
            completion["usage"] = _usage(att)
        completion["cascade"] = trace.extension()
        if not stream:
            self._finish(trace, True)
            return Completed(completion, trace)
        chunks = completion_to_chunks(completion, with_usage=include_usage(body), keep_logprobs=keep_lp)
        chunks[-1]["cascade"] = completion["cascade"]
        replay = _Replayed(self, trace, chunks)
        return Streamed(trace, replay.events(), replay.end)

    # --- the streamed last stage -------------------------------------------------------------------------

    async def _open_stream(
        self, stage: Stage, body: Json, trace: Trace, att: Attempt, t0: float, deadline: float
    ) -> Streamed:
        up = stage.upstream
        stack = AsyncExitStack()
        try:
            chunks = await stack.enter_async_context(up.stream(up.prepare(body, stream=True)))
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                raise UpstreamProtocolError(up.name, "stream ended before any chunk") from None
        except BaseException:
            await stack.aclose()
            raise
        # From here the open stream belongs to the ``_Relayed`` (and, through the ``Streamed``, to the
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
        run = _Relayed(self, stage, body, trace, att, t0, deadline, stack, chunks, first, relay)
        return Streamed(trace, run.events(), run.end)

    # --- endings -------------------------------------------------------------------------------------------

    def _first_byte(self, trace: Trace) -> None:
        if self._on_first_byte is not None:
            self._on_first_byte(trace.cascade, time.perf_counter() - trace.started)

    def _finish(self, trace: Trace, ok: bool) -> None:
        try:
            self._on_finish(trace, ok, time.perf_counter() - trace.started)
        except Exception:  # accounting must never turn a served answer into an error
            log.exception("recording a finished request failed")

    def _deadline_passed(self, trace: Trace, plan: Plan) -> None:
        if trace.attempts and trace.attempts[-1].outcome == "error" and not trace.attempts[-1].reason:
            a = trace.attempts[-1]
            a.reason, a.error_kind, a.detail = "timeout", "timeout", "cancelled at the cascade deadline"


# --- helpers --------------------------------------------------------------------------------------------


def _ask_logprobs(stage: Stage, body: Json, req: Json) -> Json:
    """Ask the upstream for token logprobs when a scorer of this stage needs them (the reply strips them
    unless the client asked). ``top_logprobs: 1`` too: llama.cpp's server returns no logprobs without it."""
    if stage.needs_logprobs and body.get("logprobs") is not True:
        req["logprobs"] = True
        if "top_logprobs" not in body:
            req["top_logprobs"] = 1
    return req


class _EarlyAbort(CascadeBaseError):
    def __init__(self, reason: str, partial: Json) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


async def _collect_streamed(stage: Stage, body: Json) -> Json:
    """Stream a scored stage upstream, checking the growing answer; return the whole completion, or
    raise _EarlyAbort (leaving the stream closes the connection, which stops the upstream)."""
    up = stage.upstream
    req = _ask_logprobs(stage, body, up.prepare(body, stream=True))
    asm = Assembler()
    seen = 0
    async with up.stream(req) as chunks:
        async for chunk in chunks:
            asm.add(chunk)
            text = asm.text(0)
            if len(text) == seen:
                continue
            seen = len(text)
            for check in stage.stream_checks:
                why = check.check_partial(body, text)
                if why is not None:
                    partial = asm.completion()
                    partial.pop("usage", None)  # whatever was reported so far is not the final count
                    raise _EarlyAbort(why, partial)
    return asm.completion()


def _model_of(trace: Trace, completion: Json) -> str:
    m = completion.get("model")
    return m if isinstance(m, str) and m else trace.cascade


def _usage(att: Attempt) -> Json:
    return {
        "prompt_tokens": att.prompt_tokens,
        "completion_tokens": att.completion_tokens,
        "total_tokens": att.prompt_tokens + att.completion_tokens,
    }


def _charge_in_flight(trace: Trace, plan: Plan, body: Json) -> None:
    """The request ended (client gone, deadline) while a non-stream call was in flight: the upstream has
    read the prompt and bills it, so charge the estimated prompt tokens (flagged as estimated), as a
    stream cut short is charged for what it generated. An attempt that already failed on its own (an
    error reply) or was accounted is left alone."""
    a = trace.attempts[-1] if trace.attempts else None
    if a is None or not a.sent or a.outcome != "error" or a.prompt_tokens or a.completion_tokens:
        return
    if a.reason not in ("", "timeout") or a.error_kind not in (None, "timeout"):
        return
    a.usage_estimated = True
    a.prompt_tokens = estimate_prompt_tokens(body)
    a.answer_cost_usd = price_usd(plan.stages[a.stage].upstream.cfg.price, a.prompt_tokens, 0, None)


def _account(att: Attempt, stage: Stage, body: Json, completion: Json) -> None:
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


def _account_stream(att: Attempt, stage: Stage, body: Json, relay: StreamRelay) -> Json:
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
    return _usage(att)


def _failed(att: Attempt, err: UpstreamError, t0: float, body: Json, final: bool) -> None:
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


def _summary(trace: Trace) -> str:
    parts = []
    for a in trace.attempts:
        what = a.reason or a.outcome
        if a.outcome == "rejected" and a.score is not None:
            what += f" (score {a.score:.2f}{': ' + a.detail if a.detail else ''})"
        elif a.detail:
            what += f" ({a.detail})"
        parts.append(f"stage {a.stage} ({a.upstream}): {what}")
    return "Attempts: " + "; ".join(parts) + "." if parts else "No stage was attempted."


def _retry_after(errors: list[Attempt], pick: Callable[[list[float]], float]) -> dict[str, str]:
    waits = [a.retry_after for a in errors if a.retry_after is not None]
    return {"retry-after": str(max(1, math.ceil(pick(waits)))) if waits else "1"}


def _all_failed(trace: Trace) -> ProxyError:
    atts = trace.attempts
    errors = [a for a in atts if a.outcome == "error"]
    if errors and len(errors) == len(atts):
        busy = [a.status == 429 or a.error_kind == "saturated" for a in errors]
        if all(busy):
            # Rate-limited upstream or our own concurrency limit full at every stage: come back later.
            return RateLimited(
                f"Every stage is rate-limited or at its concurrency limit. {_summary(trace)}",
                headers=_retry_after(errors, max),
            )
        if all(b or a.error_kind == "circuit_open" for a, b in zip(errors, busy, strict=True)):
            # Nothing was (successfully) asked: every stage's circuit is open (or the rest are busy).
            # Retry when the first circuit lets a probe through.
            return ServiceUnavailable(
                f"Every stage is unavailable (circuit open after upstream failures). {_summary(trace)}",
                code="circuit_open",
                headers=_retry_after([a for a in errors if a.error_kind == "circuit_open"], min),
            )
        if all(a.status in _CLIENT_4XX for a in errors):
            return InvalidRequest(f"Every stage rejected the request as invalid. {_summary(trace)}")
    return AllStagesFailed(f"Every stage failed. {_summary(trace)}")


def _error_event(message: str, type_: str, code: str) -> bytes:
    return encode(orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}))


class _Replayed:
    """An answer that is whole already (a scored stage, a fallback), sent as a stream."""

    __slots__ = ("_chunks", "_ended", "_engine", "_trace")

    def __init__(self, engine: Engine, trace: Trace, chunks: list[Json]) -> None:
        self._engine = engine
        self._trace = trace
        self._chunks = chunks
        self._ended = False

    async def events(self) -> AsyncGenerator[bytes, None]:
        ok = False
        try:
            first = True
            for c in self._chunks:
                yield encode(orjson.dumps(c))
                if first:
                    self._engine._first_byte(self._trace)
                    first = False
            yield DONE
            ok = True
        finally:
            await self.end(ok)

    async def end(self, ok: bool) -> None:
        if not self._ended:
            self._ended = True
            self._engine._finish(self._trace, ok)


class _Relayed:
    """The streamed last stage: relays the open upstream stream to the client, then accounts for it.
    ``end`` is its one way out: it closes the upstream stream, charges what was generated and records
    the request, once, whether ``events`` finished, broke off, or never started."""

    __slots__ = (
        "_accounted",
        "_att",
        "_body",
        "_chunks",
        "_deadline",
        "_ended",
        "_engine",
        "_first",
        "_relay",
        "_stack",
        "_stage",
        "_t0",
        "_trace",
    )  # fmt: skip

    def __init__(
        self,
        engine: Engine,
        stage: Stage,
        body: Json,
        trace: Trace,
        att: Attempt,
        t0: float,
        deadline: float,
        stack: AsyncExitStack,
        chunks: AsyncIterator[Json],
        first: Json,
        relay: StreamRelay,
    ) -> None:
        self._engine = engine
        self._stage = stage
        self._body = body
        self._trace = trace
        self._att = att
        self._t0 = t0
        self._deadline = deadline
        self._stack = stack
        self._chunks = chunks
        self._first = first
        self._relay = relay
        self._accounted = False
        self._ended = False

    async def events(self) -> AsyncGenerator[bytes, None]:
        engine, trace, att, relay = self._engine, self._trace, self._att, self._relay
        ok = False
        sent_any = False
        try:
            try:
                chunk: Json | None = self._first
                while chunk is not None:
                    out = relay.process(chunk)
                    if out is not None:
                        yield out
                        if not sent_any:
                            sent_any = True
                            engine._first_byte(trace)
                    try:
                        async with asyncio.timeout_at(self._deadline):
                            chunk = await anext(self._chunks)
                    except StopAsyncIteration:
                        chunk = None
            except UpstreamError as err:
                _failed(att, err, self._t0, self._body, final=True)
                self._account()
                yield _error_event(
                    f"The upstream stream failed: {att.detail}", "upstream_error", "upstream_stream_failed"
                )
                yield DONE
                return
            except TimeoutError:
                att.outcome, att.reason, att.error_kind = "error", "timeout", "timeout"
                att.detail = "cascade deadline passed while streaming"
                att.latency_ms = (time.perf_counter() - self._t0) * 1000
                self._account()
                yield _error_event(
                    "The cascade deadline passed while streaming.", "timeout_error", "deadline_exceeded"
                )
                yield DONE
                return
            att.latency_ms = (time.perf_counter() - self._t0) * 1000
            usage = self._account()
            att.outcome, att.reason, att.detail = "accepted", "accepted", "last stage"
            trace.accepted = att
            for b in relay.finish(trace.extension(), usage):
                yield b
                if not sent_any:
                    sent_any = True
                    engine._first_byte(trace)
            yield DONE
            ok = True
        finally:
            await self.end(ok)

    def _account(self) -> Json:
        self._accounted = True
        return _account_stream(self._att, self._stage, self._body, self._relay)

    async def end(self, ok: bool) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            await self._stack.aclose()
        finally:
            if not self._accounted:
                # The client went away mid-stream, or the events never started: charge what was generated.
                att = self._att
                att.outcome, att.reason, att.detail = "error", "cancelled", "client disconnected"
                att.latency_ms = (time.perf_counter() - self._t0) * 1000
                self._account()
            self._engine._finish(self._trace, ok)
