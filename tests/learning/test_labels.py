"""One label definition (issue 13): "as good as the last stage's answer", decided by learning.compare for
free, shadow and user labels alike: exact match of closed forms, the judge for free form, else none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.answers import answer_form, canonical_answer, closed_form
from app.config import ConfigError, parse_config
from app.learning.calibration import make_entry
from app.learning.labels import (
    EXACT,
    JUDGE,
    SKIP,
    Verdict,
    judge_prompt,
    parse_judge_prompt,
    verdict,
)
from tests.conftest import base_config, chat, proxy, two_stage
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import query, settle, sqlite_url, with_learning

pytestmark = pytest.mark.anyio


# --- closed forms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "form"),
    [
        ("B", "choice"),
        ("The answer is (C) because the rest is wrong.", "choice"),
        ("So she makes 9 * 2 = $18.\n#### 18", "number"),
        ("42", "number"),
        ('{"city": "Paris", "days": 3}', "json"),
        ('```json\n{"city": "Paris"}\n```', "json"),
        ('[{"name":"get_weather","arguments":"{\\"city\\": \\"Paris\\"}"}]', "json"),
        ("Paris is the capital of France.", "text"),
        ("```python\ndef f(x):\n    return x + 1\n```", "text"),
        ("  ", "empty"),
    ],
)
def test_answer_forms(text: str, form: str) -> None:
    assert answer_form(text) == form
    assert closed_form(text) == (form in ("choice", "number", "json"))


def test_json_and_tool_calls_compare_canonically() -> None:
    assert canonical_answer('{"a": 1, "b": [1, 2]}') == canonical_answer('```json\n{"b":[1,2],"a":1}\n```')
    a = '[{"name":"f","arguments":"{\\"x\\": 1, \\"y\\": 2}"}]'
    b = '[{"name":"f","arguments":"{\\"y\\":2,\\"x\\":1}"}]'
    assert canonical_answer(a) == canonical_answer(b)
    assert canonical_answer(a) != canonical_answer('[{"name":"f","arguments":"{\\"x\\": 2}"}]')


def test_verdicts() -> None:
    assert verdict("auto", "The answer is 18.", "#### 18", "q", have_judge=False).value == 1.0
    assert verdict("auto", "The answer is 17.", "#### 18", "q", have_judge=True) == Verdict(EXACT, 0.0)
    # Free form: never exact in auto; the judge when there is one, else no label.
    assert verdict("auto", "Paris.", "It is Paris", "q", have_judge=True).how == JUDGE
    assert verdict("auto", "Paris.", "It is Paris", "q", have_judge=False) == Verdict(
        SKIP, reason="free_form"
    )
    assert verdict("auto", "42", "It is Paris", "q", have_judge=False).how == SKIP  # one is free form
    assert verdict("exact", "Paris.", "paris", "q", have_judge=True) == Verdict(EXACT, 1.0)
    assert verdict("judge", "18", "18", "q", have_judge=True).how == JUDGE
    assert verdict("auto", "", "18", "q", have_judge=True) == Verdict(EXACT, 0.0, "empty")
    assert verdict("auto", "18", " ", "q", have_judge=True).how == SKIP


def test_judge_prompt_round_trips() -> None:
    text = judge_prompt("Q" * 5000 + "?", "answer\n\nA", "answer B")
    assert parse_judge_prompt(text) == ("Q" * 3999 + "?", "answer\n\nA", "answer B")
    assert parse_judge_prompt("something else") is None


def test_user_scores_become_labels_at_the_pass_score() -> None:
    atts = {0: ("accepted", 0.9, 1e-6)}
    e = make_entry(1, 2, 0, 1e-4, atts, [("user", None, 0.4, 1.0, 0.0)], 2, pass_score=0.5)
    assert e is not None and e.kind == "user" and e.correct[0] == 0.0
    e = make_entry(1, 2, 0, 1e-4, atts, [("user", None, 0.4, 1.0, 0.0)], 2, pass_score=0.3)
    assert e is not None and e.correct[0] == 1.0
    # The user's word overrides a shadow label of the same answer.
    e = make_entry(1, 2, 0, 1e-4, atts, [("shadow", 0, 1.0, 5.0, 1e-4), ("user", None, 0.0, 1.0, 0.0)], 2)
    assert e is not None and e.kind == "shadow" and e.correct[0] == 0.0


# --- config ---------------------------------------------------------------------------------------------


def test_config_keys_and_their_errors() -> None:
    cfg = base_config()
    cfg["cascades"]["default"]["compare"] = "judge"
    with pytest.raises(ConfigError) as e:
        parse_config({**cfg, "learning": {"store": "sqlite:///x.db"}}, env={})
    assert e.value.problems == ["cascades.default.compare: 'judge' needs learning.judge (an upstream)"]
    with pytest.raises(ConfigError) as e:
        parse_config({**cfg, "learning": {"judge": "nope"}}, env={})
    assert e.value.problems == ["learning.judge: unknown upstream 'nope'"]
    with pytest.raises(ConfigError) as e:
        parse_config({**base_config(), "learning": {"judge": "large", "shadow_judge": "small"}}, env={})
    assert "shadow_judge is the old name of judge" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        parse_config({**base_config(), "learning": {"compare": "fuzzy"}}, env={})
    assert e.value.problems[0].startswith("learning.compare: ")
    ok = parse_config({**base_config(), "learning": {"shadow_judge": "large"}}, env={})
    assert ok.learning is not None and ok.learning.judge == "large"


# --- through the proxy ----------------------------------------------------------------------------------


def _labels(url: str) -> list[tuple[Any, ...]]:
    return query(
        url, "SELECT l.stage, l.source, l.value, l.detail, l.cost_usd > 0 FROM labels l ORDER BY l.id"
    )


async def test_closed_forms_get_exact_free_labels(fake: FakeUpstream, tmp_path: Path) -> None:
    # Stage 0 says "The answer is 42." but is rejected (low token confidence); the last stage says 42.
    url = sqlite_url(tmp_path)
    cfg = two_stage("ok+logprobs+conf-0.2", "answer-42", scorers=[{"type": "logprob"}])
    async with proxy(with_learning(cfg, url), fake) as (c, app):
        assert (await c.post("/v1/chat/completions", json=chat())).json()["cascade"]["stage"] == 1
        await settle(app)
    assert _labels(url) == [(0, "free", 1.0, "exact", False)]
    assert query(url, "SELECT sampling FROM traces") == [("free",)]


async def test_a_chatty_choice_is_a_closed_form_and_gets_an_exact_free_label(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Stage 0 answers "The answer is: **B**", the last stage "B": the same choice, read through the
    markdown, so an exact free label (1), not a free-form answer left unlabelled."""
    url = sqlite_url(tmp_path)
    cfg = two_stage(
        "answer-The_answer_is:_**B**+logprobs+conf-0.2", "answer-B", scorers=[{"type": "logprob"}]
    )
    question = "Which is blue?\nA) grass\nB) the sky\nAnswer:"
    async with proxy(with_learning(cfg, url), fake) as (c, app):
        r = await c.post("/v1/chat/completions", json=chat(content=question))
        assert r.json()["cascade"]["stage"] == 1
        await settle(app)
    assert _labels(url) == [(0, "free", 1.0, "exact", False)]
    assert query(url, "SELECT sampling FROM traces") == [("free",)]


