"""bench/prompt_signal.py: finds a signal planted in the prompts, none where there is none."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench import prompt_signal


def _write(root: Path) -> None:
    rng = np.random.default_rng(0)
    path = root / "routellm" / "gsm8k.jsonl"
    path.parent.mkdir(parents=True)
    with path.open("w") as f:
        for i in range(240):
            topic = ["geometry", "fractions", "history", "weather"][i % 4]
            words = " ".join(rng.choice(["a", "the", "of", "many", "some", "box", "car"], 8))
            models = {
                "cheap": {"answer": "1", "correct": topic in ("history", "weather"), "cost_usd": 0.001},
                "big": {"answer": "1", "correct": bool(rng.random() < 0.8), "cost_usd": 0.01},
            }
            row = {"id": str(i), "split": "train" if i % 2 else "test", "prompt": f"{words} {topic}?"}
            f.write(json.dumps({**row, "models": models}) + "\n")


def test_a_planted_signal_is_found_and_noise_reads_as_chance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path)
    assert prompt_signal.main(["--data", str(tmp_path), "--datasets", "gsm8k"]) == 0
    aucs = dict(
        re.findall(r"gsm8k\s+(\w+)\s+accuracy [\d.]+\s+out-of-fold AUC ([\d.]+)", capsys.readouterr().out)
    )
    assert float(aucs["cheap"]) > 0.95  # right exactly on two of the four topics
    assert 0.35 < float(aucs["big"]) < 0.65  # right at random


def test_missing_data_exits_2(tmp_path: Path) -> None:
    assert prompt_signal.main(["--data", str(tmp_path), "--datasets", "winogrande"]) == 2
