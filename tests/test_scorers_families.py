"""logprob, judge, self_verify, consistency, agreement, python scorers, and early abort on streams."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from app.config import ConfigError, parse_config
from app.main import create_app
from app.protocol import estimate_prompt_tokens
from app.scoring.asking import parse_grade, yes_probability
from app.scoring.logprob import aggregate, token_probs
from tests.conftest import base_config, chat, proxy, sse_events, two_stage, upstream, wait_for
from tests.conftest import loopback_stack as stack
from tests.fake_upstream import FakeUpstream
from tests.test_scorers_intent import WEATHER

pytestmark = pytest.mark.anyio
FIXTURES = Path(__file__).parent / "fixtures" / "llamacpp"


def _ext(r: Any) -> dict[str, Any]:
    return r.json()["cascade"]  # type: ignore[no-any-return]


# --- logprob ---------------------------------------------------------------------------


def test_aggregates_on_a_real_llamacpp_payload() -> None:
    reply = json.loads((FIXTURES / "chat_logprobs.smollm2-135m.json").read_text())
    probs = token_probs(reply["choices"][0]["logprobs"])
    assert len(probs) == len(reply["choices"][0]["logprobs"]["content"]) > 3
    assert all(0 < p <= 1 for p in probs)
    assert aggregate(probs, "min") == min(probs)
    assert aggregate(probs, "first") == pytest.approx(
        math.exp(reply["choices"][0]["logprobs"]["content"][0]["logprob"])
    )
    assert aggregate(probs, "min") <= aggregate(probs, "p10") <= aggregate(probs, "mean")


def test_geo_is_the_geometric_mean() -> None:
    assert aggregate([0.5, 0.5], "geo") == pytest.approx(0.5)
    assert aggregate([1.0, 0.25], "geo") == pytest.approx(0.5)


async def test_logprobs_are_asked_the_way_llamacpp_needs(fake: FakeUpstream) -> None:
    """llama.cpp's server returns no logprobs unless top_logprobs is set: the proxy sets it."""
    cfg = two_stage("llamacpp+conf-0.9", scorers=[{"type": "logprob", "aggregate": "geo"}])
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert _ext(r)["upstream"] == "small" and _ext(r)["attempts"][0]["scores"]["logprob"] == pytest.approx(
        0.9
    )
    sent = fake.requests[0]["body"]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 1
    assert r.json()["choices"][0]["logprobs"] is None


async def test_upstream_defaults_fill_only_what_the_client_left_out(fake: FakeUpstream) -> None:
    cfg = two_stage("ok")
    cfg["upstreams"]["small"]["defaults"] = {"max_tokens": 64, "temperature": 0}
    async with proxy(cfg, fake) as (c, _):
        await c.post("/v1/chat/completions", json=chat())
        await c.post("/v1/chat/completions", json=chat(max_tokens=5))
    assert (fake.requests[0]["body"]["max_tokens"], fake.requests[0]["body"]["temperature"]) == (64, 0)
    assert fake.requests[1]["body"]["max_tokens"] == 5


async def test_a_default_max_tokens_leaves_max_completion_tokens_alone(fake: FakeUpstream) -> None:
    """max_tokens and max_completion_tokens are one limit: a default of one is not added beside the
    client's other (OpenAI answers 400 to both at once, so every such request failed at that stage),
    and a client's null is "not set": the default applies (it was sent as null, unbounded)."""
    cfg = two_stage("ok")
    cfg["upstreams"]["small"]["defaults"] = {"max_tokens": 64, "temperature": 0}
    async with proxy(cfg, fake) as (c, _):
        await c.post("/v1/chat/completions", json=chat(max_completion_tokens=5))
        await c.post("/v1/chat/completions", json=chat(max_tokens=None, temperature=None))
    first, second = fake.requests[0]["body"], fake.requests[1]["body"]
    assert "max_tokens" not in first and first["max_completion_tokens"] == 5 and first["temperature"] == 0
    assert (second["max_tokens"], second["temperature"]) == (64, 0)


