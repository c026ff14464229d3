"""Background label calls: shadow re-asks of the last stage, and the judge for free-form answers.

``Shadow.maybe`` runs on the request path for an answer accepted before the last stage: one random
draw against ``shadow_rate``, the spend caps, the in-flight cap and the last stage's circuit, then a
background task; the client's answer never waits for it. The task asks the cascade's last stage the
same request and labels every answered earlier attempt of the trace as ``app.learning.labels``
defines it (exact match of closed forms, else the judge, else no label). ``Shadow.judge_free`` does
the judge's part for a request that reached the last stage with free-form answers (its free labels).

Both return what happened (the trace's ``sampling``: ``not_drawn``, ``drawn``, ``judge``, or a skip:
``busy``, ``budget``, ``circuit_open``) and report the final outcome later through ``settle``
(``labelled``, ``upstream_error``, ``no_answer``, ``no_label``). Every skip is counted in
``cascade_labels_skipped_total{reason}`` (and shadow ones in ``cascade_shadow_skipped_total``): the fit
weights labels by the realised share of requests that got one, so skips cost precision, not bias.

Spend (``purpose="shadow"``) has two caps per process: ``shadow_budget_usd_per_hour`` (each worker of a
server gets its share) and ``shadow_max_share`` of what answers cost in the last hour (not for the first
``shadow_warmup`` label calls of a cascade). Before a call its cost is estimated (the trace's baseline,
or the mean of earlier calls when larger), after it the real cost counts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from app.answers import closed_form
from app.cascade.accounting import account
from app.cascade.calls import ask_logprobs
from app.cascade.plan import Plan
from app.cascade.trace import Attempt, Trace
from app.config import LearningConfig
from app.errors import UpstreamError
from app.learning.labels import EXACT, JUDGE, judge_prompt, judge_reply, verdict
from app.learning.records import AttemptRow, LabelRow, answer_of, attempt_row, prompt_of
from app.metrics import Metrics
from app.scoring.base import Answer, ScoreContext, score_stage
from app.upstream.client import Upstream, price_usd

log = logging.getLogger("cascade.learning")

Settle = Callable[[str, str, str], None]  # cascade, trace id, final sampling outcome
# cascade, labels, and the attempt rows of middle stages a shadow call asked (trace id, row)
Emit = Callable[[str, list[LabelRow], list[tuple[str, AttemptRow]]], None]


class HourlyBudget:
    """USD spent in the last hour, with reservations: ``take`` before a call, ``settle`` after it."""

    def __init__(self, limit: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._spent: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    def spent(self) -> float:
        cutoff = self._clock() - 3600.0
        while self._spent and self._spent[0][0] < cutoff:
            self._sum -= self._spent.popleft()[1]
        return max(0.0, self._sum)

    def take(self, usd: float) -> bool:
        if self.spent() + usd > self.limit:
            return False
        self._add(usd)
        return True

    def settle(self, reserved: float, actual: float) -> None:
        self._add(actual - reserved)

    def _add(self, usd: float) -> None:
        self._spent.append((self._clock(), usd))
        self._sum += usd


class _Spend:
    """Shadow spend capped by USD per hour and by a share of the answers' spend in the last hour."""

    def __init__(self, cfg: LearningConfig, workers: int, clock: Callable[[], float]) -> None:
        self.hourly = HourlyBudget(cfg.shadow_budget_usd_per_hour / max(1, workers), clock)
        self.share = cfg.shadow_max_share
        self.warmup = cfg.shadow_warmup
        self.answers = HourlyBudget(float("inf"), clock)
        self._mean: dict[str, tuple[float, int]] = {}  # purpose -> (mean cost, calls)
        self._calls: dict[str, int] = {}  # label calls made, by cascade

    def estimate(self, purpose: str, floor: float) -> float:
        return max(floor, self._mean.get(purpose, (0.0, 0))[0])

    def take(self, cascade: str, usd: float) -> bool:
        calls = self._calls.get(cascade, 0)
        capped = self.share is not None and calls >= self.warmup
        if capped and self.hourly.spent() + usd > (self.share or 0.0) * self.answers.spent():
            return False
        if not self.hourly.take(usd):
            return False
        self._calls[cascade] = calls + 1
        return True

    def settle(self, purpose: str, reserved: float, actual: float) -> None:
        self.hourly.settle(reserved, actual)
        if actual > 0:
            mean, n = self._mean.get(purpose, (0.0, 0))
            self._mean[purpose] = (mean + (actual - mean) / (n + 1), min(n + 1, 100))


def _closed(accepted: Attempt, request: dict[str, Any] | None) -> bool:
    """Whether the accepted answer is a closed form (a number, a letter, JSON, a tool call)."""
    got = answer_of(accepted.answer)
    return got is not None and closed_form(got[0], prompt_of(request))


