"""`cascade replay` (offline and ``--online``) on dataset shapes unlike the shared ones: graded answers,
rows lacking a model, duplicate ids, odd costs. Each either replays (exit 0) or says what is wrong with
which row (exit 2), through the real HTTP path (real uvicorn, loopback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.replay.dataset import load_dataset
from app.replay.online_report import Served, summarise
from app.replay.runner import ReplayOptions, run_replay
from app.replay.simulate import simulate
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


@pytest.mark.parametrize("online", [False, True])
def test_no_model_in_every_row_exits_2_naming_the_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], online: bool
) -> None:
    """Each model missing from some row (online this was a traceback from the fit), a row recording
    no model, a record that is not an object: exit 2, one line naming the line, id and model."""
    rows = synth.rows(n=60, seed=2)
    names = list(synth.MODELS)
    for i, r in enumerate(rows):
        if i % 5 == 0:
            del r["models"][names[(i // 5) % len(names)]]
    flag = ["--online"] if online else []
    code, _, err = _replay(capsys, str(_write(tmp_path / "gaps.jsonl", rows)), *flag)
    assert code == 2 and "Traceback" not in err
    assert "no model is recorded in every row" in err and "models.acme/tiny-1 is missing from line 1" in err

    rows = synth.rows(n=60, seed=2)
    rows[7]["models"] = {}
    code, _, err = _replay(capsys, str(_write(tmp_path / "empty.jsonl", rows)), *flag)
    assert code == 2 and "line 8 (id 'syn-7')" in err and "records no model" in err

    rows = synth.rows(n=60, seed=2)
    rows[3]["models"]["bolt-mid"] = "42"
    code, _, err = _replay(capsys, str(_write(tmp_path / "str.jsonl", rows)), *flag)
    assert code == 2 and "line 4 (id 'syn-3'): models.bolt-mid is str" in err


def test_a_null_record_is_a_model_missing_from_that_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = synth.rows(n=90, seed=2)
    for i in range(5, 95, 9):  # missing from 10 rows of 90: the model is left out
        rows[i]["models"]["bolt-mid"] = None
    code, rep, err = _replay(capsys, str(_write(tmp_path / "null.jsonl", rows)))
    assert code == 0, err
    assert "bolt-mid" not in rep["single_models"] and len(rep["single_models"]) == len(synth.MODELS) - 1
    # ... and the report says so (JSON and table).
    assert rep["data"]["models_left_out"] == ["bolt-mid"] and rep["data"]["cost_estimated"] is True
    assert rep["data"]["rows_left_out"] == 0
    code = main(["replay", str(tmp_path / "null.jsonl"), "--quiet"])
    assert code == 0 and "left out (not recorded in every row): bolt-mid" in capsys.readouterr().out


def test_a_model_missing_from_a_few_rows_costs_those_rows_not_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One failed call in a recording (a null record for the best model in 1 row of 300) left the best
    model out of every row: every figure was then measured against a weaker one. Up to 2 % of the rows
    missing a model are left out instead, and the report says how many."""
    rows = synth.rows(n=300, seed=2)
    rows[7]["models"]["quark-xl"] = None
    rows[8]["models"]["acme/tiny-1"] = None
    path = _write(tmp_path / "gap.jsonl", rows)
    ds = load_dataset(path)
    assert set(ds.models) == set(synth.MODELS) and ds.n_dropped_incomplete == 2 and len(ds.rows) == 298
    assert {"syn-7", "syn-8"}.isdisjoint(r.id for r in ds.rows)
    code, rep, err = _replay(capsys, str(path))
    assert code == 0, err
    assert rep["data"]["rows_left_out"] == 2 and rep["data"]["models_left_out"] == []
    assert "quark-xl" in rep["single_models"]
    assert main(["replay", str(path), "--quiet"]) == 0
    assert "note: 2 rows left out: they lack a model that nearly every row records" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["N/A", "maybe", [True], {"ok": 1}, ""])
def test_a_correct_that_says_neither_right_nor_wrong_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: object
) -> None:
    rows = synth.rows(n=60, seed=2)
    rows[4]["models"]["bolt-mid"]["correct"] = value
    code, _, err = _replay(capsys, str(_write(tmp_path / "unsure.jsonl", rows)))
    assert code == 2 and "line 5 (id 'syn-4'): models.bolt-mid.correct is" in err and "Traceback" not in err


def test_correct_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = synth.rows(n=90, seed=2)
    for r in rows:
        for rec in r["models"].values():
            rec["correct"] = {True: "Yes", False: "wrong"}[rec["correct"]]
    same = _write(tmp_path / "bools.jsonl", synth.rows(n=90, seed=2))
    words = _write(tmp_path / "words.jsonl", rows)
    assert [r.answers for r in load_dataset(words).rows] == [r.answers for r in load_dataset(same).rows]