def test_p10_is_a_quantile_not_a_length_sensitive_product() -> None:
    # Same share (10%) of unsure tokens, 10 vs 100 tokens long: the same p10, while the sequence
    # probability (a product) would punish the longer answer 10 times harder.
    short = [0.9] * 9 + [0.2]
    long = [0.9] * 90 + [0.2] * 10
    assert aggregate(short, "p10") == aggregate(long, "p10") == 0.2
    assert aggregate([0.9] * 99 + [0.01], "p10") == 0.9  # one slip in 100 tokens is not "unsure"
    assert aggregate([0.9] * 99 + [0.01], "min") == 0.01


@pytest.mark.parametrize(("conf", "expected"), [("0.95", "small"), ("0.3", "large")])
async def test_logprob_scorer_asks_for_logprobs_and_strips_them(
    fake: FakeUpstream, conf: str, expected: str
) -> None:
    cfg = two_stage(
        f"conf-{conf}",
        scorers=[{"type": "heuristic", "veto": True}, {"type": "logprob", "aggregate": "mean"}],
    )
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    body = r.json()
    assert body["cascade"]["upstream"] == expected
    assert body["cascade"]["attempts"][0]["scores"]["logprob"] == pytest.approx(float(conf))
    assert fake.requests[0]["body"]["logprobs"] is True
    assert body["choices"][0]["logprobs"] is None  # the client did not ask


async def test_logprob_on_an_upstream_without_logprobs_is_a_startup_error() -> None:
    cfg = two_stage("ok", scorers=[{"type": "logprob"}])
    cfg["upstreams"]["small"]["logprobs"] = False
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, env={})
    assert info.value.problems == [
        "cascades.default.stages[0].scorers[0]: upstream 'small' does not return logprobs (logprobs: false)"
    ]


async def test_logprob_missing_from_reply_follows_on_error(fake: FakeUpstream) -> None:
    cfg = two_stage("nologprobs", scorers=[{"type": "logprob", "on_error": "reject"}])
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(logprobs=False))
    att = _ext(r)["attempts"][0]
    assert att["reasons"]["logprob"] == "error: MissingLogprobs" and _ext(r)["upstream"] == "large"


# --- judge and self-verify ----------------------------------------------------------------------------------


def test_parse_grade() -> None:
    assert parse_grade("8") == pytest.approx(7 / 9)
    assert parse_grade("Rating: 10/10") == 1.0
    assert parse_grade("1") == 0.0
    assert parse_grade("0.85") == 0.85
    assert parse_grade("75/100") == 0.75
    assert parse_grade("no idea") is None


