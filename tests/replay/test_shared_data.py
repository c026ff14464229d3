"""The GSM8K target through the real HTTP path, on the shared data when it is there (skipped otherwise).

WinoGrande and MBPP take ~15 s each to fit (11 models, 231 chains): `python bench/replay.py` checks all
three targets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.replay.runner import ReplayOptions, run_replay

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "routellm" / "gsm8k.jsonl"

pytestmark = [
    pytest.mark.loopback,
    pytest.mark.slow,
    pytest.mark.skipif(not GSM8K.is_file(), reason="shared data (../shared/data) is not present"),
]


def test_gsm8k_target_through_http() -> None:
    """>= 95 % of GPT-4's accuracy with <= 50 % of the requests escalated to it (test split)."""
    result = run_replay(ReplayOptions(str(GSM8K)))
    rep = result.report
    assert not result.errors
    assert rep["n_test"] > 600 and len(rep["stages"]) == 2
    assert rep["best_single"]["model"] == rep["stages"][-1] == "gpt-4-1106-preview"
    assert rep["quality_vs_best"] >= 0.95
    assert rep["escalation_rate"][-1] <= 0.5