class Shadow:
    def __init__(
        self,
        cfg: LearningConfig,
        metrics: Metrics,
        emit: Emit,
        settle: Settle,
        *,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        workers: int = 1,
    ) -> None:
        self.rate = cfg.shadow_rate
        self.judge = cfg.judge
        self.max_in_flight = cfg.shadow_max_in_flight
        self.middle = cfg.shadow_middle
        self.store_text = cfg.store_text
        self.spend = _Spend(cfg, workers, time.monotonic)
        self._metrics = metrics
        self._emit = emit
        self._settle = settle
        self.rng = rng
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def budget(self) -> HourlyBudget:
        return self.spend.hourly

    def answered(self, usd: float) -> None:
        """Request path: what a request's answers cost (the base of ``shadow_max_share``)."""
        self.spend.answers.settle(0.0, usd)

    # --- the request path ----------------------------------------------------------------------------

    def maybe(
        self, trace: Trace, ok: bool, plan: Plan, upstreams: Mapping[str, Upstream], compare: str
    ) -> str:
        """Decide about a shadow call for an early-accepted answer; start it when drawn. Returns the
        trace's sampling (empty when the request is not eligible: failed, or served by the last stage)."""
        a = trace.accepted
        if not ok or a is None or a.stage >= len(plan.stages) - 1 or trace.request is None:
            return ""
        if self.rate <= 0 or self.rng() >= self.rate:
            return "not_drawn"
        judge = self.judge_of(upstreams)
        if compare != EXACT and judge is None and not _closed(a, trace.request):
            # A free-form answer and no judge: no reference could label it, so no call is paid for
            # (a free-form cascade with auto_tune paid for every draw and learned nothing from it).
            self._metrics.labels_skipped(trace.cascade, "free_form")
            return "no_label"
        up = plan.final.upstream
        why, estimate = self._admit(trace.cascade, "shadow", trace.baseline_usd, 1, up)
        if why:
            self._metrics.shadow_skip(trace.cascade, why)
            return why
        self._start(self._run(trace, plan, judge, compare, estimate))
        return "drawn"

    def judge_free(
        self, trace: Trace, prompt: str, reference: str, answers: dict[int, str], judge: Upstream | None
    ) -> str:
        """Ask the judge about a last-stage request's free-form earlier answers (its free labels)."""
        if judge is None:
            return "no_label"
        why, estimate = self._admit(trace.cascade, "judge", 0.0, len(answers), judge)
        if why:
            return why
        self._start(self._judge_free(trace, prompt, reference, answers, judge, estimate))
        return "judge"

    def _admit(self, cascade: str, purpose: str, floor: float, calls: int, up: Upstream) -> tuple[str, float]:
        """(why a label call cannot be made now, or ''; the cost reserved for it when it can)."""
        estimate = self.spend.estimate(purpose, floor) * calls
        if len(self._tasks) >= self.max_in_flight:
            why = "busy"
        elif up.blocked() is not None:
            why = "circuit_open"
        elif not self.spend.take(cascade, estimate):
            why = "budget"
        else:
            return "", estimate
        self._metrics.labels_skipped(cascade, why)
        return why, 0.0

    def judge_of(self, upstreams: Mapping[str, Upstream]) -> Upstream | None:
        return upstreams.get(self.judge) if self.judge else None

    def _start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- background ----------------------------------------------------------------------------------

    async def _run(
        self, trace: Trace, plan: Plan, judge: Upstream | None, compare: str, estimate: float
    ) -> None:
        spent = 0.0  # the last stage's and the judge's calls: the label's cost (the reference's price)
        middle_spent = 0.0  # the middle stages' answers: on their attempt rows
        outcome = "no_label"
        up = plan.final.upstream
        asked = False  # the shadow call itself answered (a failure after it is the judge's)
        try:
            body = trace.request or {}
            reply, spent = await _ask(up, up.prepare(body, stream=False), trace.cascade, self._metrics)
            asked = True
            ref = answer_of(reply)
            if ref is None:
                outcome = "no_answer"
                return
            prompt = prompt_of(body)
            labels: list[LabelRow] = []
            texts: dict[int, str] = {}
            for att in trace.attempts:
                got = answer_of(att.answer)
                if got is None:
                    if att.outcome == "error":
                        labels.append(self._label(trace, att.stage, 0.0, "error"))
                    continue
                texts[att.stage] = got[0]
            rows: list[tuple[str, AttemptRow]] = []
            if self.middle:
                middle_spent = await self._middle(trace, plan, body, prompt, texts, rows)
            for stage in sorted(texts):
                v = verdict(compare, texts[stage], ref[0], prompt, have_judge=judge is not None)
                if v.how == EXACT:
                    assert v.value is not None
                    labels.append(self._label(trace, stage, v.value, v.reason or EXACT))
                elif v.how == JUDGE and judge is not None:
                    value, cost = await _judge(
                        judge, prompt, texts[stage], ref[0], trace.cascade, self._metrics
                    )
                    spent += cost
                    if value is not None:
                        labels.append(self._label(trace, stage, value, JUDGE))
            if labels:
                labels.sort(key=lambda lb: lb.stage if lb.stage is not None else -1)
                labels[0].cost_usd = spent
                self._emit(trace.cascade, labels, rows)
                outcome = "labelled"
        except UpstreamError as err:
            outcome = "upstream_error"
            log.info("shadow call failed", extra={"cascade": trace.cascade, "reason": err.reason})
        finally:
            self.spend.settle("shadow", estimate, spent + middle_spent)
            if outcome != "labelled":
                self._metrics.labels_skipped(trace.cascade, outcome)
                if outcome == "upstream_error" and not asked:  # made and paid for: not "skipped"
                    self._metrics.shadow_skip(trace.cascade, outcome)
            self._settle(trace.cascade, trace.completion_id, outcome)

    async def _middle(
        self,
        trace: Trace,
        plan: Plan,
        body: dict[str, Any],
        prompt: str,
        texts: dict[int, str],
        rows: list[tuple[str, AttemptRow]],
    ) -> float:
        """Ask, score and record the stages between the accepted one and the last (``texts`` gets their
        answers, ``rows`` their attempt rows); returns what their calls cost. Stops at the first stage
        that cannot be asked (circuit open, failed call): the fit fills in what is missing."""
        a = trace.accepted
        if a is None:
            return 0.0
        previous: list[Answer] = []
        for att in trace.attempts:
            if isinstance(att.answer, dict) and att.stage in texts:
                previous.append(Answer.of(att.answer, att.upstream, att.stage))
        spent = 0.0
        for stage in plan.stages[a.stage + 1 : len(plan.stages) - 1]:
            up = stage.upstream
            if up.blocked() is not None:
                break
            att = Attempt(stage=stage.index, upstream=up.name, outcome="shadow", reason="shadow")
            t0 = time.perf_counter()
            try:
                req = ask_logprobs(stage, body, up.prepare(body, stream=False))
                completion, cost = await _ask(up, req, trace.cascade, self._metrics)
            except UpstreamError:
                break
            spent += cost
            att.latency_ms = (time.perf_counter() - t0) * 1000
            account(att, stage, body, completion)
            answer = Answer.of(completion, up.name, stage.index)
            ctx = ScoreContext(plan.name, stage.index, body, answer, tuple(previous), att.scoring)
            # Scored as the request path would have (a veto applies below the threshold in force).
            threshold = plan.thresholds[stage.index]
            att.threshold = threshold
            verdict_ = await score_stage(stage.scorers, ctx, threshold if threshold is not None else 0.0)
            att.score, att.scores, att.reasons = verdict_.value, verdict_.scores, verdict_.reasons
            spent += sum(sp.cost_usd for sp in att.scoring)
            got = answer_of(completion)
            rows.append((trace.completion_id, attempt_row(att, got, self.store_text, prompt)))
            if got is None:
                break
            texts[stage.index] = got[0]
            previous.append(answer)
        return spent

    async def _judge_free(
        self,
        trace: Trace,
        prompt: str,
        reference: str,
        answers: dict[int, str],
        judge: Upstream,
        estimate: float,
    ) -> None:
        spent = 0.0
        outcome = "no_label"
        try:
            labels = []
            for stage, text in sorted(answers.items()):
                value, cost = await _judge(judge, prompt, text, reference, trace.cascade, self._metrics)
                spent += cost
                if value is not None:
                    labels.append(self._label(trace, stage, value, JUDGE, source="free", cost=cost))
            if labels:
                self._emit(trace.cascade, labels, [])
                outcome = "labelled"
        except UpstreamError as err:
            outcome = "upstream_error"
            log.info("judge call failed", extra={"cascade": trace.cascade, "reason": err.reason})
        finally:
            self.spend.settle("judge", estimate, spent)
            if outcome != "labelled":
                self._metrics.labels_skipped(trace.cascade, outcome)
            self._settle(trace.cascade, trace.completion_id, outcome)

    def _label(
        self, trace: Trace, stage: int, value: float, how: str, *, source: str = "shadow", cost: float = 0.0
    ) -> LabelRow:
        weight = 1.0 / self.rate if source == "shadow" and self.rate > 0 else 1.0
        return LabelRow(trace.completion_id, stage, source, value, weight, self._clock(), cost, how)

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Wait for the label calls in flight (tests, and the online replay's fixed cadence)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def _ask(
    up: Upstream, req: dict[str, Any], cascade: str, metrics: Metrics
) -> tuple[dict[str, Any], float]:
    reply = (await up.complete(req)).body
    raw = reply.get("usage")
    usage: dict[str, Any] = raw if isinstance(raw, dict) else {}
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    pt = pt if isinstance(pt, int) else 0
    ct = ct if isinstance(ct, int) else 0
    cost = price_usd(up.cfg.price, pt, ct, usage.get("cost"))
    metrics.spend(cascade, up.name, "shadow", cost, pt, ct)
    return reply, cost


async def _judge(
    judge: Upstream, question: str, a: str, b: str, cascade: str, metrics: Metrics
) -> tuple[float | None, float]:
    """1.0 / 0.0 from the judge's yes / no on "is A as good as B"; None when it gave neither."""
    content = judge_prompt(question, a, b)
    req = judge.prepare({"messages": [{"role": "user", "content": content}], "max_tokens": 5}, stream=False)
    reply, cost = await _ask(judge, req, cascade, metrics)
    got = answer_of(reply)
    return (judge_reply(got[0]) if got is not None else None), cost