@pytest.mark.parametrize(("grade", "expected"), [("9", "small"), ("3", "large")])
async def test_judge_grades_and_its_cost_is_scoring_spend(
    fake: FakeUpstream, grade: str, expected: str
) -> None:
    cfg = two_stage("ok", scorers=[{"type": "judge", "upstream": "grader"}])
    cfg["upstreams"]["grader"] = upstream(f"answer-{grade}", price={"input": 3.0, "output": 4.0})
    registry = CollectorRegistry()
    async with proxy(cfg, fake, registry=registry) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="What is 6*7?"))
    ext = _ext(r)
    assert ext["upstream"] == expected
    att0 = ext["attempts"][0]
    assert att0["scores"]["judge"] == pytest.approx((int(grade) - 1) / 9)
    judge_req = next(x["body"] for x in fake.requests if x["body"]["model"].startswith("answer-"))
    prompt = judge_req["messages"][0]["content"]
    assert "What is 6*7?" in prompt and "The answer is 42." in prompt
    # judge tokens are priced at the grader's prices and count toward the attempt's and request's cost
    spend = registry.get_sample_value(
        "cascade_cost_usd_total", {"cascade": "default", "upstream": "grader", "purpose": "scoring"}
    )
    assert spend and spend > 0
    answer_cost = registry.get_sample_value(
        "cascade_cost_usd_total", {"cascade": "default", "upstream": "small", "purpose": "answer"}
    )
    assert att0["cost_usd"] == pytest.approx(answer_cost + spend)
    assert ext["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in ext["attempts"]))


def _judged(grader_timeout_s: float = 5, scorer_timeout_s: float = 10, **cascade: Any) -> dict[str, Any]:
    cfg = two_stage("ok", scorers=[{"type": "judge", "upstream": "grader", "timeout_s": scorer_timeout_s}])
    cfg["upstreams"]["grader"] = upstream(
        "slow-30000", price={"input": 3.0, "output": 4.0}, timeout_s=grader_timeout_s, max_retries=0
    )
    cfg["cascades"]["default"].update(cascade)
    return cfg


def _scoring_usd(registry: CollectorRegistry) -> float:
    labels = {"cascade": "default", "upstream": "grader", "purpose": "scoring"}
    return registry.get_sample_value("cascade_cost_usd_total", labels) or 0.0


def _judge_prompt_usd(fake: FakeUpstream) -> float:
    """What the judge call is known to have cost when it was cut off: its estimated prompt tokens."""
    (judge,) = [x["body"] for x in fake.requests if x["body"]["model"] == "slow-30000"]
    return estimate_prompt_tokens(judge) * 3.0 / 1e6


@pytest.mark.parametrize("cut", ["scorer_timeout", "upstream_timeout"])
async def test_a_judge_call_that_times_out_is_still_charged(fake: FakeUpstream, cut: str) -> None:
    cfg = _judged(scorer_timeout_s=0.2) if cut == "scorer_timeout" else _judged(grader_timeout_s=0.2)
    registry = CollectorRegistry()
    async with proxy(cfg, fake, registry=registry) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    att0 = _ext(r)["attempts"][0]
    assert att0["outcome"] == "rejected" and "judge" in att0["reasons"]
    spent = _judge_prompt_usd(fake)
    assert spent > 0 and _scoring_usd(registry) == pytest.approx(spent)
    answer = registry.get_sample_value(
        "cascade_cost_usd_total", {"cascade": "default", "upstream": "small", "purpose": "answer"}
    )
    assert att0["cost_usd"] == pytest.approx(answer + spent)


async def test_a_judge_call_the_upstream_refused_is_not_charged(fake: FakeUpstream) -> None:
    """An error status is a call the upstream did not run (a 500 here, no retries): the estimate the
    call was charged when sent comes off again; the answer's own cost stays."""
    cfg = two_stage("ok", scorers=[{"type": "judge", "upstream": "grader", "on_error": "reject"}])
    cfg["upstreams"]["grader"] = upstream("error-500", price={"input": 3.0, "output": 4.0}, max_retries=0)
    registry = CollectorRegistry()
    async with proxy(cfg, fake, registry=registry) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    att0 = _ext(r)["attempts"][0]
    assert att0["outcome"] == "rejected" and att0["reasons"]["judge"].startswith("error")
    assert fake.counts.get("error-500") == 1 and _scoring_usd(registry) == 0
    answer = registry.get_sample_value(
        "cascade_cost_usd_total", {"cascade": "default", "upstream": "small", "purpose": "answer"}
    )
    assert answer and att0["cost_usd"] == pytest.approx(answer)


@pytest.mark.parametrize("ending", ["deadline", "client_gone"])
async def test_scoring_in_flight_when_the_request_ends_is_charged(fake: FakeUpstream, ending: str) -> None:
    registry = CollectorRegistry()
    cfg = _judged(deadline_s=1.0) if ending == "deadline" else _judged()
    async with proxy(cfg, fake, registry=registry) as (c, _):
        asked = asyncio.create_task(c.post("/v1/chat/completions", json=chat()))
        if ending == "deadline":
            assert (await asked).status_code == 504
        else:
            await wait_for(lambda: fake.counts.get("slow-30000"), "the judge call is sent")
            asked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asked
        failed = {"cascade": "default", "outcome": "error"}
        await wait_for(lambda: registry.get_sample_value("cascade_requests_total", failed), "recorded")
    spent = _judge_prompt_usd(fake)
    assert spent > 0 and _scoring_usd(registry) == pytest.approx(spent)


def test_yes_probability() -> None:
    reply = {
        "choices": [
            {
                "logprobs": {
                    "content": [
                        {
                            "token": "Yes",
                            "logprob": math.log(0.6),
                            "top_logprobs": [
                                {"token": "Yes", "logprob": math.log(0.6)},
                                {"token": " No", "logprob": math.log(0.2)},
                                {"token": "Maybe", "logprob": math.log(0.2)},
                            ],
                        }
                    ]
                }
            }
        ]
    }
    assert yes_probability(reply) == pytest.approx(0.75)
    assert yes_probability({"choices": [{"logprobs": None}]}) is None


@pytest.mark.parametrize(
    ("answer", "expected", "logprobs"),
    [("Yes", "small", True), ("No", "large", True), ("Yes", "small", False), ("No", "large", False)],
)
async def test_self_verify(fake: FakeUpstream, answer: str, expected: str, logprobs: bool) -> None:
    cfg = two_stage(f"answer-{answer}", scorers=[{"type": "self_verify"}])
    cfg["upstreams"]["small"]["logprobs"] = logprobs
    registry = CollectorRegistry()
    async with proxy(cfg, fake, registry=registry) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    ext = _ext(r)
    assert ext["upstream"] == expected
    verify = fake.requests[1]["body"]
    assert "Is the proposed answer correct?" in verify["messages"][0]["content"]
    assert verify.get("logprobs", False) is logprobs
    # The verification call is paid at the stage's own prices, as scoring, and in the attempt's cost.
    spent = {"cascade": "default", "upstream": "small"}
    scoring = registry.get_sample_value("cascade_cost_usd_total", {**spent, "purpose": "scoring"})
    answer_usd = registry.get_sample_value("cascade_cost_usd_total", {**spent, "purpose": "answer"})
    assert scoring is not None and scoring > 0 and answer_usd is not None
    assert ext["attempts"][0]["cost_usd"] == pytest.approx(answer_usd + scoring)


# --- consistency and agreement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "supports_n", "value"),
    [
        ("answer-42", True, 1.0),
        ("answer-42+varied", True, 0.5),
        ("answer-42", False, 1.0),
        ("tools", True, 1.0),  # the same tool call three times
        ("tools+varied", True, 0.5),  # choice 1 calls it with other arguments
    ],
)
async def test_consistency(fake: FakeUpstream, model: str, supports_n: bool, value: float) -> None:
    cfg = two_stage(model, scorers=[{"type": "consistency", "k": 3}])
    cfg["upstreams"]["small"]["supports_n"] = supports_n
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    att = _ext(r)["attempts"][0]
    # "varied" makes choice i say "42 v{i}": the answer is "42 v0"; the samples (the n=2 call) are
    # "42 v0" and "42 v1": one of two agrees.
    assert att["scores"]["consistency"] == value
    calls = [x["body"] for x in fake.requests if x["body"]["model"] == model]
    if supports_n:
        assert len(calls) == 2 and calls[1]["n"] == 2 and calls[1]["temperature"] == 0.7
    else:
        assert len(calls) == 3 and "n" not in calls[1]


