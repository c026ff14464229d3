"""Shadow labelling: re-ask the last stage, in the background, for a sample of early-accepted answers.

``Shadow.maybe`` runs on the request path and only decides (one random draw, a budget check) and
starts a task; the client's answer never waits for it. The task asks the cascade's last stage the
same request and labels every answered earlier attempt of the trace: 1.0 when it matches the last
stage's answer (``normalize_answer``), or what ``learning.shadow_judge`` says, else 0.0. Labels weigh
1/shadow_rate (inverse sampling probability). The spend is counted as ``purpose="shadow"`` and capped
by ``shadow_budget_usd_per_hour`` (per server; each of its worker processes gets an equal share),
using the trace's baseline cost as the estimate before the call and the real cost after it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from app.cascade.plan import Plan
from app.cascade.trace import Trace
from app.config import LearningConfig
from app.errors import UpstreamError
from app.learning.records import LabelRow, answer_of, normalized, prompt_of
from app.metrics import Metrics
from app.upstream.client import Upstream, price_usd

log = logging.getLogger("cascade.learning")

MAX_IN_FLIGHT = 8  # shadow calls at once per process; more are skipped ("busy"), never queued

JUDGE_PROMPT = (
    "Two answers to the same request follow. Do they give the same final answer (same facts, same "
    "result; wording may differ)? Reply with one word: yes or no.\n\n"
    "Request:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}"
)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


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


class Shadow:
    def __init__(
        self,
        cfg: LearningConfig,
        metrics: Metrics,
        emit: Callable[[str, list[LabelRow]], None],
        *,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        workers: int = 1,
    ) -> None:
        self.rate = cfg.shadow_rate
        self.judge = cfg.shadow_judge
        # The budget is the server's (all its worker processes together): each worker takes its share.
        self.budget = HourlyBudget(cfg.shadow_budget_usd_per_hour / max(1, workers))
        self._metrics = metrics
        self._emit = emit
        self._rng = rng
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    def maybe(self, trace: Trace, ok: bool, plan: Plan, upstreams: Mapping[str, Upstream]) -> None:
        """Request path: decide, and start the shadow call in the background when picked."""
        a = trace.accepted
        if not ok or a is None or a.stage >= len(plan.stages) - 1 or trace.request is None:
            return
        if self._rng() >= self.rate:
            return
        estimate = trace.baseline_usd
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self._metrics.shadow_skip(trace.cascade, "busy")
            return
        if not self.budget.take(estimate):
            self._metrics.shadow_skip(trace.cascade, "budget")
            return
        judge = upstreams.get(self.judge) if self.judge else None
        task = asyncio.get_running_loop().create_task(self._run(trace, plan.final.upstream, judge, estimate))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, trace: Trace, up: Upstream, judge: Upstream | None, estimate: float) -> None:
        spent = 0.0
        try:
            if up.blocked() is not None:
                self._metrics.shadow_skip(trace.cascade, "upstream_error")
                return
            body = trace.request or {}
            reply, spent = await _ask(up, up.prepare(body, stream=False), trace.cascade, self._metrics)
            ref = answer_of(reply)
            if ref is None:
                return
            prompt = prompt_of(body)
            labels: list[LabelRow] = []
            weight = 1.0 / self.rate
            for att in trace.attempts:
                got = answer_of(att.answer)
                if got is not None:
                    if judge is None:
                        value: float | None = float(normalized(got[0], prompt) == normalized(ref[0], prompt))
                        how = "match"
                    else:
                        value, cost = await _judge(
                            judge, prompt, got[0], ref[0], trace.cascade, self._metrics
                        )
                        spent += cost
                        how = "judge"
                    if value is None:
                        continue
                elif att.outcome == "error":
                    value, how = 0.0, "error"
                else:
                    continue
                labels.append(
                    LabelRow(trace.completion_id, att.stage, "shadow", value, weight, self._clock(), 0.0, how)
                )
            if labels:
                labels[0].cost_usd = spent
                self._emit(trace.cascade, labels)
        except UpstreamError as err:
            self._metrics.shadow_skip(trace.cascade, "upstream_error")
            log.info("shadow call failed", extra={"cascade": trace.cascade, "reason": err.reason})
        finally:
            self.budget.settle(estimate, spent)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Tests: wait for the shadow calls in flight."""
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
    """1.0 / 0.0 from the judge's yes / no; None when it gave neither."""
    content = JUDGE_PROMPT.format(question=question[-4000:], a=a[:4000], b=b[:4000])
    req = judge.prepare({"messages": [{"role": "user", "content": content}], "max_tokens": 5}, stream=False)
    reply, cost = await _ask(judge, req, cascade, metrics)
    got = answer_of(reply)
    m = _YES_NO.search(got[0]) if got is not None else None
    if m is None:
        return None, cost
    return (1.0 if m.group(1).lower() == "yes" else 0.0), cost
