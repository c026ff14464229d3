"""``discard`` and ``abandon`` on a hedged call that had already finished when the race was decided.

Through HTTP (``tests/test_hedging.py``) the losing call is almost always still running when it is
discarded, so these orders are set up here directly: the call finished with an answer (a whole
completion, or a stream opened upstream), with an upstream failure, or cut short by a stream check,
before the cascade decided it did not need it. Each must be charged what it generated and recorded
as such, and closing what it holds open must not fail the request the cascade is answering.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack
from types import SimpleNamespace
from typing import Any

import pytest

from app.cascade.calls import EarlyAbort, Opened
from app.cascade.hedge import Call, abandon, discard
from app.cascade.trace import Attempt
from app.config import Price
from app.errors import UpstreamStatusError

pytestmark = pytest.mark.anyio

BODY = {"model": "default", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
PRICE = Price(input=1.0, output=2.0)  # USD per 1M tokens


def completion(text: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


async def finished(result: Any = None, exc: BaseException | None = None) -> asyncio.Task[Any]:
    async def work() -> Any:
        if exc is not None:
            raise exc
        return result

    task = asyncio.ensure_future(work())
    await asyncio.wait((task,))
    return task


def call_of(task: asyncio.Task[Any]) -> Call:
    stage: Any = SimpleNamespace(
        index=1, upstream=SimpleNamespace(name="large", cfg=SimpleNamespace(price=PRICE))
    )
    return Call(stage, Attempt(stage=1, upstream="large"), 0.0, task)


def opened(closing_fails: bool) -> tuple[Opened, list[str]]:
    closed: list[str] = []

    async def close() -> None:
        closed.append("closed")
        if closing_fails:
            raise ConnectionResetError("the upstream reset the connection while it was closed")

    stack = AsyncExitStack()
    stack.push_async_callback(close)
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "The answer is"}}]}
    return Opened(stack, SimpleNamespace(), [(b"", chunk)]), closed  # type: ignore[arg-type]


async def test_a_finished_answer_is_charged_its_usage_and_kept_from_the_labels() -> None:
    call = call_of(await finished(completion("4", {"prompt_tokens": 1000, "completion_tokens": 500})))
    await discard(call, BODY, "hedge_lost", "stage 0 answered and was accepted")
    att = call.att
    assert (att.outcome, att.reason) == ("cancelled", "hedge_lost")
    assert (att.prompt_tokens, att.completion_tokens, att.usage_estimated) == (1000, 500, False)
    assert att.answer_cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    assert att.answer is None  # not an answer of the cascade: nothing may be labelled from it
    assert call.taken


@pytest.mark.parametrize("closing_fails", [False, True])
async def test_a_stream_opened_upstream_is_closed_and_charged_what_it_sent(closing_fails: bool) -> None:
    res, closed = opened(closing_fails)
    call = call_of(await finished(res))
    await discard(call, BODY, "hedge", "stage 1 (hedge) answered first")  # never raises
    assert closed == ["closed"]
    att = call.att
    assert (att.outcome, att.reason) == ("cancelled", "hedge")
    assert att.completion_tokens > 0 and att.answer_cost_usd > 0  # "The answer is", estimated


async def test_a_call_that_had_failed_keeps_its_error() -> None:
    err = UpstreamStatusError("large", 503, "overloaded")
    call = call_of(await finished(exc=err))
    await discard(call, BODY, "hedge_lost", "stage 0 answered and was accepted")
    att = call.att
    assert (att.outcome, att.error_kind, att.status) == ("error", err.kind, 503)
    assert att.escalation_reason is None  # nothing escalated because of it: the cascade had its answer
    assert att.answer_cost_usd == 0


async def test_a_call_a_stream_check_cut_short_is_charged_its_partial_answer() -> None:
    call = call_of(await finished(exc=EarlyAbort("refusal", completion("I'm sorry, but"))))
    await discard(call, BODY, "hedge", "stage 1 (hedge) answered first")
    att = call.att
    assert att.outcome == "cancelled" and att.completion_tokens > 0 and att.answer_cost_usd > 0


@pytest.mark.parametrize("closing_fails", [False, True])
async def test_abandon_charges_a_finished_call_and_closes_its_stream(closing_fails: bool) -> None:
    res, closed = opened(closing_fails)
    answered = call_of(await finished(completion("4", {"prompt_tokens": 10, "completion_tokens": 1})))
    streamed = call_of(await finished(res))
    running = call_of(asyncio.ensure_future(asyncio.sleep(30)))
    await abandon([answered, streamed, running], BODY)
    assert closed == ["closed"]
    for c in (answered, streamed):
        assert (c.att.outcome, c.att.reason) == ("cancelled", "request_ended") and c.att.answer_cost_usd > 0
    # One cut off in flight is the engine's to charge (``charge_in_flight``); here it is only cancelled.
    with contextlib.suppress(asyncio.CancelledError):
        await running.task
    assert running.task.cancelled() and running.att.outcome == "error"
