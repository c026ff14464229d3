"""bench/embedding_signal.py: the cut-off bound it reports, and a clear exit without its dependency."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bench import embedding_signal


def test_the_best_cut_off_accuracy_is_the_best_split_of_the_ranked_similarities() -> None:
    sims = np.array([0.9, 0.8, 0.3, 0.2])
    # Similar pairs are the good ones: a cut-off between 0.8 and 0.3 labels every row right.
    assert embedding_signal.best_cutoff_accuracy(sims, np.array([1.0, 1.0, 0.0, 0.0])) == 1.0
    # The other way round no cut-off beats saying the same for every row (half of them).
    assert embedding_signal.best_cutoff_accuracy(sims, np.array([0.0, 0.0, 1.0, 1.0])) == 0.5
    # One good row among the least similar: at best 3 of 4 right (the top two, or every row, "as good").
    assert embedding_signal.best_cutoff_accuracy(sims, np.array([1.0, 1.0, 0.0, 1.0])) == 0.75


@pytest.mark.skipif(importlib.util.find_spec("wordllama") is not None, reason="wordllama is installed")
def test_without_wordllama_it_exits_2_saying_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert embedding_signal.main(["--data", str(tmp_path)]) == 2
    assert "pip install wordllama" in capsys.readouterr().err
