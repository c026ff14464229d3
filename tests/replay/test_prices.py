"""Datasets that record no cost: the price each answer is estimated at, where it came from, and
`--price MODEL=IN[,OUT]` to give it (replay offline and ``--online``, fit-scorer), through the CLI and
the real HTTP path. An unknown model priced at the fallback used to order the cascade silently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.config import load_config
from app.replay.dataset import FALLBACK_PRICE, parse_rows, price_for
from tests.replay import synth

pytestmark = pytest.mark.loopback


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str, str]:
    code = main([*args, "--quiet"] if args[0] == "replay" else list(args))
    out = capsys.readouterr()
    last = out.out.rstrip("\n").rsplit("\n", 1)[-1]
    report = json.loads(last) if code == 0 and "--json" in args else {}
    return code, report, out.out, out.err


def test_the_report_says_what_each_estimated_cost_was_priced_at(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """synth's quark-xl records no cost and is in no price list: the fallback, said in the JSON and the
    table; with --price, that price, and its costs follow it exactly."""
    path = synth.write(tmp_path / "syn.jsonl", n=90, seed=2)
    code, rep, _, err = _run(capsys, "replay", str(path), "--json")
    assert code == 0, err
    assert rep["data"]["cost_estimated"] is True
    fallback = {"input": FALLBACK_PRICE[0], "output": FALLBACK_PRICE[1], "source": "fallback"}
    assert rep["data"]["prices"] == {"quark-xl": fallback}  # the others record their costs
    code, _, out, _ = _run(capsys, "replay", str(path))
    assert code == 0
    assert "note: no cost_usd recorded: costs estimated" in out and "quark-xl $1/$2 (no price known)" in out
    assert (
        "note: no price known for quark-xl: $1/$2 assumed" in out and "--price quark-xl=INPUT,OUTPUT" in out
    )

    doubled = [str(2 * x) for x in FALLBACK_PRICE]
    code, priced, _, err = _run(
        capsys, "replay", str(path), "--json", "--price", f"QUARK-XL={','.join(doubled)}"
    )
    assert code == 0, err
    assert priced["data"]["prices"] == {"quark-xl": {"input": 2.0, "output": 4.0, "source": "--price"}}
    assert priced["single_models"]["quark-xl"]["cost_usd"] == pytest.approx(
        2 * rep["single_models"]["quark-xl"]["cost_usd"], rel=1e-12
    )
    # the recorded costs are untouched
    for m in ("acme/tiny-1", "bolt-mid", "Zeta/Large-X"):
        assert priced["single_models"][m]["cost_usd"] == rep["single_models"][m]["cost_usd"]
    code, _, out, _ = _run(capsys, "replay", str(path), "--price", "quark-xl=2,4")
    assert code == 0 and "quark-xl $2/$4 (--price)" in out and "no price known" not in out


def test_a_price_puts_an_unknown_model_in_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The strongest model, unknown and unpriced, looks cheaper than a small one priced above the
    fallback: priced as dear as it is, it is the dearest, and the savings are measured against it."""
    models = {"small-a": (0.7, None), "small-b": (0.8, None), "frontier-q": (0.95, None)}
    path = synth.write(tmp_path / "unpriced.jsonl", n=240, seed=5, models=models)
    low = ["--price", "small-a=0.1", "--price", "small-b=5"]
    code, cheap, _, err = _run(capsys, "replay", str(path), "--json", *low)
    assert code == 0, err
    code, dear, _, err = _run(capsys, "replay", str(path), "--json", *low, "--price", "frontier-q=30,60")
    assert code == 0, err
    assert cheap["data"]["prices"]["frontier-q"]["source"] == "fallback"
    assert dear["data"]["prices"]["frontier-q"] == {"input": 30.0, "output": 60.0, "source": "--price"}

    def cost(rep: dict[str, Any], m: str) -> float:
        return float(rep["single_models"][m]["cost_usd"])

    assert cost(cheap, "frontier-q") < cost(cheap, "small-b")
    assert cost(dear, "frontier-q") > cost(dear, "small-b")
    assert dear["best_single"]["model"] == cheap["best_single"]["model"] == "frontier-q"
    assert dear["savings_vs_best"] > cheap["savings_vs_best"]


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ("quark-xxl=1,2", "--price quark-xxl: no model of the dataset matches (models: "),
        ("quark=1,2", "--price quark: no model of the dataset matches"),  # names a model exactly
        ("bolt-mid=1,2", "--price bolt-mid: every row records the cost_usd of bolt-mid"),
    ],
)
@pytest.mark.parametrize("command", ["replay", "online", "fit-scorer"])
def test_a_price_that_prices_nothing_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], price: str, message: str, command: str
) -> None:
    path = synth.write(tmp_path / "syn.jsonl", n=60, seed=2)
    args = {
        "replay": ["replay", str(path)],
        "online": ["replay", str(path), "--online"],
        "fit-scorer": ["fit-scorer", str(path), "--out", str(tmp_path / "out")],
    }[command]
    code, _, _, err = _run(capsys, *args, "--price", price)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "value",
    [
        "quark-xl",
        "quark-xl=",
        "=1,2",
        "quark-xl=1,2,3",
        "quark-xl=a",
        "quark-xl=-1",
        "quark-xl=nan",
        "quark-xl=1,inf",
    ],
)
def test_a_malformed_price_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    path = synth.write(tmp_path / "syn.jsonl", n=60, seed=2)
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(path), "--price", value, "--quiet"])
    assert exc.value.code == 2
    assert "argument --price" in capsys.readouterr().err


