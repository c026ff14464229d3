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


@pytest.mark.anyio
@pytest.mark.loopback
async def test_demo_against_a_live_cascade(tmp_path: Path) -> None:
    """Stage 0 always says Paris (accepted), the largest always says Tokyo: each is right once."""
    cfg = base_config()
    cfg["upstreams"] = {
        "tiny": upstream("answer-The_capital_is_Paris.", price={"input": 0.02, "output": 0.02}),
        "big": upstream("answer-It_is_Tokyo.", price={"input": 0.08, "output": 0.08}),
    }
    cfg["cascades"] = {
        "default": {
            "stages": [
                {"upstream": "tiny", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
                {"upstream": "big"},
            ]
        }
    }
    questions = tmp_path / "q.json"
    questions.write_text(
        json.dumps(
            {
                "questions": [
                    {"q": "What is the capital of France?", "answers": ["Paris"]},
                    {"q": "What is the capital of Japan?", "answers": ["Tokyo"]},
                ]
            }
        )
    )
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
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["largest"] == "big"
    c, big = report["runs"]["cascade"], report["runs"]["largest"]
    assert (c["right"], big["right"], c["questions"]) == (1, 1, 2)
    assert report["stages"] == {"0": 2}
    assert c["failed"] == big["failed"] == 0
    # Same prompts, a quarter of the price per token: the cascade's cost is below the largest's.
    assert 0 < c["cost_usd"] < big["cost_usd"]
    assert [a["cascade"] for a in report["answers"]] == ["The capital is Paris."] * 2
    assert len(fake.requests) == 4
