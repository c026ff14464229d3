"""`cascade replay --resplits`, the baselines in every report, and datasets a replay cannot use."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.learning.rows import ModelAnswer, Row
from app.replay.baselines import agreement_rule, baselines, oracle_chain, random_at_reach
from app.replay.dataset import load_dataset, quality_vs_best_se, resplit
from tests.replay import synth

pytestmark = pytest.mark.loopback


def _json_line(out: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(out.rstrip("\n").rsplit("\n", 1)[-1])
    return obj


def _row(i: int, answers: dict[str, tuple[str, bool, float]]) -> Row:
    return Row(
        f"r{i}",
        "Pick one.\nA) x\nB) y",
        "test",
        {m: ModelAnswer(a, ok, cost) for m, (a, ok, cost) in answers.items()},
    )


ROWS = [
    # cheap and mid agree and are right; cheap and mid agree and are wrong; they disagree (big decides)
    _row(0, {"cheap": ("A", True, 1.0), "mid": ("A", True, 2.0), "big": ("A", True, 10.0)}),
    _row(1, {"cheap": ("B", False, 1.0), "mid": ("B", False, 2.0), "big": ("A", True, 10.0)}),
    _row(2, {"cheap": ("A", False, 1.0), "mid": ("B", True, 2.0), "big": ("B", True, 10.0)}),
    _row(3, {"cheap": ("B", True, 1.0), "mid": ("A", False, 2.0), "big": ("B", True, 10.0)}),
]


def test_baselines_by_hand() -> None:
    acc, cost = agreement_rule(ROWS, "cheap", "mid", "big")
    assert acc == pytest.approx(3 / 4)  # row 1: the agreeing pair is wrong
    assert cost == pytest.approx((3 + 3 + 13 + 13) / 4)
    acc, cost = oracle_chain(ROWS, ["cheap", "mid", "big"])
    assert acc == 1.0 and cost == pytest.approx((1 + 13 + 3 + 1) / 4)
    # random at reach (1, 0.5, 0.25): serve cheap 50 %, mid 25 %, big 25 %
    acc, cost = random_at_reach(ROWS, ["cheap", "mid", "big"], [1.0, 0.5, 0.25])
    assert acc == pytest.approx(0.5 * 0.5 + 0.25 * 0.5 + 0.25 * 1.0)
    assert cost == pytest.approx(1.0 + 0.5 * 2.0 + 0.25 * 10.0)
    # with a router that sent 40 % straight to big, a report counts reach (0.6, 0.3, 0.6): of the 60 %
    # routed nowhere, cheap serves 30 %, mid 10 %, big 20 %, and big the routed 40 % (never over 1)
    acc, cost = random_at_reach(ROWS, ["cheap", "mid", "big"], [0.6, 0.3, 0.6], routed=0.4)
    assert acc == pytest.approx(0.3 * 0.5 + 0.1 * 0.5 + 0.6 * 1.0)
    assert cost == pytest.approx(0.6 * 1.0 + 0.3 * 2.0 + 0.6 * 10.0)
    routed = baselines(ROWS, ["cheap", "mid", "big"], ["cheap", "mid", "big"], [0.6, 0.3, 0.6], routed=0.4)
    assert routed["random"]["accuracy"] == pytest.approx(0.8)
    b = baselines(ROWS, ["cheap", "mid", "big"], ["cheap", "mid", "big"], [1.0, 0.5, 0.25])
    assert b["best_single"]["model"] == "big" and b["best_single"]["quality_vs_best"] == 1.0
    assert b["agreement"]["quality_vs_best"] == pytest.approx(0.75)
    assert b["agreement"]["savings_vs_best"] == pytest.approx(1 - 8.0 / 10.0)
    assert b["oracle_all"]["quality_vs_best"] == 1.0
    # a two-model chain: the rule takes the middle model that is cheapest at the target on train
    two = baselines(
        ROWS, ["cheap", "mid", "big"], ["cheap", "big"], [1.0, 0.5], train=ROWS, target_quality=0.7
    )
    assert two["agreement"]["chain"] == ["cheap", "mid", "big"]
    assert baselines(ROWS, ["cheap", "big"], ["big"], [1.0])["agreement"] is None


def test_baselines_mean_pairs_the_cascade_with_the_splits_that_have_the_baseline() -> None:
    """Where the fit serves one model alone a split has no agreement rule: the rule's mean is over the
    other splits, and the cascade's mean beside it too (over all five it read as the rule saving more,
    on a generated world where the fit saved more on every split that had the rule)."""
    from types import SimpleNamespace

    from app.replay.runner import _aggregate

    def run(seed: int, q: float, sav: float, rule: tuple[float, float] | None) -> Any:
        ag = None if rule is None else {"quality_vs_best": rule[0], "savings_vs_best": rule[1]}
        report = {
            "quality_vs_best": q, "savings_vs_best": sav, "stages": ["a"], "thresholds": [],
            "escalation_rate": [1.0], "calibration": [], "baselines": {"agreement": ag},
        }  # fmt: skip
        return SimpleNamespace(report=report, split=SimpleNamespace(seed=seed, index=seed))

    runs = [
        run(0, 0.97, 0.94, (1.01, 0.89)),
        run(1, 0.95, 0.94, None),
        run(2, 0.95, 0.43, None),
        run(3, 0.94, 0.42, None),
        run(4, 0.97, 0.94, (1.05, 0.84)),
    ]
    first: dict[str, Any] = dict(runs[0].report)
    _aggregate(first, runs, 0.95, 0.01)
    m = first["baselines_mean"]["agreement"]
    assert m["splits"] == 2
    assert m["savings_vs_best"] == pytest.approx(0.865)
    assert m["cascade_savings_vs_best"] == pytest.approx(0.94)  # not 0.734, the mean over all five
    assert m["cascade_quality_vs_best"] == pytest.approx(0.97)
    assert first["savings_vs_best_mean"] == pytest.approx(0.734)
    assert first["quality_vs_best_se_mean"] is None and first["test_noise_miss_chance"] is None  # none given
    # Splits whose cascade answers as the best model does on every row: no noise, no miss by chance.
    for run_ in runs:
        run_.report["quality_vs_best_se"] = 0.0
    first = dict(runs[0].report)
    _aggregate(first, runs, 0.95, 0.01)
    assert first["quality_vs_best_se_mean"] == 0.0 and first["test_noise_miss_chance"] == 0.0
    for run_, se in zip(runs, (0.01, 0.02, 0.01, 0.02, 0.015), strict=True):
        run_.report["quality_vs_best_se"] = se
    _aggregate(first, runs, 0.95, 0.01)
    assert first["quality_vs_best_se_mean"] == pytest.approx(0.015)
    assert first["test_noise_miss_chance"] == pytest.approx(0.2525, abs=1e-3)  # P(Z < -0.01 / 0.015)


def test_quality_se_is_the_test_rows_spread() -> None:
    """The standard error a replay reports beside quality_vs_best is what another draw of as many test
    rows does to the same policy's figure: checked against a bootstrap of those rows."""
    rng = random.Random(3)
    best = [rng.random() < 0.85 for _ in range(600)]
    # the cascade agrees with the best model on most rows, and is wrong where it does not on 3 in 4
    mine = [b if rng.random() < 0.8 else rng.random() < 0.25 for b in best]
    se = quality_vs_best_se(mine, best)
    assert se is not None
    boot = []
    for _ in range(2000):
        idx = [rng.randrange(600) for _ in range(600)]
        boot.append(sum(mine[i] for i in idx) / sum(best[i] for i in idx))
    mean = sum(boot) / len(boot)
    sd = math.sqrt(sum((x - mean) ** 2 for x in boot) / (len(boot) - 1))
    assert se == pytest.approx(sd, rel=0.1)
    assert quality_vs_best_se(best, best) == 0.0  # the same answers as the best: no spread at all
    assert quality_vs_best_se([True, False], [False, False]) is None  # the best never right: fixed at 1.0
    assert quality_vs_best_se([True], [True]) is None


