import json
import math
from pathlib import Path

import pytest

from app.learning.train import StageExample, crossfit_stage_scorer, fit_cascade
from app.replay.dataset import (
    DEFAULT_PRICES,
    FALLBACK_PRICE,
    best_single,
    estimate_cost_usd,
    hash_split,
    load_dataset,
    model_summary,
    oracle,
)
from app.replay.simulate import replay_report, simulate
from app.scoring.model import LogisticModel


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _mc_rows(n: int) -> list[dict[str, object]]:
    """Synthetic 2-choice task: 'weak' is right on even rows; 'strong' always; costs 1 and 10 (micro-USD)."""
    rows: list[dict[str, object]] = []
    for i in range(n):
        gold = "A" if i % 3 else "B"
        wrong = "B" if gold == "A" else "A"
        weak_ok = i % 2 == 0
        rows.append(
            {
                "id": f"r{i}",
                "dataset": "toy",
                "split": "train" if i < n * 2 // 3 else "test",
                "prompt": f"Question {i}?\nA) x\nB) y\nAnswer:",
                "reference": gold,
                "models": {
                    "weak": {
                        "answer": gold if weak_ok else f"I think {wrong}, not sure",
                        "correct": weak_ok,
                        "cost_usd": 1e-6,
                    },
                    "strong": {"answer": gold, "correct": True, "cost_usd": 1e-5},
                },
            }
        )
    return rows


def test_load_dataset_with_splits_and_costs(tmp_path: Path) -> None:
    ds = load_dataset(_write(tmp_path / "toy.jsonl", _mc_rows(30)))
    assert ds.name == "toy"
    assert ds.models == ["weak", "strong"]
    assert len(ds.train) == 20 and len(ds.test) == 10
    assert not ds.split_from_hash and not ds.cost_estimated
    summ = model_summary(ds.test, ds.models)
    assert summ["strong"].accuracy == 1.0
    assert summ["weak"].mean_cost_usd == pytest.approx(1e-6)
    assert best_single(summ) == "strong"
    orc = oracle(ds.test, ds.models)
    assert orc.accuracy == 1.0
    assert orc.mean_cost_usd == pytest.approx((5 * 1e-6 + 5 * 1e-5) / 10)
    orc_c = oracle(ds.test, ds.models, cascade=True)
    assert orc_c.mean_cost_usd == pytest.approx((5 * 1e-6 + 5 * 1.1e-5) / 10)


def test_load_dataset_hash_split_contaminated_and_estimated_cost(tmp_path: Path) -> None:
    rows = [
        {
            "id": f"q{i}",
            "prompt": "p" * 400,
            "contaminated": i == 0,
            "models": {
                "mistralai/Mixtral-8x7B-Instruct-v0.1": {"answer": "a" * 40, "correct": i % 2 == 0},
                "gpt-4-1106-preview": {"answer": "b" * 40, "correct": 1},
                "partial-model": {"answer": "c", "score": 1.0},
            }
            if i < 5
            else {
                "mistralai/Mixtral-8x7B-Instruct-v0.1": {"answer": "a" * 40, "correct": False},
                "gpt-4-1106-preview": {"answer": "b" * 40, "score": 0.0},
            },
        }
        for i in range(40)
    ]
    ds = load_dataset(_write(tmp_path / "g.jsonl", rows), pass_score=0.5)
    assert ds.n_dropped_contaminated == 1 and len(ds.rows) == 39
    assert ds.split_from_hash and ds.cost_estimated
    assert ds.partial_models == ["partial-model"]
    assert {r.split for r in ds.rows} == {"train", "test"}
    assert all(r.split == hash_split(r.id) for r in ds.rows)
    r = ds.rows[0]
    # 400 chars -> 100 tokens in, 40 chars -> 10 tokens out
    assert r.answers["gpt-4-1106-preview"].cost_usd == pytest.approx((100 * 10 + 10 * 30) / 1e6)
    assert r.answers["mistralai/Mixtral-8x7B-Instruct-v0.1"].cost_usd == pytest.approx(110 * 0.6 / 1e6)
    assert r.answers["gpt-4-1106-preview"].cost_estimated
    assert ds.rows[-1].answers["gpt-4-1106-preview"].correct is False
    assert ds.models[0].startswith("mistralai")
    assert estimate_cost_usd("some/unknown-model", "x" * 4, "y" * 4) == pytest.approx(
        sum(FALLBACK_PRICE) / 1e6
    )
    assert estimate_cost_usd("X", "a", "b", prices={"x": (1e6, 0.0)}) == pytest.approx(1.0)
    assert "gpt-4-1106-preview" in DEFAULT_PRICES


def test_hash_split_is_deterministic_and_balanced() -> None:
    splits = [hash_split(f"id{i}") for i in range(2000)]
    assert splits == [hash_split(f"id{i}") for i in range(2000)]
    assert 0.45 < splits.count("test") / 2000 < 0.55