def test_repeated_ids_are_replayed_row_by_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows repeating an id, even with the same prompt and other answers, are each replayed as
    themselves: offline the proxy decides as the simulation does (the replay upstream used to answer
    404 for the ambiguous row, and the proxy escalated past it), online no request fails."""
    rows = []
    for r in synth.rows(n=120, seed=5):
        again = json.loads(json.dumps(r))
        again["models"]["acme/tiny-1"]["answer"] += " Surely."
        rows += [r, again]
    path = _write(tmp_path / "twice.jsonl", rows)
    ds = load_dataset(path)
    assert len({r.id for r in ds.rows}) == len(rows) and ds.rows[1].id == "syn-0#2"
    assert ds.rows[0].split == ds.rows[1].split  # a copy never lands on the other side
    result = run_replay(ReplayOptions(str(path)))
    assert not result.errors and result.fitted is not None
    sim = simulate(result.fitted, ds.test)
    assert [o.stage for o in result.outcomes] == sim.accepted_stage

    same = [{**r, "id": "same", "prompt": f"{r['prompt']} ({i})"} for i, r in enumerate(synth.rows(n=120))]
    code, rep, err = _replay(capsys, str(_write(tmp_path / "same.jsonl", same)), "--online")
    assert code == 0, err
    assert rep["errors"] == 0 and rep["requests"] == 120


def test_an_upstream_failure_the_proxy_escalated_past_is_a_failed_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the replay upstream cannot serve a stage (here: stage 0 on one row), the proxy escalates
    and the row is answered, but not as recorded: the replay counts it as failed (exit 1), not as
    an escalation."""
    from app.replay import upstream

    path = synth.write(tmp_path / "syn.jsonl", n=150, seed=7)
    ds = load_dataset(path)
    victim = ds.test[3]
    real = upstream.ReplayIndex.lookup

    def lookup(self: Any, model: str, prompts: Any, row_id: str | None = None) -> Any:
        if row_id == victim.id and model == ds.models[0]:
            raise upstream.ReplayLookupError("gone", "answer_not_found", "model")
        return real(self, model, prompts, row_id)

    monkeypatch.setattr(upstream.ReplayIndex, "lookup", lookup)
    result = run_replay(ReplayOptions(str(path)))
    assert result.fitted is not None and result.fitted.models[0] == ds.models[0]
    assert [o.row.id for o in result.errors] == [victim.id]
    assert "stage 0" in str(result.errors[0].error)


@pytest.mark.parametrize("cost", [-1e-3, "free", True, 1e308])
def test_a_cost_that_is_not_usd_exits_2_naming_the_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cost: Any
) -> None:
    """A negative, non-numeric or absurd recorded cost used to be replaced by an estimate (or summed
    to inf, and NaN in the JSON): exit 2 naming the line, the row and the field."""
    rows = synth.rows(n=60, seed=2)
    rows[4]["models"]["bolt-mid"]["cost_usd"] = cost
    code, _, err = _replay(capsys, str(_write(tmp_path / "cost.jsonl", rows)))
    assert code == 2 and "line 5 (id 'syn-4'): models.bolt-mid.cost_usd is" in err


def test_a_cost_written_as_a_string_is_the_recorded_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = synth.rows(n=90, seed=2)
    for r in rows:
        rec = r["models"]["bolt-mid"]
        rec["cost_usd"] = str(rec["cost_usd"])
    path = _write(tmp_path / "str.jsonl", rows)
    ds = load_dataset(path)
    assert not any(r.answers["bolt-mid"].cost_estimated for r in ds.rows)
    code, rep, err = _replay(capsys, str(path))
    assert code == 0, err
    recorded = {r["id"]: float(r["models"]["bolt-mid"]["cost_usd"]) for r in rows}
    expected = sum(recorded[r.id] for r in ds.test) / len(ds.test)
    assert rep["single_models"]["bolt-mid"]["cost_usd"] == pytest.approx(expected)


