"""Heuristic and http scorers, weighted mean, veto and on_error policies."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from app.config import HeuristicScorer as HeuristicConfig
from app.config import HttpScorer as HttpConfig
from app.scoring.base import Answer, Configured, Score, ScoreContext, score_stage
from app.scoring.heuristic import Heuristic
from tests.conftest import chat, proxy, two_stage
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio


def _answer(content: str | None = "fine", finish: str = "stop", **msg: Any) -> Answer:
    message = {"role": "assistant", "content": content, **msg}
    completion = {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    return Answer(message, finish, completion, "small", 0)


H = Heuristic(HeuristicConfig(type="heuristic"))
TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def _call(args: str, name: str = "add") -> dict[str, Any]:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}


@pytest.mark.parametrize(
    ("request_extra", "answer", "value", "reason"),
    [
        ({}, _answer("Paris is the capital."), 1.0, "ok"),
        ({}, _answer(""), 0.0, "empty answer"),
        ({}, _answer("   \n"), 0.0, "empty answer"),
        ({}, _answer(None), 0.0, "empty answer"),
        ({}, _answer("I'm sorry, but I can't help with that."), 0.0, "refusal"),
        ({}, _answer("I’m sorry, but I can’t do that"), 0.0, "refusal"),
        ({}, _answer("As an AI language model, I cannot browse."), 0.0, "refusal"),
        ({}, _answer("Hmm, I'm not sure, maybe 4?"), 0.3, "hedging"),
        ({}, _answer("abc", finish="length"), 0.0, "truncated: finish_reason is length"),
        # The client's own limit cut it: what it asked for, not a defect (unfinished JSON included).
        ({"max_tokens": 3}, _answer("abc", finish="length"), 1.0, "cut at the client's max_tokens"),
        (
            {"max_completion_tokens": 3},
            _answer("abc", finish="length"),
            1.0,
            "cut at the client's max_tokens",
        ),
        (
            {"max_tokens": 3, "response_format": {"type": "json_object"}},
            _answer('{"a": ', finish="length"),
            1.0,
            "cut at the client's max_tokens",
        ),
        (
            {"max_tokens": 3, "tools": [TOOL]},
            _answer(None, tool_calls=[_call('{"a": 1,')], finish="length"),
            1.0,
            "cut at the client's max_tokens",
        ),
        ({"max_tokens": 3}, _answer("", finish="length"), 0.0, "empty answer"),
        ({"max_tokens": 3}, _answer("I'm sorry, but I can't do it", finish="length"), 0.0, "refusal"),
        ({}, _answer("abc", finish="content_filter"), 0.0, "content filtered"),
        ({}, _answer(None, refusal="no"), 0.0, "refusal"),
        ({"response_format": {"type": "json_object"}}, _answer('{"a": 1}'), 1.0, "ok"),
        ({"response_format": {"type": "json_object"}}, _answer('```json\n{"a": 1}\n```'), 1.0, "ok"),
        (
            {"response_format": {"type": "json_object"}},
            _answer('{"a": 1'),
            0.0,
            "invalid JSON while JSON was asked for",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "required": ["a"]}},
                }
            },
            _answer('{"b": 1}'),
            0.0,
            "JSON does not fit the requested schema",
        ),
        ({"tools": [TOOL]}, _answer(None, tool_calls=[_call('{"a": 1, "b": 2}')]), 1.0, "ok"),
        (
            {"tools": [TOOL]},
            _answer(None, tool_calls=[_call('{"a": 1,')]),
            0.0,
            "tool_calls[0] arguments are not valid JSON",
        ),
        (
            {"tools": [TOOL]},
            _answer(None, tool_calls=[_call('{"a": "x", "b": 2}')]),
            0.0,
            "tool_calls[0] a does not fit the tool schema (type)",
        ),
        (
            {"tools": [TOOL]},
            _answer(None, tool_calls=[_call('{"a": 1}')]),
            0.0,
            "tool_calls[0] arguments does not fit the tool schema (required)",
        ),
        (
            {"tools": [TOOL]},
            _answer(None, tool_calls=[_call("{}", name="sub")]),
            0.0,
            "tool_calls[0] calls unknown tool 'sub'",
        ),
        (
            {"tools": [TOOL], "tool_choice": "required"},
            _answer("no tool"),
            0.0,
            "a tool call was required but none was made",
        ),
    ],
)
def test_heuristic_checks(request_extra: dict[str, Any], answer: Answer, value: float, reason: str) -> None:
    s = H.check(chat(**request_extra), answer)
    assert (s.value, s.reason) == (value, reason)


def test_heuristic_checks_every_choice() -> None:
    a = _answer("fine")
    a.completion["choices"].append(
        {"index": 1, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
    )
    assert H.check(chat(), a).reason == "empty answer"


def test_heuristic_early_abort_checks() -> None:
    assert H.check_partial(chat(), "I'm sorry, but I can't") == "refusal in the first tokens"
    assert H.check_partial(chat(), "The capital is") is None
    assert H.check_partial(chat(response_format={"type": "json_object"}), "Sure! Here") is not None
    assert H.check_partial(chat(response_format={"type": "json_object"}), ' {"a"') is None


def test_custom_phrases() -> None:
    h = Heuristic(HeuristicConfig(type="heuristic", phrases=("Out of scope",)))
    assert h.check(chat(), _answer("That is out of scope for me.")).reason == "refusal"


# --- combination -----------------------------------------------------------------------------------------


class Fixed:
    kind = "fixed"

    def __init__(self, value: float, delay: float = 0.0, fail: bool = False) -> None:
        self.value, self.delay, self.fail = value, delay, fail

    async def score(self, ctx: ScoreContext) -> Score:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        return Score(self.value, f"fixed {self.value}")


def _item(scorer: Any, name: str, **cfg: Any) -> Configured:
    return Configured(scorer, HeuristicConfig(type="heuristic", **cfg), name)


CTX = ScoreContext("c", 0, chat(), _answer())


async def test_weighted_mean() -> None:
    s = await score_stage([_item(Fixed(1.0), "a", weight=1), _item(Fixed(0.4), "b", weight=2)], CTX, 0.5)
    assert s.value == pytest.approx(0.6)
    assert s.scores == {"a": 1.0, "b": 0.4}
    assert s.reason == "fixed 0.4"


async def test_veto_forces_zero_below_the_threshold() -> None:
    items = [_item(Fixed(0.6), "v", veto=True), _item(Fixed(1.0), "b", weight=5)]
    assert (await score_stage(items, CTX, 0.5)).value == pytest.approx((0.6 + 5) / 6)
    s = await score_stage(items, CTX, 0.7)
    assert s.value == 0.0 and s.reason == "veto v: fixed 0.6"


@pytest.mark.parametrize(
    ("policy", "value", "names"),
    [("reject", 0.5, {"slow", "b"}), ("accept", 1.0, {"slow", "b"}), ("ignore", 1.0, {"b"})],
)
async def test_timeouts_and_errors_follow_on_error(policy: str, value: float, names: set[str]) -> None:
    for bad in (Fixed(1.0, delay=5), Fixed(1.0, fail=True)):
        items = [_item(bad, "slow", timeout_s=0.05, on_error=policy), _item(Fixed(1.0), "b")]
        s = await asyncio.wait_for(score_stage(items, CTX, 0.5), 10)
        assert s.value == pytest.approx(value) and set(s.scores) == names


class Meeting:
    """Scores only once every scorer of the stage has started: run one after another, none would."""

    kind = "meeting"

    def __init__(self, started: list[int], everyone: asyncio.Event, n: int) -> None:
        self.started, self.everyone, self.n = started, everyone, n

    async def score(self, ctx: ScoreContext) -> Score:
        self.started.append(1)
        if len(self.started) == self.n:
            self.everyone.set()
        await self.everyone.wait()
        return Score(1.0)


async def test_scorers_of_a_stage_run_concurrently() -> None:
    started: list[int] = []
    everyone = asyncio.Event()
    items = [_item(Meeting(started, everyone, 5), f"s{i}", timeout_s=30) for i in range(5)]
    async with asyncio.timeout(10):
        s = await score_stage(items, CTX, 0.5)
    assert s.value == 1.0 and len(started) == 5


async def test_out_of_range_score_is_an_error() -> None:
    s = await score_stage([_item(Fixed(1.5), "x")], CTX, 0.5)
    assert s.value == 0.0 and s.reasons["x"] == "error: ValueError"


# --- the http scorer, through the proxy ---------------------------------------------------------------


class ScoringService:
    """A user's scoring service: scores 0.9 unless the answer contains "42", then 0.1."""

    def __init__(self, status: int = 200, body: bytes | None = None) -> None:
        self.status, self.body = status, body
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            m = await receive()
            raw += m.get("body", b"")
            if not m.get("more_body"):
                break
        payload = orjson.loads(raw)
        self.seen.append(payload)
        text = payload["response"]["choices"][0]["message"]["content"]
        body = self.body or orjson.dumps({"score": 0.1 if "42" in text else 0.9, "reason": "contains 42"})
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def test_http_scorer_decides_through_the_proxy(fake: FakeUpstream) -> None:
    svc = ScoringService()
    scorer = {"type": "http", "url": "http://scorer.local/score", "headers": {"x-token": "t"}}
    for model, expected in [("ok", "large"), ("answer-Paris", "small")]:
        cfg = two_stage(model, scorers=[scorer])
        async with proxy(cfg, fake, apps={"scorer.local": svc}) as (c, _):
            r = await c.post("/v1/chat/completions", json=chat())
        ext = r.json()["cascade"]
        assert ext["upstream"] == expected
    seen = svc.seen[0]
    assert set(seen) == {"request", "response", "upstream", "stage"}
    assert seen["upstream"] == "small" and seen["stage"] == 0
    assert seen["request"]["messages"][0]["content"] == "What is 6*7?"
    assert ext["attempts"][0]["scores"] == {"http": 0.9}


@pytest.mark.parametrize(
    "svc",
    [ScoringService(status=500), ScoringService(body=b"not json"), ScoringService(body=b'{"score": "high"}')],
)
async def test_http_scorer_failure_follows_policy(fake: FakeUpstream, svc: ScoringService) -> None:
    for policy, expected in [("reject", "large"), ("accept", "small")]:
        scorer = {"type": "http", "url": "http://scorer.local/score", "on_error": policy}
        async with proxy(two_stage("answer-Paris", scorers=[scorer]), fake, apps={"scorer.local": svc}) as (
            c,
            _,
        ):
            r = await c.post("/v1/chat/completions", json=chat())
        att = r.json()["cascade"]["attempts"][0]
        assert r.json()["cascade"]["upstream"] == expected
        assert att["reasons"]["http"].startswith("error: ScorerServiceError")


async def test_http_scorer_unreachable_is_a_scorer_error_not_a_crash(fake: FakeUpstream) -> None:
    scorer = {"type": "http", "url": "http://nowhere.local/score", "timeout_s": 1}
    async with proxy(two_stage("answer-Paris", scorers=[scorer]), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.json()["cascade"]["upstream"] == "large"


def test_http_config_rejects_non_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        HttpConfig(type="http", url="file:///etc/passwd")