def test_resplit_keeps_sizes_and_strata() -> None:
    rows = [_row(i, {"m": ("A", i % 3 == 0, 1.0)}) for i in range(60)]
    strata = [r.answers["m"].correct for r in rows]
    new = resplit(rows, 20, seed=5, strata=strata)
    test = [r for r in new if r.split == "test"]
    assert len(test) == 20 and len(new) == 60
    assert sum(r.answers["m"].correct for r in test) == 7  # 20 of 60 rows, a third of them right: 6.67
    assert [r.split for r in resplit(rows, 20, seed=5, strata=strata)] == [r.split for r in new]
    assert [r.split for r in resplit(rows, 20, seed=6, strata=strata)] != [r.split for r in new]


def test_resplits_through_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = synth.write(tmp_path / "syn.jsonl", n=150, seed=11)
    args = ["replay", str(path), "--json", "--quiet", "--concurrency", "4", "--target-quality", "0.9"]
    assert main(args) == 0
    single = _json_line(capsys.readouterr().out)
    assert main([*args, "--resplits", "3", "--seed", "40"]) == 0
    out = capsys.readouterr().out
    rep = _json_line(out)
    # the first split is the dataset's own: today's keys hold what a plain replay reports
    for key in ("stages", "thresholds", "accuracy", "quality_vs_best", "savings_vs_best", "n_test"):
        assert rep[key] == single[key], key
    splits = rep["resplits"]
    assert [s["seed"] for s in splits] == [None, 41, 42]
    assert splits[0]["quality_vs_best"] == rep["quality_vs_best"]
    q = [s["quality_vs_best"] for s in splits]
    assert rep["quality_vs_best_min"] == min(q)
    assert rep["quality_vs_best_mean"] == pytest.approx(sum(q) / 3)
    assert rep["savings_vs_best_mean"] == pytest.approx(sum(s["savings_vs_best"] for s in splits) / 3)
    met = [s["quality_vs_best"] >= 0.9 - 0.01 for s in splits]
    assert [s["target_met"] for s in splits] == met
    assert rep["target_met_share"] == pytest.approx(sum(met) / 3)
    assert splits[0]["calibration"] == rep["calibration"]  # each split's check of its own scorers
    # the test rows' own noise: per split, and what it does to a cascade exactly on target
    assert splits[0]["quality_vs_best_se"] == rep["quality_vs_best_se"]
    ses = [s["quality_vs_best_se"] for s in splits]
    assert all(0 < x < 0.5 for x in ses)
    assert rep["quality_vs_best_se_mean"] == pytest.approx(sum(ses) / 3)
    assert rep["test_noise_miss_chance"] == pytest.approx(
        0.5 * math.erfc(0.01 / (rep["quality_vs_best_se_mean"] * math.sqrt(2)))
    )
    assert "the test rows alone move a split's quality by" in out
    # what each fit expected of itself on its train rows, and their luck on top of the test rows'
    for s in splits:
        fit = s["fit"]
        assert fit["n_train"] == rep["n_train"]
        assert fit["expected_quality_vs_best"] == pytest.approx(fit["quality_vs_best"] - fit["optimism"])
        assert 0 <= fit["optimism"] < 0.2 and 0 <= fit["quality_vs_best_se"] < 0.5
    assert rep["fit"] == splits[0]["fit"]
    fit_se = sum(s["fit"]["quality_vs_best_se"] for s in splits) / 3
    assert rep["fit_quality_vs_best_se_mean"] == pytest.approx(fit_se)
    both = math.hypot(rep["quality_vs_best_se_mean"], fit_se)
    assert rep["noise_miss_chance"] == pytest.approx(0.5 * math.erfc(0.01 / (both * math.sqrt(2))))
    assert rep["noise_miss_chance"] >= rep["test_noise_miss_chance"]
    assert f"the fit on its {rep['n_train']} train rows: quality vs best" in out
    assert "and the train rows' luck moves the fit's aim by" in out
    # a fit on ~100 train rows is a few points unsure of itself, more than twice the tolerance: the table
    # says so, and says nothing where the tolerance is wider
    first_se = rep["fit"]["quality_vs_best_se"]
    assert 0.02 < first_se < 0.1
    assert f"note: the fit's own standard error ({first_se:.3f}, from {rep['n_train']} train rows)" in out
    assert main([*args, "--tolerance", "0.05"]) == 0
    assert "note: the fit's own standard error" not in capsys.readouterr().out
    for s in splits:
        assert [c["stage"] for c in s["calibration"]] == list(range(len(s["stages"]) - 1))
        assert {"best_single", "agreement", "random", "oracle_chain", "oracle_all"} <= set(s["baselines"])
        b = s["baselines"]
        assert b["oracle_all"]["quality_vs_best"] >= b["oracle_chain"]["quality_vs_best"] - 1e-9
    for name in ("agreement", "random", "oracle_chain", "oracle_all", "best_single"):
        b = rep["baselines"][name]
        if b is not None:
            assert {"quality_vs_best", "savings_vs_best"} <= set(b)
        # the mean over the splits that have the baseline, with the cascade's over the same splits
        have = [s for s in splits if s["baselines"][name] is not None]
        m = rep["baselines_mean"][name]
        if not have:
            assert m is None
            continue
        assert m["splits"] == len(have)
        bq = [s["baselines"][name]["quality_vs_best"] for s in have]
        assert m["quality_vs_best"] == pytest.approx(sum(bq) / len(have))
        assert m["cascade_quality_vs_best"] == pytest.approx(
            sum(s["quality_vs_best"] for s in have) / len(have)
        )
        assert m["cascade_savings_vs_best"] == pytest.approx(
            sum(s["savings_vs_best"] for s in have) / len(have)
        )
    assert "re-splits (3)" in out and "agreement rule" in out and "oracle within the chain" in out
    # the splits really differ: the re-splits' test rows are not the dataset's
    assert len({s["quality_vs_best"] for s in splits} | {s["savings_vs_best"] for s in splits}) > 2