async def test_consistency_of_an_empty_answer_is_0_and_samples_nothing(fake: FakeUpstream) -> None:
    """Empty samples agreeing with an empty answer are no evidence (they scored 1.0): nothing is paid."""
    async with proxy(two_stage("empty", scorers=[{"type": "consistency", "k": 3}]), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    att = _ext(r)["attempts"][0]
    assert att["scores"]["consistency"] == 0.0
    assert len([x for x in fake.requests if x["body"]["model"] == "empty"]) == 1


def _agreement_cascade(
    first: str,
    second: str,
    agreement: dict[str, Any],
    first_scorer: str = "logprob",
    first_threshold: float = 0.5,
) -> dict[str, Any]:
    """small (``first``, scored by ``first_scorer``) -> medium (``second``, by ``agreement``) -> large."""
    cfg = base_config()
    cfg["upstreams"]["small"] = upstream(first)
    cfg["upstreams"]["medium"] = upstream(second)
    cfg["cascades"]["default"]["stages"] = [
        {"upstream": "small", "threshold": first_threshold, "scorers": [{"type": first_scorer}]},
        {"upstream": "medium", "threshold": 0.5, "scorers": [agreement]},
        {"upstream": "large"},
    ]
    return cfg


@pytest.mark.parametrize(("second", "expected"), [("answer-Paris", "medium"), ("answer-London", "large")])
async def test_agreement_with_the_previous_stage(fake: FakeUpstream, second: str, expected: str) -> None:
    cfg = _agreement_cascade("answer-Paris+conf-0.1", second, {"type": "agreement", "with": "previous"})
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="Capital of France?"))
    ext = _ext(r)
    assert ext["upstream"] == expected
    assert ext["attempts"][1]["scores"] == {"agreement": 1.0 if expected == "medium" else 0.0}
    assert len(fake.requests) == (2 if expected == "medium" else 3)  # agreement itself calls nothing