def test_no_model_ever_right_is_as_good_as_the_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every recorded answer wrong: the cascade is as good as the best single model (quality 1.0, the
    target met), where the report said 0.0 and every split missed its target."""
    models: dict[str, tuple[float, float | None]] = {"a": (0.0, 1e-6), "b": (0.0, 1e-5), "c": (0.0, 1e-4)}
    path = synth.write(tmp_path / "wrong.jsonl", n=150, seed=3, models=models)
    code, rep, err = _replay(capsys, str(path), "--resplits", "2")
    assert code == 0, err
    assert rep["accuracy"] == 0.0 and rep["quality_vs_best"] == 1.0
    assert rep["target_met_share"] == 1.0
    assert all(b["quality_vs_best"] == 1.0 for b in rep["baselines"].values() if b is not None)
    # Online, the windows' figures follow the same rule (the fit may leave one stage: nothing to tune
    # through HTTP, so the report is checked on served requests as the online runner records them).
    served = [Served(i, "wrong", f"r{i}", False, 1e-6, False, 1e-4) for i in range(200)]
    online = summarise(served, served, target=0.95)
    assert online["final_quality_vs_best"] == 1.0 and online["labels_to_target"] == 0


def test_online_with_too_few_train_rows_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A handful of train rows: offline refuses to fit on them; online used to fit anyway and then
    say the one-stage cascade it got had "nothing to tune"."""
    rows = synth.rows(n=150, seed=4)
    for i, r in enumerate(rows):
        r["split"] = "train" if i < 6 else "test"
    code, _, err = _replay(capsys, str(_write(tmp_path / "few.jsonl", rows)), "--online")
    assert code == 2 and "too few rows to fit on: 6 train rows" in err


def test_online_tunes_a_cascade_when_one_model_alone_meets_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cheapest model is the most accurate: the offline fit serves it alone, which leaves nothing
    to tune. The online run tunes the cheapest cascade of two models instead (exit 0, not 2) and says
    which single model the offline fit chose."""
    models: dict[str, tuple[float, float | None]] = {"cheap-best": (0.9, 2e-6), "dear-worse": (0.7, 1e-4)}
    path = synth.write(tmp_path / "cheap_best.jsonl", n=200, seed=4, models=models)
    code, rep, err = _replay(capsys, str(path))
    assert code == 0, err
    assert rep["stages"] == ["cheap-best"]
    code, rep, err = _replay(capsys, str(path), "--online", "--start-threshold", "1")
    assert code == 0, err
    assert rep["offline_single_model"] == "cheap-best" and rep["stages"] == ["cheap-best", "dear-worse"]
    assert rep["requests"] == 200 and rep["errors"] == 0 and rep["windows"]


def test_chat_messages_instead_of_a_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows recorded as OpenAI ``messages`` (no ``prompt``) replay as rows whose prompt is those messages
    flattened the way the proxy flattens a request's: same prompt, same fit, same figures."""
    rows = synth.rows(n=120, seed=6)
    flat, chat = [], []
    for r in rows:
        messages = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": r["prompt"]},
        ]
        flat.append({**r, "prompt": "Answer briefly.\n\n" + r["prompt"]})
        chat.append({k: v for k, v in r.items() if k != "prompt"} | {"messages": messages})
    flat_path, chat_path = _write(tmp_path / "flat.jsonl", flat), _write(tmp_path / "chat.jsonl", chat)
    assert [r.prompt for r in load_dataset(chat_path).rows] == [r["prompt"] for r in flat]
    code, want, err = _replay(capsys, str(flat_path))
    assert code == 0, err
    code, got, err = _replay(capsys, str(chat_path))
    assert code == 0, err
    for key in ("stages", "thresholds", "accuracy", "cost_usd", "quality_vs_best", "savings_vs_best"):
        assert got[key] == want[key], key


def test_a_byte_order_mark_and_crlf_lines_read_as_the_same_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file saved by a Windows tool (UTF-8 BOM, CRLF line ends) replays like the plain file."""
    rows = synth.rows(n=80, seed=7)
    plain = _write(tmp_path / "plain.jsonl", rows)
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    code, want, err = _replay(capsys, str(plain))
    assert code == 0, err
    code, got, err = _replay(capsys, str(windows))
    assert code == 0, err
    assert {k: v for k, v in got.items() if k != "dataset"} == {
        k: v for k, v in want.items() if k != "dataset"
    }


def test_split_values_other_than_train_and_test_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "TRAIN" and " Test " are train and test; "dev" or "validation" is the user's call, not a hash's
    (such rows were silently split by hashing their ids: a 200/100 split replayed as 156/144)."""
    rows = synth.rows(n=90, seed=2)
    given = {r["id"]: r["split"] for r in rows if "split" in r}
    for r in rows:
        if "split" in r:
            r["split"] = {"train": "TRAIN", "test": " Test "}[r["split"]]
    ds = load_dataset(_write(tmp_path / "upper.jsonl", rows))
    assert given and all(r.split == given[r.id] for r in ds.rows if r.id in given)
    rows[7]["split"] = "dev"
    code, _, err = _replay(capsys, str(_write(tmp_path / "dev.jsonl", rows)))
    assert code == 2 and "line 8 (id 'syn-7'): split is 'dev': 'train' or 'test'" in err


