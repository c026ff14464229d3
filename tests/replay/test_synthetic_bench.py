"""bench/synthetic.py: generated worlds are reproducible and the benchmark runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.replay.dataset import load_dataset
from bench import synthetic


def test_a_world_is_the_same_every_time_and_worlds_differ() -> None:
    a, b, other = synthetic.generate(3, 60, 40), synthetic.generate(3, 60, 40), synthetic.generate(4, 60, 40)
    assert [(r.id, r.split, r.prompt) for r in a.rows] == [(r.id, r.split, r.prompt) for r in b.rows]
    assert [r.answers[m].answer for r in a.rows for m in a.models] == [
        r.answers[m].answer for r in b.rows for m in b.models
    ]
    assert len(a.train) == 60 and len(a.test) == 40 and len(a.models) == len(synthetic.MODELS)
    assert [r.answers[m].correct for r in a.rows for m in a.models] != [
        r.answers[m].correct for r in other.rows for m in other.models
    ]
    # a wrong answer is another letter; a right one the gold letter, whatever the decoration
    for r in a.rows:
        letters = {r.answers[m].answer.strip()[-1] for m in a.models if r.answers[m].correct}
        assert len(letters) <= 1


def test_the_benchmark_fits_and_judges_a_world(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        synthetic.main(["--worlds", "0:1", "--targets", "0.95", "--train", "300", "--test", "600", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (res,) = out["results"]
    assert 0.5 < res["quality_vs_best"] < 1.2 and res["gap"] == pytest.approx(res["quality_vs_best"] - 0.95)
    assert out["summary"]["0.95"]["worlds"] == 1
    # the agreement rule on the fit's chain, and the learned scorers swept to its quality on the test rows
    ag, swept = res["agreement"], res["learned_at_agreement_quality"]
    assert len(res["chain"]) >= 2 and len(ag["chain"]) == 3 and 0.5 < ag["quality_vs_best"] < 1.2
    assert swept is None or swept["quality_vs_best"] >= ag["quality_vs_best"] - 1e-9
    summary = out["summary"]["0.95"]
    assert summary["agreement_worlds"] == 1
    assert summary["learned_at_least_agreement"] + summary["agreement_unreached"] <= 1


def test_a_world_written_as_a_dataset_reads_back_as_one(tmp_path: Path) -> None:
    path = tmp_path / "world.jsonl"
    assert synthetic.main(["--write", "5", str(path), "--train", "50", "--test", "30"]) == 0
    back, made = load_dataset(path), synthetic.generate(5, 50, 30)
    assert len(back.train) == 50 and len(back.test) == 30 and back.models == made.models
    assert [r.answers[m].correct for r in back.rows for m in back.models] == [
        r.answers[m].correct for r in made.rows for m in made.models
    ]