def _graded(tmp_path: Path) -> Path:
    rows = synth.rows(n=60, seed=2)
    for r in rows:
        for rec in r["models"].values():
            rec["score"] = 9.0 if rec.pop("correct") else 3.0
    path = tmp_path / "graded.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_datasets_without_correctness_exit_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = synth.rows(n=30, seed=1)
    del rows[4]["models"]["bolt-mid"]["correct"]
    bad = tmp_path / "unlabelled.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["replay", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "line 5" in err and "syn-4" in err and "models.bolt-mid" in err and "'correct'" in err

    graded = _graded(tmp_path)
    assert main(["replay", str(graded), "--quiet"]) == 2
    assert "--pass-score" in capsys.readouterr().err
    ds = load_dataset(graded, pass_score=8)
    assert all(a.correct == (a.score == 9.0) for r in ds.rows for a in r.answers.values())


def test_scores_of_only_0_and_1_are_read_as_right_and_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RouterBench's own format (a 0/1 'score', no 'correct') replays as the same rows with 'correct'
    would, through the proxy, and says so; a graded scale (another score, or 1s alone) still needs
    --pass-score, naming where."""
    rows = synth.rows(n=80, seed=5)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for r in rows:
        for rec in r["models"].values():
            rec["score"] = 1 if rec.pop("correct") else 0
    scored = tmp_path / "scored.jsonl"
    scored.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    assert main(["replay", str(labelled), "--json", "--quiet"]) == 0
    want = _json_line(capsys.readouterr().out)
    assert main(["replay", str(scored), "--json", "--quiet"]) == 0
    got = _json_line(capsys.readouterr().out)
    assert got["data"]["scores_as_correct"] and not want["data"]["scores_as_correct"]
    for key in ("stages", "thresholds", "accuracy", "cost_usd", "quality_vs_best", "savings_vs_best"):
        assert got[key] == want[key], key

    rows[7]["models"]["bolt-mid"]["score"] = 0.5  # not 0/1: the scale is graded
    scored.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["replay", str(scored), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "line 8" in err and "models.bolt-mid" in err and "--pass-score" in err
    for r in rows:
        for rec in r["models"].values():
            rec["score"] = 1
    scored.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["replay", str(scored), "--quiet"]) == 2  # 1s alone: as likely a 1-10 scale
    assert "--pass-score" in capsys.readouterr().err


def test_too_few_rows_per_split_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = synth.write(tmp_path / "tiny.jsonl", n=24, seed=4)
    assert main(["replay", str(path), "--quiet"]) == 2
    assert "too few rows" in capsys.readouterr().err


def test_both_checks_chance_against_a_simulation() -> None:
    """bench/replay.py's bound on passing both quality checks (every split within the tolerance, the mean
    within +tolerance) checked by drawing splits at its best aim: the formula and the draws agree."""
    from bench.replay import both_checks_chance

    se, k = 0.017, 5
    best = both_checks_chance(se, k)
    assert 0.1 < best < 0.25  # the shared sets' test rows: no method passes both in most runs
    assert both_checks_chance(0.003, k) > 0.99 and both_checks_chance(0.0, k) == 1.0
    rng = random.Random(7)
    aims = [i / 1000 for i in range(-5, 21)]
    passed = dict.fromkeys(aims, 0)
    for _ in range(4000):
        noise = [rng.gauss(0.0, se) for _ in range(k)]
        for x in aims:
            q = [x + e for e in noise]
            passed[x] += min(q) >= -0.01 and sum(q) / k <= 0.01
    assert max(passed.values()) / 4000 == pytest.approx(best, abs=0.03)