def test_a_correct_that_is_not_a_number_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = synth.rows(n=60, seed=2)
    rows[4]["models"]["bolt-mid"]["correct"] = float("nan")  # json.dumps writes NaN, json.loads reads it
    code, _, err = _replay(capsys, str(_write(tmp_path / "nan.jsonl", rows)))
    assert code == 2 and "line 5 (id 'syn-4'): models.bolt-mid.correct is 'nan'" in err


def test_a_score_written_as_a_string_is_the_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = synth.rows(n=90, seed=2)
    for r in rows:
        for rec in r["models"].values():
            rec["score"] = str(8 if rec.pop("correct") else 3)
    path = _write(tmp_path / "graded.jsonl", rows)
    assert all(
        a.correct == (a.score == 8.0)
        for r in load_dataset(path, pass_score=5).rows
        for a in r.answers.values()
    )
    rows[3]["models"]["bolt-mid"]["score"] = "great"
    code, _, err = _replay(capsys, str(_write(tmp_path / "words.jsonl", rows)), "--pass-score", "5")
    assert code == 2 and "line 4 (id 'syn-3'): models.bolt-mid.score is 'great'" in err


def test_a_lone_surrogate_in_a_text_is_replaced_not_a_crash(tmp_path: Path) -> None:
    """JSON may escape half a surrogate pair ("\\ud83d"); no UTF-8 text, so no HTTP body, can hold it: the
    replay crashed sending the row. It reads as U+FFFD, as a UTF-8 decoder reads what it cannot."""
    rows = synth.rows(n=60, seed=2)
    rows[0]["prompt"] += " \ud83d"
    rows[0]["models"]["bolt-mid"]["answer"] += " \udc00"
    ds = load_dataset(_write(tmp_path / "half.jsonl", rows))
    first = ds.rows[0]
    assert first.prompt.endswith(" \ufffd") and first.answers["bolt-mid"].answer.endswith(" \ufffd")
    first.prompt.encode("utf-8")


