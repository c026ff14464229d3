"""`cascade replay` (offline and ``--online``) on dataset shapes unlike the shared ones: graded answers,
rows lacking a model, duplicate ids, odd costs. Each either replays (exit 0) or says what is wrong with
which row (exit 2), through the real HTTP path (real uvicorn, loopback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from tests.replay import synth

pytestmark = pytest.mark.loopback


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["replay", *args, "--json", "--quiet"])
    out = capsys.readouterr()
    last = out.out.rstrip("\n").rsplit("\n", 1)[-1]
    return code, (json.loads(last) if code == 0 else {}), out.err


def test_online_honours_pass_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A graded dataset (a score per answer, no 'correct') streams online with --pass-score, as it
    replays offline: the flag is not dropped on the way to the online run."""
    rows = synth.rows(n=120, seed=3)
    for r in rows:
        for rec in r["models"].values():
            rec["score"] = 9.0 if rec.pop("correct") else 3.0
    path = _write(tmp_path / "graded.jsonl", rows)
    code, rep, err = _replay(capsys, str(path), "--online", "--pass-score", "8")
    assert code == 0, err
    assert rep["requests"] == 120 and rep["errors"] == 0
