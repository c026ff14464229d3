"""`cascade replay` reports whether its learned scorers' probabilities hold on the test rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from app.replay.calibration import calibration
from tests.replay import synth

pytestmark = pytest.mark.loopback


def test_calibration_figures() -> None:
    # Right exactly as often as said, bin by bin: no calibration error, and the AUC of a score that ranks.
    scores = [0.15] * 20 + [0.85] * 20
    right = [i < 3 for i in range(20)] + [i < 17 for i in range(20)]
    c = calibration(scores, right)
    assert c["n"] == 40 and c["ece"] == 0.0 and c["mean_score"] == c["accuracy"] == 0.5
    assert c["brier"] == pytest.approx(0.1275) and c["auc"] == 0.85  # ties count a half
    # Said 0.9, never right: off by 0.9, and a constant ranks nothing.
    c = calibration([0.9] * 50, [False] * 50)
    assert c["ece"] == 0.9 and c["brier"] == 0.81 and c["auc"] == 0.5
    # What chance alone leaves a calibrated score: more on fewer rows, never nothing.
    few, many = calibration([0.7] * 50, [True] * 35 + [False] * 15), calibration([0.7] * 2000, [True] * 2000)
    assert 0 < many["ece_if_calibrated"] < few["ece_if_calibrated"] < 0.1
    assert calibration([], [])["ece"] is None


def test_the_replay_report_checks_each_learned_scorer_on_the_test_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = synth.write(tmp_path / "syn.jsonl", n=600, seed=5)
    assert main(["replay", str(path), "--json", "--target-quality", "0.97"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.rstrip("\n").rsplit("\n", 1)[-1])
    cal = rep["calibration"]
    assert len(rep["stages"]) >= 2 and [c["stage"] for c in cal] == list(range(len(rep["stages"]) - 1))
    for c in cal:
        # Every test row's answer of that stage's model, scored after the answers before it.
        assert c["model"] == rep["stages"][c["stage"]] and c["n"] == rep["n_test"]
        assert c["accuracy"] == pytest.approx(rep["single_models"][c["model"]]["accuracy"], abs=1e-4)
        assert abs(c["mean_score"] - c["accuracy"]) < 0.1 and c["ece"] < 0.15 and c["auc"] > 0.6
        assert 0 < c["ece_if_calibrated"] < 0.1 and 0 < c["brier"] < 0.25
    assert "learned scorers on the test rows" in out and "calibration error" in out