def test_load_dataset_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text("{not json}\n")
    with pytest.raises(ValueError, match="line 1"):
        load_dataset(p)
    p.write_text("\n")
    with pytest.raises(ValueError):
        load_dataset(p)


def test_fit_stage_scorer_learns_hedging() -> None:
    ex = [StageExample("Q?", "A"), StageExample("Q?", "I think B, not sure")] * 20
    labels = [True, False] * 20
    m = crossfit_stage_scorer(ex, labels).model
    s = m
    assert s.score("Q?", "B") > 0.5 > s.score("Q?", "I think A, maybe")


def test_fit_cascade_and_simulate(tmp_path: Path) -> None:
    ds = load_dataset(_write(tmp_path / "toy.jsonl", _mc_rows(90)))
    fitted = fit_cascade(ds.train, ds.models, target_quality=0.97, relative=True, margin_z=0.0)
    assert fitted.feasible
    assert fitted.models == ["weak", "strong"]
    assert len(fitted.thresholds) == 1 and 0.0 <= fitted.thresholds[0] <= 1.0
    assert fitted.train["quality"] >= 0.97 * fitted.train["best_single_quality"]
    assert fitted.train["quality_vs_best_corrected"] >= 0.97 - 1e-9
    run = simulate(fitted, ds.test)
    assert run.accuracy >= 0.95
    assert run.escalation_rate[0] == 1.0 and run.escalation_rate[1] == pytest.approx(0.5, abs=0.15)
    rep = replay_report(ds, fitted, run)
    assert rep["stages"] == ["weak", "strong"] and rep["n_test"] == 30
    assert rep["savings_vs_best"] > 0.3 and rep["quality_vs_best"] >= 0.95
    assert set(rep) >= {
        "dataset",
        "n_train",
        "n_test",
        "thresholds",
        "accuracy",
        "cost_usd",
        "escalation_rate",
        "best_single",
        "single_models",
        "oracle",
    }
    paths = fitted.save(tmp_path / "out")
    scorer = LogisticModel.load(paths["stage0"])
    r = ds.test[0]
    assert math.isclose(
        scorer.score(r.prompt, r.answers["weak"].answer), fitted.score(0, r.prompt, r.answers["weak"].answer)
    )
    json.loads(Path(paths["cascade"]).read_text())
    # a fixed chain is honoured
    fixed = fit_cascade(ds.train, target_quality=0.5, relative=False, chain=["weak", "strong"], margin_z=0.0)
    assert fixed.models == ["weak", "strong"]


def test_grid_budget_gives_a_lone_scored_stage_every_observed_score() -> None:
    from app.learning.thresholds import GRID_BUDGET, candidates_per_stage

    assert candidates_per_stage(1) == GRID_BUDGET
    assert candidates_per_stage(2) == 40
    assert candidates_per_stage(1, budget=10) == 40  # never fewer than asked for
    # three thresholds: the budget bounds the grid (11^3 = 1,331 <= 1,600 < 12^3), never 40^3
    assert candidates_per_stage(3) == 11 and candidates_per_stage(3, budget=27) == 3


def test_two_stage_fit_takes_the_cheapest_of_every_observed_threshold(tmp_path: Path) -> None:
    """A two-stage cascade's threshold is searched over every out-of-fold score, not 40 quantiles: the
    pick is the cheapest cut over all of them that reaches the aim (brute force agrees)."""
    import numpy as np

    from tests.replay import synth

    ds = load_dataset(synth.write(tmp_path / "syn.jsonl", n=600, seed=3))
    chain = ["acme/tiny-1", "Zeta/Large-X"]
    fitted = fit_cascade(ds.train, target_quality=0.95, chain=chain, margin_z=0.0, router=False)
    s = np.asarray(fitted.oof_scores[0])
    assert np.unique(s).size > 60  # more distinct scores than the old 40 quantiles
    c = np.asarray([[r.answers[m].correct for m in chain] for r in ds.train], dtype=float)
    k = np.asarray([[r.answers[m].cost_usd for m in chain] for r in ds.train])
    ref, aim = fitted.train["best_single_quality"], fitted.train["aim"]
    best: tuple[float, int] | None = None
    for t in [-math.inf, *np.unique(s).tolist(), math.inf]:
        take = s >= t
        q = float(np.where(take, c[:, 0], c[:, 1]).mean()) / ref
        cost = float((k[:, 0] + np.where(take, 0.0, k[:, 1])).mean())
        if q >= aim - 1e-12 and (best is None or cost < best[0]):
            best = (cost, int(take.sum()))
    assert best is not None and fitted.feasible
    assert int((s >= fitted.thresholds[0]).sum()) == best[1]
    assert fitted.train["cost_usd"] == pytest.approx(best[0], rel=1e-9)
