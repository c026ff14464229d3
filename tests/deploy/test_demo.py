"""scripts/demo against a live proxy on 127.0.0.1 (fake upstreams): grading, cost and stage accounting."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config, loopback_stack, upstream
from tests.deploy._tools import ROOT

DEMO = ROOT / "scripts" / "demo"


def _demo_module() -> Any:
    loader = SourceFileLoader("cascade_demo", str(DEMO))
    spec = importlib.util.spec_from_loader("cascade_demo", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


demo = _demo_module()


def test_bundled_questions() -> None:
    items = json.loads((ROOT / "scripts" / "demo_questions.json").read_text())["questions"]
    assert len(items) == 50
    assert len({i["q"] for i in items}) == 50
    for item in items:
        assert item["q"].strip() and item["answers"] and all(a.strip() for a in item["answers"]), item


def test_bundled_sentiment_set() -> None:
    bundle = json.loads((ROOT / "scripts" / "demo_sentiment.json").read_text())
    items, labels = bundle["questions"], bundle["labels"]
    assert len(items) == 50 and len({i["q"] for i in items}) == 50
    assert "{q}" in bundle["prompt"]
    said = [i["answers"] for i in items]
    assert said.count(["positive"]) == said.count(["negative"]) == 25
    assert {"neutral", "mixed"} <= set(labels)
    # the calibration set: other reviews, asked and graded the same way
    calib = json.loads((ROOT / "scripts" / "demo_sentiment_calibration.json").read_text())
    assert (calib["prompt"], calib["labels"]) == (bundle["prompt"], labels)
    said = [i["answers"] for i in calib["questions"]]
    assert len(said) == 60 and said.count(["positive"]) == said.count(["negative"]) == 30
    assert not {i["q"] for i in calib["questions"]} & {i["q"] for i in items}


@pytest.mark.parametrize(
    ("answer", "accepted", "right"),
    [
        ("Positive", ["positive"], True),
        ("Negative.", ["positive"], False),
        ("Positive, not negative", ["positive"], True),
        ("Positive, not negative", ["negative"], False),
        ("The sentiment of this review is neutral, with no negative emotion", ["negative"], False),
        ("Positively negative", ["negative"], True),  # whole words: "positively" is no label
        ("I cannot tell.", ["positive"], False),
        ("", ["negative"], False),
    ],
)
def test_grading_with_labels(answer: str, accepted: list[str], right: bool) -> None:
    assert demo.is_right(answer, accepted, ["positive", "negative", "neutral", "mixed"]) is right


@pytest.mark.parametrize(
    ("answer", "accepted", "right"),
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("paris", ["Paris"], True),
        ("Parisian food", ["Paris"], False),  # whole words only
        ("A spider has 8 legs.", ["8", "eight"], True),
        ("A spider has 18 legs.", ["8", "eight"], False),
        ("It is the Pacific Ocean.", ["Pacific"], True),
        ("Leonardo da Vinci painted it", ["Leonardo da Vinci", "da Vinci"], True),
        ("H₂O", ["H2O", "H₂O"], True),
        ("", ["Paris"], False),
    ],
)
def test_grading(answer: str, accepted: list[str], right: bool) -> None:
    assert demo.is_right(answer, accepted) is right


def _cascade(tiny_says: str, big_says: str) -> dict[str, Any]:
    cfg = base_config()
    cfg["upstreams"] = {
        "tiny": upstream(f"answer-{tiny_says}", price={"input": 0.02, "output": 0.02}),
        "big": upstream(f"answer-{big_says}", price={"input": 0.08, "output": 0.08}),
    }
    cfg["cascades"] = {
        "default": {
            "stages": [
                {"upstream": "tiny", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
                {"upstream": "big"},
            ]
        }
    }
    return cfg


async def _run_demo(
    tmp_path: Path, cfg: dict[str, Any], bundle: dict[str, Any]
) -> tuple[int, dict[str, Any] | None, str, list[dict[str, Any]]]:
    """scripts/demo --json against a live proxy on `cfg`: exit status, report, stderr, upstream bodies."""
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(bundle))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(cfg))  # JSON is YAML: --largest comes from the last stage
    async with loopback_stack(cfg) as (proxy_v1, fake, _registry):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(DEMO),
            "--url",
            proxy_v1.removesuffix("/v1"),
            "--questions",
            str(questions),
            "--config",
            str(config),
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    report = json.loads(out) if proc.returncode == 0 else None
    return proc.returncode or 0, report, err.decode(), [r["body"] for r in fake.requests]


@pytest.mark.anyio
@pytest.mark.loopback
async def test_demo_against_a_live_cascade(tmp_path: Path) -> None:
    """Stage 0 always says Paris (accepted), the largest always says Tokyo: each is right once."""
    bundle = {
        "questions": [
            {"q": "What is the capital of France?", "answers": ["Paris"]},
            {"q": "What is the capital of Japan?", "answers": ["Tokyo"]},
        ]
    }
    rc, report, err, bodies = await _run_demo(
        tmp_path, _cascade("The_capital_is_Paris.", "It_is_Tokyo."), bundle
    )
    assert rc == 0 and report is not None, err
    assert report["largest"] == "big"
    c, big = report["runs"]["cascade"], report["runs"]["largest"]
    assert (c["right"], big["right"], c["questions"]) == (1, 1, 2)
    assert report["stages"] == {"0": 2}
    assert c["failed"] == big["failed"] == 0
    # Same prompts, a quarter of the price per token: the cascade's cost is below the largest's.
    assert 0 < c["cost_usd"] < big["cost_usd"]
    assert [a["cascade"] for a in report["answers"]] == ["The capital is Paris."] * 2
    assert len(bodies) == 4
    assert bodies[0]["messages"] == [
        {"role": "user", "content": "What is the capital of France? Answer in a few words."}
    ]


@pytest.mark.anyio
@pytest.mark.loopback
async def test_demo_classification_set(tmp_path: Path) -> None:
    """A set with `prompt` and `labels`: the template is what the models are asked, and an answer is
    graded by the first label it names."""
    bundle = {
        "prompt": "Review: {q}\nSentiment:",
        "labels": ["positive", "negative", "neutral"],
        "questions": [
            {"q": "Love it.", "answers": ["positive"]},
            {"q": "Hate it.", "answers": ["negative"]},
        ],
    }
    rc, report, err, bodies = await _run_demo(
        tmp_path, _cascade("Positive,_not_negative.", "Neutral,_leaning_negative."), bundle
    )
    assert rc == 0 and report is not None, err
    c, big = report["runs"]["cascade"], report["runs"]["largest"]
    # "Positive, not negative." is right for the positive review only; "Neutral, ..." for neither.
    assert (c["right"], big["right"]) == (1, 0)
    assert [b["messages"][0]["content"] for b in bodies] == [
        "Review: Love it.\nSentiment:",
        "Review: Hate it.\nSentiment:",
    ] * 2


@pytest.mark.anyio
@pytest.mark.loopback
async def test_demo_refuses_a_prompt_without_the_question(tmp_path: Path) -> None:
    bundle = {"prompt": "Sentiment:", "questions": [{"q": "Love it.", "answers": ["positive"]}]}
    rc, report, err, bodies = await _run_demo(tmp_path, _cascade("Positive", "Positive"), bundle)
    assert rc == 2 and report is None
    assert "'prompt' has no {q}" in err
    assert bodies == []