async def test_free_form_without_a_judge_gets_no_label(fake: FakeUpstream, tmp_path: Path) -> None:
    """A refusal next to "large says hi": free form, so exact match would call it wrong for the wrong
    reason; without a judge there is no label, and the skip is counted."""
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    async with proxy(with_learning(two_stage("refuse"), url), fake, registry=reg) as (c, app):
        assert (await c.post("/v1/chat/completions", json=chat())).json()["cascade"]["stage"] == 1
        await settle(app)
    assert _labels(url) == []
    assert query(url, "SELECT sampling FROM traces") == [("no_label",)]
    skipped = {"cascade": "default", "reason": "free_form"}
    assert reg.get_sample_value("cascade_labels_skipped_total", skipped) == 1.0


async def test_free_form_free_labels_come_from_the_judge(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    reg = CollectorRegistry()
    cfg = with_learning(two_stage("refuse"), url, judge="judge", shadow_max_share=None)
    cfg["upstreams"]["judge"] = {**cfg["upstreams"]["small"], "model": "answer-No."}
    async with proxy(cfg, fake, registry=reg) as (c, app):
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.json()["cascade"]["stage"] == 1
        await settle(app)
    assert _labels(url) == [(0, "free", 0.0, "judge", True)]
    assert query(url, "SELECT sampling FROM traces") == [("labelled",)]
    # The judge saw the request and both answers, and its spend is label spend.
    asked = [r["body"] for r in fake.requests if r["body"]["model"] == "answer-No."]
    assert len(asked) == 1
    parts = parse_judge_prompt(asked[0]["messages"][0]["content"])
    assert parts is not None and parts[2] == "large says hi" and parts[1].startswith("I'm sorry")
    spent = {"cascade": "default", "upstream": "judge", "purpose": "shadow"}
    assert (reg.get_sample_value("cascade_cost_usd_total", spent) or 0) > 0
    assert r.json()["cascade"]["cost_usd"] == pytest.approx(
        sum(a["cost_usd"] for a in r.json()["cascade"]["attempts"])
    )


async def test_a_cascade_can_override_the_comparator(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    cfg = with_learning(two_stage("refuse"), url)  # auto: the refusal would get no label
    cfg["cascades"]["default"]["compare"] = "exact"
    async with proxy(cfg, fake) as (c, app):
        await c.post("/v1/chat/completions", json=chat())
        await settle(app)
    assert _labels(url) == [(0, "free", 0.0, "exact", False)]


async def test_tool_calls_compare_as_json(fake: FakeUpstream, tmp_path: Path) -> None:
    # Both stages call the same tool with the same arguments: as good (stage 0 rejected on confidence).
    url = sqlite_url(tmp_path)
    cfg = two_stage("tools+logprobs+conf-0.2", "tools", scorers=[{"type": "logprob"}])
    body = chat()
    body["tools"] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    async with proxy(with_learning(cfg, url), fake) as (c, app):
        r = await c.post("/v1/chat/completions", json=body)
        assert r.json()["cascade"]["stage"] == 1, json.dumps(r.json())[:500]
        await settle(app)
    assert _labels(url) == [(0, "free", 1.0, "exact", False)]
