"""``cascade fit-scorer --from-store``: learned scorers fitted from the labelled traces (with texts) that a
running proxy recorded, then served as ``{type: learned, model: PATH}``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.answers import messages_to_prompt
from app.cli import main
from app.config import LearnedScorer as LearnedConfig
from app.learning.fit_scorer import collect
from app.learning.store import LabelledTexts
from app.scoring.base import Answer, ScoreContext
from app.scoring.learned import Learned
from app.scoring.model import LogisticModel
from tests.conftest import base_config, chat, proxy
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import query, settle, sqlite_url, with_learning

pytestmark = pytest.mark.anyio

PROMPT_SCORE = {"type": "python", "class": "tests.learning.learning_helpers:PromptScore"}


def good(i: int) -> str:
    return f"Compute {i} plus {i + 3}. score=0.9"


def bad(i: int, score: float = 0.9) -> str:
    return (
        f"Maybe {i}? I am not sure, perhaps roughly {i + 1}; I think it might be {i + 2}, probably, "
        f"it seems unclear. score={score}"
    )


def _cfg(url: str, *, store_text: bool = True, **stage0: Any) -> dict[str, Any]:
    """Stage 0 echoes the request (so its answer carries the prompt's words); stage 1 says something
    else, so an escalated request labels stage 0's answer bad for free (free text, compared exactly)."""
    cfg = with_learning(base_config(), url, store_text=store_text, min_labels=1000, compare="exact")
    cfg["upstreams"]["small"]["model"] = "echo"
    cfg["cascades"]["default"]["stages"][0].update({"threshold": 0.7, "scorers": [PROMPT_SCORE], **stage0})
    return cfg


async def _record(fake: FakeUpstream, cfg: dict[str, Any], n: int) -> dict[str, int]:
    """Through the proxy: n good answers accepted at stage 0 (users say good), n/2 bad ones accepted
    (users say bad) and n/2 bad ones escalated (free labels)."""
    sent = {"user": 0, "free": 0}
    async with proxy(cfg, fake) as (c, app):
        for i in range(n):
            for content, label in ((good(i), 1.0), (bad(i), 0.0) if i % 2 else (bad(i, 0.1), None)):
                r = await c.post("/v1/chat/completions", json=chat(content=content))
                assert r.status_code == 200, r.text
                stage = r.json()["cascade"]["stage"]
                if label is None:
                    assert stage == 1
                    sent["free"] += 1
                    continue
                assert stage == 0
                fb = await c.post("/v1/feedback", json={"id": r.json()["id"], "score": label})
                assert fb.status_code == 200
                sent["user"] += 1
        await settle(app)
    return sent


async def fit_scorer(*args: str) -> int:
    """``cascade fit-scorer ARGS`` (it runs its own event loop: off this test's)."""
    return await asyncio.to_thread(main, ["fit-scorer", *args])


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


async def test_fit_scorer_from_store_writes_a_learned_scorer_the_proxy_serves(
    fake: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url)
    sent = await _record(fake, cfg, 30)
    assert sent == {"user": 45, "free": 15}
    assert query(url, "SELECT count(*) FROM traces WHERE prompt_text IS NOT NULL") == [(60,)]

    out = tmp_path / "scorers"
    path = _write(tmp_path, cfg)
    code = await fit_scorer("--from-store", "--config", str(path), "--out", str(out), "--min-labels", "40")
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "60 labelled requests with text" in printed.out
    assert "stage0 (small): 60 answers (30 good, 30 bad; free 15, user 45)" in printed.out
    summary = json.loads((out / "cascade.json").read_text())
    assert summary["cascade"] == "default" and summary["upstreams"] == ["small", "large"]
    assert summary["stages"][0]["n"] == 60 and summary["feasible"] is True
    threshold = summary["thresholds"][0]
    assert 0.05 <= threshold <= 0.99
    snippet = yaml.safe_load((out / "cascade.yaml").read_text())
    stage0 = snippet["cascades"]["default"]["stages"][0]
    assert stage0["threshold"] == threshold
    assert stage0["scorers"] == [{"type": "learned", "model": str((out / "stage0.json").resolve())}]

    # The file loads as a learned-scorer model and tells the two kinds of answer apart.
    model = LogisticModel.load(out / "stage0.json")
    assert model.meta["source"] == "traces" and model.meta["n_train"] == 60
    scorer = model
    p_good = scorer.score(good(99), json.dumps({"messages": [good(99)]}))
    p_bad = scorer.score(bad(99), json.dumps({"messages": [bad(99)]}))
    assert 0.0 < p_bad < 0.5 < p_good < 1.0

    # ... and a cascade using it (the snippet's scorer and threshold) serves requests.
    served = base_config()
    served["upstreams"]["small"]["model"] = "echo"
    served["cascades"]["default"]["stages"][0] = {"upstream": "small", **stage0}
    learned = Learned(LearnedConfig(type="learned", model=stage0["scorers"][0]["model"]))
    async with proxy(served, fake) as (c, _):
        r_good = await c.post("/v1/chat/completions", json=chat(content=good(7)))
        r_bad = await c.post("/v1/chat/completions", json=chat(content=bad(7)))
    good_att = r_good.json()["cascade"]["attempts"][0]
    bad_att = r_bad.json()["cascade"]["attempts"][0]
    assert set(good_att["scores"]) == {"learned"} and set(bad_att["scores"]) == {"learned"}
    assert good_att["reasons"]["learned"].startswith("learned P(good) = ")
    assert good_att["threshold"] == pytest.approx(threshold)
    assert good_att["scores"]["learned"] >= threshold > bad_att["scores"]["learned"]
    assert r_good.json()["cascade"]["stage"] == 0 and r_bad.json()["cascade"]["stage"] == 1
    # The score in the reply is the model file's score of that answer: the scorer and the file agree.
    answer = r_good.json()["choices"][0]["message"]
    ctx = ScoreContext("default", 0, chat(content=good(7)), Answer(answer, "stop", {}, "small", 0), ())
    assert (await learned.score(ctx)).value == pytest.approx(good_att["scores"]["learned"])
    messages = chat(content=good(7))["messages"]
    assert scorer.score(messages_to_prompt(messages), answer["content"], finish_reason="stop") == (
        pytest.approx(good_att["scores"]["learned"])
    )


async def test_fit_scorer_from_store_needs_texts(
    fake: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url, store_text=False)
    await _record(fake, cfg, 4)
    path = _write(tmp_path, cfg)
    out = tmp_path / "out"
    assert await fit_scorer("--from-store", "--config", str(path), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "8 labelled requests of cascade 'default' but no texts" in err
    assert "learning.store_text is still off" in err
    assert not out.exists()


async def test_fit_scorer_from_store_needs_enough_labels(
    fake: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sqlite_url(tmp_path)
    cfg = _cfg(url)
    await _record(fake, cfg, 4)
    path = _write(tmp_path, cfg)
    out = tmp_path / "out"
    # Default: learning.min_labels (1000 here).
    assert await fit_scorer("--from-store", "--config", str(path), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "stage 0 (small): 8 labelled answers with text, need 1000" in err
    assert not out.exists()
    # Good answers only are not enough either.
    only_good = tmp_path / "good.db"
    cfg_good = _cfg(f"sqlite:///{only_good}")
    async with proxy(cfg_good, fake) as (c, app):
        for i in range(3):
            r = await c.post("/v1/chat/completions", json=chat(content=good(i)))
            assert (await c.post("/v1/feedback", json={"id": r.json()["id"], "score": 1})).status_code == 200
        await settle(app)
    path = _write(tmp_path, cfg_good)
    assert (
        await fit_scorer("--from-store", "--config", str(path), "--out", str(out), "--min-labels", "2") == 1
    )
    assert "all 3 labelled answers are good; a scorer needs both" in capsys.readouterr().err


def test_fit_scorer_usage_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert main(["fit-scorer", "data.jsonl", "--from-store", "--out", out]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["fit-scorer", "--out", out]) == 2
    assert "--from-store" in capsys.readouterr().err
    assert main(["fit-scorer", "--from-store", "--chain", "a,b", "--out", out]) == 2
    assert "--chain: only with DATASET.jsonl" in capsys.readouterr().err
    assert main(["fit-scorer", "data.jsonl", "--cascade", "x", "--out", out]) == 2
    assert "--cascade: only with --from-store" in capsys.readouterr().err
    no_learning = _write(tmp_path, base_config())
    assert main(["fit-scorer", "--from-store", "--config", str(no_learning), "--out", out]) == 2
    assert "no 'learning' section" in capsys.readouterr().err
    cfg = _write(tmp_path, _cfg(sqlite_url(tmp_path)))
    assert main(["fit-scorer", "--from-store", "--config", str(cfg), "--cascade", "nope", "--out", out]) == 2
    assert "no cascade 'nope'" in capsys.readouterr().err
    assert main(["fit-scorer", "--from-store", "--config", str(cfg), "--out", out]) == 1
    assert "no trace store at" in capsys.readouterr().err


def test_collect_builds_per_stage_examples_with_labels_and_weights() -> None:
    """Three stages: stage 1 sees stage 0's answer as ``previous``; a shadow label weighs 1/rate; a user
    label overrides a free one; traces that ran on other upstreams, or without texts, are left out."""
    ups = ["a", "b", "c"]

    def atts(tid: str, *stages: tuple[str, str, str | None]) -> list[Any]:
        return [
            (tid, k, up, outcome, "low_score" if outcome == "rejected" else outcome, 1e-6, "stop", text)
            for k, (up, outcome, text) in enumerate(stages)
        ]

    data = LabelledTexts(
        traces=[
            ("t1", 3, 2, 1e-4, "q1"),  # escalated to the last stage
            ("t2", 3, 0, 1e-4, "q2"),  # accepted at stage 0, shadowed (rate 0.25)
            ("t3", 3, 2, 1e-4, "q3"),  # ran on another upstream
            ("t4", 3, 0, 1e-4, None),  # no texts
        ],
        attempts=[
            *atts("t1", ("a", "rejected", "A1"), ("b", "rejected", "B1"), ("c", "accepted", "C1")),
            *atts("t2", ("a", "accepted", "A2")),
            *atts("t3", ("x", "rejected", "X3"), ("b", "rejected", "B3"), ("c", "accepted", "C3")),
            *atts("t4", ("a", "accepted", None)),
        ],
        labels=[
            (1, "t1", 0, "free", 0.0, 1.0, 0.0),
            (2, "t1", 1, "free", 1.0, 1.0, 0.0),
            (3, "t2", 0, "shadow", 1.0, 4.0, 1e-4),
            (4, "t3", 0, "free", 1.0, 1.0, 0.0),
            (5, "t4", None, "user", 1.0, 1.0, 0.0),
            (6, "t1", 0, "user", 0.75, 1.0, 0.0),
        ],
    )
    got = collect(data, ups)
    assert (got.labelled, got.with_text, got.other_upstreams) == (3, 2, 1)
    s0, s1 = got.stages
    assert [(e.prompt, e.answer, e.previous) for e in s0.examples] == [("q1", "A1", ()), ("q2", "A2", ())]
    assert s0.labels == [0.75, 1.0] and s0.weights == [1.0, 4.0]
    assert s0.sources == {"user": 1, "shadow": 1}
    assert [(e.prompt, e.answer, e.previous) for e in s1.examples] == [("q1", "B1", ("A1",))]
    assert s1.labels == [1.0] and s1.weights == [1.0] and s1.sources == {"free": 1}