def test_online_and_fit_scorer_take_the_price(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = synth.write(tmp_path / "syn.jsonl", n=120, seed=3)
    code, rep, out, err = _run(capsys, "replay", str(path), "--online", "--json", "--price", "quark-xl=3")
    assert code == 0, err
    assert rep["prices"] == {"quark-xl": {"input": 3.0, "output": 3.0, "source": "--price"}}
    assert "quark-xl $3/$3 (--price)" in out
    code, _, out, err = _run(
        capsys,
        "fit-scorer",
        str(path),
        "--out",
        str(tmp_path / "fit"),
        "--price",
        "quark-xl=3",
        "--chain",
        "acme/tiny-1,quark-xl",
    )
    assert code == 0, err
    assert "note: no cost_usd recorded" in out and "quark-xl $3/$3 (--price)" in out
    # the config snippet carries the price, and says where each came from
    snippet = (tmp_path / "fit" / "cascade.yaml").read_text()
    cfg = load_config(tmp_path / "fit" / "cascade.yaml")
    ups = {u.model: u.price for u in cfg.upstreams.values()}
    assert (ups["quark-xl"].input, ups["quark-xl"].output) == (3.0, 3.0)
    assert "price: {input: 3.0, output: 3.0}  # USD per 1M tokens, from --price" in snippet
    assert "no price known: set yours" in snippet  # acme/tiny-1: recorded costs, no token price


def test_the_snippet_takes_list_prices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = {"gpt-4o-mini": (0.75, None), "gpt-4o": (0.92, None)}
    path = synth.write(tmp_path / "listed.jsonl", n=90, seed=4, models=models)
    code, _, _, err = _run(
        capsys, "fit-scorer", str(path), "--out", str(tmp_path / "fit"), "--chain", "gpt-4o-mini,gpt-4o"
    )
    assert code == 0, err
    cfg = load_config(tmp_path / "fit" / "cascade.yaml")
    ups = {u.model: (u.price.input, u.price.output) for u in cfg.upstreams.values()}
    assert ups == {"gpt-4o-mini": (0.15, 0.6), "gpt-4o": (2.5, 10.0)}
    assert "a list price of early 2024: check yours" in (tmp_path / "fit" / "cascade.yaml").read_text()


def test_with_a_drift_a_price_may_be_for_either_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = synth.write(tmp_path / "a.jsonl", n=120, seed=3)
    other = synth.write(
        tmp_path / "b.jsonl", n=120, seed=4, models={"lite": (0.6, None), "heavy": (0.9, None)}
    )
    common = ["replay", str(first), "--online", "--drift", str(other), "--json"]
    code, rep, _, err = _run(capsys, *common, "--price", "heavy=20", "--price", "quark-xl=3")
    assert code == 0, err
    assert rep["prices"]["heavy"]["source"] == "--price" and rep["prices"]["lite"]["source"] == "fallback"
    assert rep["prices"]["quark-xl"]["source"] == "--price"
    code, _, _, err = _run(capsys, *common, "--price", "nowhere=20")
    assert code == 2 and "--price nowhere: prices no model without a recorded cost" in err


def test_the_loader_keeps_the_user_price_first() -> None:
    """A --price beats the list price of the same model (what-if pricing of a known model)."""
    lines = [
        json.dumps(
            {
                "id": f"r{i}",
                "split": "train",
                "prompt": "p",
                "models": {"gpt-4o": {"answer": "x" * 40, "correct": True}},
            }
        )
        for i in range(3)
    ]
    listed = parse_rows(lines)
    given = parse_rows(lines, prices={"gpt-4o": (5.0, 20.0)})
    assert listed.prices["gpt-4o"] == {"input": 2.5, "output": 10.0, "source": "list"}
    assert given.prices["gpt-4o"] == {"input": 5.0, "output": 20.0, "source": "--price"}
    assert given.rows[0].answers["gpt-4o"].cost_usd == pytest.approx(
        2 * listed.rows[0].answers["gpt-4o"].cost_usd
    )


def test_fit_scorer_from_the_store_takes_no_price(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Traces carry what each call cost: a --price (or --pass-score) there would be ignored."""
    for extra, flag in ((["--price", "x=1"], "--price"), (["--pass-score", "8"], "--pass-score")):
        code, _, _, err = _run(capsys, "fit-scorer", "--from-store", "--out", str(tmp_path / "o"), *extra)
        assert code == 2 and f"{flag}: only with DATASET.jsonl" in err


@pytest.mark.parametrize(
    ("model", "price", "source"),
    [
        ("gpt-4-0613", (30.0, 60.0), "list"),  # a dated snapshot of a listed model
        ("openai/gpt-4", (30.0, 60.0), "list"),
        ("gpt-4o-2024-08-06", (2.5, 10.0), "list"),  # the longest listed name wins: gpt-4o, not gpt-4
        ("gpt-4o-mini-2024-07-18", (0.15, 0.6), "list"),
        ("anthropic.claude-instant-v1", (0.8, 2.4), "list"),
        ("claude-3-5-sonnet-20240620", (3.0, 15.0), "list"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", (0.6, 0.6), "list"),
        # another model whose name holds a listed one: not that one's price
        ("gpt-4.1-mini", FALLBACK_PRICE, "fallback"),
        ("claude-v2.1", FALLBACK_PRICE, "fallback"),
        ("superllama-2-70b", FALLBACK_PRICE, "fallback"),
        ("llama-3.1-70b", FALLBACK_PRICE, "fallback"),
    ],
)
def test_list_prices_match_whole_parts_of_a_name(model: str, price: tuple[float, float], source: str) -> None:
    assert price_for(model) == (price, source)


def test_a_price_for_a_model_left_out_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """quark-xl (no recorded cost) missing from 10 rows of 90 is left out: its price would price nothing."""
    rows = synth.rows(n=90, seed=2)
    for i in range(5, 95, 9):
        rows[i]["models"]["quark-xl"] = None
    path = tmp_path / "gap.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    code, _, _, err = _run(capsys, "replay", str(path), "--price", "quark-xl=3")
    assert code == 2 and "--price quark-xl: quark-xl is left out (not recorded in every row)" in err