@pytest.mark.parametrize(("second", "expected"), [("tools", "medium"), ("tools-mismatch", "large")])
async def test_agreement_between_tool_calls(fake: FakeUpstream, second: str, expected: str) -> None:
    """Two stages calling the same tool with the same arguments agree (compared as canonical JSON, as
    the fit and the labels compare them); other arguments do not."""
    cfg = _agreement_cascade("tools", second, {"type": "agreement"}, first_threshold=0.99)
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="Weather in Paris?", tools=[WEATHER]))
    ext = _ext(r)
    assert ext["upstream"] == expected
    assert ext["attempts"][1]["scores"] == {"agreement": 1.0 if expected == "medium" else 0.0}
    if expected == "medium":
        assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_agreement_without_an_earlier_answer_is_0_whatever_on_error_says(
    fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """An earlier stage that answered nothing leaves nothing to agree with: 0, as the fit's rule has it
    (it raised, which logged a warning per request and, under ``on_error: accept``, scored 1)."""
    cfg = _agreement_cascade(
        "empty", "answer-Paris", {"type": "agreement", "on_error": "accept"}, "heuristic"
    )
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(content="Capital of France?"))
    ext = _ext(r)
    assert ext["upstream"] == "large"
    assert ext["attempts"][1]["scores"] == {"agreement": 0.0}
    assert ext["attempts"][1]["reasons"]["agreement"] == "no earlier answer to agree with"
    assert "scorer agreement failed" not in caplog.text


def test_agreement_on_the_first_stage_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(two_stage("ok", scorers=[{"type": "agreement"}]), env={})
    assert "the first stage has no earlier answer" in info.value.problems[0]


# --- python ---------------------------------------------------------------------------


class KeywordScorer:
    """Used by the tests as a user's python scorer."""

    def __init__(self, keyword: str, bonus: float = 0.0) -> None:
        self.keyword = keyword.lower()
        self.bonus = bonus

    async def score(self, request: dict[str, Any], answer: dict[str, Any]) -> tuple[float, str]:
        await asyncio.sleep(0)
        ok = self.keyword in (answer.get("content") or "").lower() and answer["finish_reason"] == "stop"
        return (min(1.0, 0.9 + self.bonus) if ok else 0.1), f"keyword {'found' if ok else 'missing'}"