@pytest.mark.parametrize(
    "option", [("--margin-z", "nan"), ("--margin-z", "-1"), ("--tolerance", "-1"), ("--pass-score", "inf")]
)
def test_numbers_on_the_command_line_are_checked(option: tuple[str, str], tmp_path: Path) -> None:
    path = synth.write(tmp_path / "syn.jsonl", n=60, seed=2)
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(path), *option, "--quiet"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chain", ","], "--chain: names no model"),
        (["--chain", "bolt-mid,bolt-mid,quark-xl"], "--chain: names bolt-mid more than once"),
        (["--chain", "acme/tiny-1,bolt-mid,Zeta/Large-X,quark-xl"], "4 models, more than --max-stages 3"),
        (["--chain", "acme/tiny-1,bolt-mid,quark-xl", "--max-stages", "2"], "more than --max-stages 2"),
        (["--for-auto-tune", "--max-stages", "1"], "auto_tune needs two stages or more"),
        (["--for-auto-tune", "--chain", "bolt-mid"], "one model: auto_tune needs two stages or more"),
    ],
)
def test_fit_scorer_says_what_is_wrong_before_fitting(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = synth.write(tmp_path / "syn.jsonl", n=90, seed=2)
    assert main(["fit-scorer", str(path), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_fit_scorer_refuses_too_few_train_rows_and_an_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As replay: a 5-fold cross-fit on a handful of rows means nothing (it fitted 3 rows and printed
    "target NOT met"). And an --out that is a file failed with a traceback after the whole fit."""
    rows = synth.rows(n=60, seed=2)
    for i, r in enumerate(rows):
        r["split"] = "train" if i < 13 else "test"
    few = _write(tmp_path / "few.jsonl", rows)
    assert main(["fit-scorer", str(few), "--out", str(tmp_path / "out")]) == 2
    assert "13 train rows, at least 20 are needed" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    path = synth.write(tmp_path / "syn.jsonl", n=90, seed=2)
    assert main(["fit-scorer", str(path), "--out", str(tmp_path / "file")]) == 2
    assert "--out: " in capsys.readouterr().err


def test_for_auto_tune_where_the_best_model_is_also_the_cheapest_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every cascade of two or more (cheapest first) starts at the best model and ends at a weaker one,
    whose labels ("as good as the last stage's") cannot hold the target: nothing to tune. It wrote such
    a cascade with auto_tune on, then a note saying its last stage could not hold the target."""
    models: dict[str, tuple[float, float | None]] = {"best-free": (0.9, 0.0), "dear-worse": (0.6, 1e-4)}
    path = synth.write(tmp_path / "free_best.jsonl", n=150, seed=4, models=models)
    assert main(["fit-scorer", str(path), "--out", str(tmp_path / "out"), "--for-auto-tune"]) == 2
    assert "best-free alone meets the target" in capsys.readouterr().err
    assert not (tmp_path / "out" / "cascade.yaml").exists()


def test_models_of_equal_cost_are_chained_weaker_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two models at one price: a chain from the better to the weaker is never a cascade. --for-auto-tune
    chained "best -> worse" (by name), which ended at a model missing the target."""
    models: dict[str, tuple[float, float | None]] = {"a-best": (0.9, 1e-3), "b-worse": (0.6, 1e-3)}
    rows = synth.rows(n=150, seed=4, models=models)
    for r in rows:
        for rec in r["models"].values():
            rec["cost_usd"] = 1e-3
    path = _write(tmp_path / "same.jsonl", rows)
    assert main(["fit-scorer", str(path), "--out", str(tmp_path / "out"), "--for-auto-tune"]) == 0
    assert "chain: b-worse -> a-best" in capsys.readouterr().out


def test_where_the_best_model_costs_nothing_savings_are_not_a_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recorded cost of 0 for the best model (a local one): no share of nothing is saved. The report
    said 0.0 % for every line, the cascade's too, whatever it spent; now null in the JSON, "n/a" in the
    table, and the aggregates over the splits that have a figure."""
    models: dict[str, tuple[float, float | None]] = {"cheap": (0.6, 1e-5), "best-free": (0.9, 0.0)}
    rows = synth.rows(n=150, seed=4, models=models)
    for r in rows:
        r["models"]["best-free"]["cost_usd"] = 0.0
    path = _write(tmp_path / "free.jsonl", rows)
    code = main(
        ["replay", str(path), "--json", "--quiet", "--resplits", "2", "--config", str(_two_stage(tmp_path))]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    rep = json.loads(out.out.rstrip("\n").rsplit("\n", 1)[-1])
    assert rep["cost_usd"] > 0 and rep["savings_vs_best"] is None
    assert rep["savings_vs_best_mean"] is None and rep["savings_vs_best_min"] is None
    assert rep["baselines"]["best_single"]["savings_vs_best"] == 0.0  # nothing spent, nothing saved
    assert "savings vs best single: n/a" in out.out
    # a --config cascade was not fitted: no fit to report, no train rows' luck to add
    assert "fit" not in rep and all(s["fit"] is None for s in rep["resplits"])
    assert rep["fit_quality_vs_best_se_mean"] is None and rep["noise_miss_chance"] is None
    assert "the fit on its" not in out.out and "the train rows' luck" not in out.out
    # online, the windows' figures follow the same rule, and the printed summary says "-"
    served = [Served(i, "free", f"r{i}", True, 1e-6, True, 0.0, thresholds=[0.5]) for i in range(200)]
    online = summarise(served, served, target=0.95)
    assert online["final_savings_vs_best"] is None and online["savings_vs_offline"] is None
    assert all(w["savings_vs_best"] is None for w in online["windows"])


def _two_stage(tmp_path: Path) -> Path:
    """A config serving cheap -> best-free with a scorer that escalates some requests."""
    cfg = {
        "upstreams": {
            "cheap": {"base_url": "http://127.0.0.1:9/v1", "model": "cheap"},
            "best-free": {"base_url": "http://127.0.0.1:9/v1", "model": "best-free"},
        },
        "cascades": {
            "default": {
                "stages": [
                    {"upstream": "cheap", "threshold": 0.5, "scorers": [{"type": "heuristic"}]},
                    {"upstream": "best-free"},
                ]
            }
        },
    }
    path = tmp_path / "two.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


@pytest.mark.parametrize("online", [False, True])
def test_a_plot_path_that_cannot_be_written_exits_2_before_the_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], online: bool
) -> None:
    """A traceback after the whole replay (no such directory, an unknown format)."""
    data = str(_write(tmp_path / "d.jsonl", synth.rows(n=60, seed=2)))
    for plot, says in [
        ("no/such/dir/p.png", "is not a directory"),
        ("p.txt", "must end in .png, .svg, .pdf"),
    ]:
        code, _, err = _replay(
            capsys, data, *(["--online"] if online else []), "--plot", str(tmp_path / plot)
        )
        assert code == 2 and err.startswith("cascade replay: --plot: ") and says in err, err