@pytest.mark.parametrize(("keyword", "expected"), [("answer", "small"), ("banana", "large")])
async def test_python_scorer(fake: FakeUpstream, keyword: str, expected: str) -> None:
    scorer = {
        "type": "python",
        "class": "tests.test_scorers_families:KeywordScorer",
        "options": {"keyword": keyword},
    }
    async with proxy(two_stage("ok", scorers=[scorer]), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    ext = _ext(r)
    assert ext["upstream"] == expected
    assert (
        ext["attempts"][0]["reasons"]["python"] == f"keyword {'found' if expected == 'small' else 'missing'}"
    )


@pytest.mark.parametrize(
    ("spec", "options", "needle"),
    [
        ("tests.nowhere:X", {}, "ModuleNotFoundError"),
        ("tests.test_scorers_families:Missing", {}, "AttributeError"),
        ("tests.test_scorers_families:KeywordScorer", {"nope": 1}, "TypeError"),
        ("tests.test_scorers_families:test_parse_grade", {}, "is not a class"),
    ],
)
def test_python_scorer_load_errors_are_config_errors(spec: str, options: dict[str, Any], needle: str) -> None:
    from app.runtime import build_runtime  # noqa: F401  (import path used by serve/check-config)

    cfg = parse_config(
        two_stage("ok", scorers=[{"type": "python", "class": spec, "options": options}]), env={}
    )
    with pytest.raises(ConfigError) as info:
        create_app(cfg, registry=CollectorRegistry())
    assert info.value.problems[0].startswith("cascades.default.stages[0].scorers[0]: cannot load:")
    assert needle in info.value.problems[0]


def test_a_python_scorer_next_to_the_config_loads_with_the_cascade_command(tmp_path: Path) -> None:
    """``cascade check-config`` (the console script) could not import a scorer module in the working
    directory, which ``python -m app.cli`` (and uvicorn, gunicorn) can: the script's own directory
    heads its import path, not the working directory."""
    script = Path(sys.executable).parent / "cascade"
    if not script.exists():
        pytest.skip("the cascade console script is not installed in this environment")
    (tmp_path / "my_team_scorer.py").write_text(
        "class Short:\n    async def score(self, request, answer):\n        return 1.0\n"
    )
    cfg = two_stage("ok", scorers=[{"type": "python", "class": "my_team_scorer:Short"}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [str(script), "check-config", "c.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


# --- early abort ---------------------------------------------------------------------------


async def test_early_abort_rejects_a_refusal_in_process(fake: FakeUpstream) -> None:
    cfg = two_stage("refuse", scorers=[{"type": "heuristic"}], early_abort=True)
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
        s = await c.post("/v1/chat/completions", json=chat(stream=True))
    att = _ext(r)["attempts"][0]
    assert (att["outcome"], att["reason"], att["detail"]) == (
        "rejected",
        "early_abort",
        "refusal in the first tokens",
    )
    assert att["cost_usd"] > 0 and att["usage_estimated"] is True
    assert fake.requests[0]["body"]["stream"] is True
    ext = sse_events(s.text)[-2]["cascade"]
    assert ext["upstream"] == "large" and ext["attempts"][0]["reason"] == "early_abort"


async def test_early_abort_accepts_good_streamed_answers_as_whole_completions(fake: FakeUpstream) -> None:
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    cfg = two_stage("tools", scorers=[{"type": "heuristic"}, {"type": "logprob"}], early_abort=True)
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(tools=tools))
    body = r.json()
    assert body["cascade"]["upstream"] == "small", body["cascade"]
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "f" and json.loads(call["function"]["arguments"]) == {}
    assert body["usage"]["completion_tokens"] > 0 and "usage_estimated" not in body["cascade"]["attempts"][0]
    assert body["cascade"]["attempts"][0]["scores"] == {"heuristic": 1.0}  # logprob abstains on tool calls

    cfg = two_stage("conf-0.9", scorers=[{"type": "heuristic"}, {"type": "logprob"}], early_abort=True)
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    chunks = sse_events(r.text)[:-1]
    assert (
        "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        == "The answer is 42."
    )
    assert chunks[-1]["cascade"]["attempts"][0]["scores"]["logprob"] == pytest.approx(0.9)
    assert all(ch["choices"][0].get("logprobs") is None for ch in chunks if ch["choices"])


async def test_early_abort_length_cap(fake: FakeUpstream) -> None:
    cfg = two_stage("words-400", scorers=[{"type": "heuristic", "max_chars": 100}], early_abort=True)
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    att = _ext(r)["attempts"][0]
    assert att["detail"] == "longer than 100 characters"
    assert att["cost_usd"] > 0


@pytest.mark.loopback
async def test_early_abort_closes_the_upstream_connection_before_the_answer_finishes() -> None:
    import httpx

    cfg = two_stage("refuse+chunkdelay-100", scorers=[{"type": "heuristic"}], early_abort=True)
    async with stack(cfg) as (url, fake, registry), httpx.AsyncClient(timeout=30) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await client.post(url + "/chat/completions", json=chat())
        elapsed = loop.time() - t0
        ext = r.json()["cascade"]
        assert ext["attempts"][0]["reason"] == "early_abort"
        for _ in range(50):
            if fake.cancelled_streams:
                break
            await asyncio.sleep(0.02)
        # "I'm sorry, but I can't help with that request." is 10 words 100 ms apart; the abort comes
        # at "can't" (word 5), so the upstream stream is cut, not finished.
        assert fake.cancelled_streams == 1 and fake.finished_streams == 0
        assert elapsed < 0.95
        esc = {
            "cascade": "default",
            "from_upstream": "small",
            "to_upstream": "large",
            "reason": "early_abort",
        }
        assert registry.get_sample_value("cascade_escalations_total", esc) == 1
