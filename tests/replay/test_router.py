"""Route-then-cascade: a prompt-only router fitted with the cascade, kept only when it pays, served by the
proxy (a routed request starts at the last stage), and reported per stage."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import main
from app.config import ConfigError, parse_config
from app.learning.train import fit_cascade
from app.replay.dataset import load_dataset
from app.replay.runner import ReplayOptions, run_replay
from app.replay.simulate import replay_report, simulate
from tests.replay import synth

pytestmark = pytest.mark.loopback


@pytest.fixture(scope="module")
def routed_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_routed(tmp_path_factory.mktemp("router") / "routed.jsonl")


def test_router_is_chosen_when_the_prompt_predicts_failure_and_pays(routed_path: Path) -> None:
    ds = load_dataset(routed_path)
    without = fit_cascade(ds.train, ds.models, target_quality=0.95, router=False)
    fitted = fit_cascade(ds.train, ds.models, target_quality=0.95)
    info = fitted.router_info
    assert info["chosen"] and fitted.router is not None and fitted.router_threshold is not None
    assert info["train_cost_usd_with"] < info["train_cost_usd_without"]
    assert 0.2 < info["train_routed_share"] < 0.5
    assert fitted.router.feature_spec.kind == "prompt"
    # on the test rows it routes the hard prompts, and pays: cheaper at the same quality
    sim = simulate(fitted, ds.test)
    rep, base = replay_report(ds, fitted, sim), replay_report(ds, without, simulate(without, ds.test))
    assert sim.skipped_share[0] > 0.2 and sim.skipped_share[-1] == 0.0
    assert rep["savings_vs_best"] > base["savings_vs_best"] + 0.05
    assert rep["quality_vs_best"] >= base["quality_vs_best"] - 0.02
    hard = [r for r in ds.test if "Prove" in r.prompt]
    assert sum(fitted.routed(r.prompt) for r in hard) >= 0.8 * len(hard)
    easy = [r for r in ds.test if "Prove" not in r.prompt]
    assert sum(fitted.routed(r.prompt) for r in easy) <= 0.1 * len(easy)


def test_router_is_not_chosen_when_it_cannot_pay(tmp_path: Path) -> None:
    """The prompt says nothing about failure here (synth rows): replay reports the router as not chosen."""
    ds = load_dataset(synth.write(tmp_path / "syn.jsonl", n=150, seed=11))
    fitted = fit_cascade(ds.train, ds.models, target_quality=0.9)
    assert fitted.router is None
    assert fitted.router_info["chosen"] is False and fitted.router_info["reason"]


def test_routed_requests_start_at_the_last_stage_through_http(
    routed_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_replay(ReplayOptions(str(routed_path), target_quality=0.95, concurrency=4))
    rep: dict[str, Any] = result.report
    assert not result.errors
    assert rep["router"]["chosen"] is True
    fitted = result.fitted
    assert fitted is not None
    routed = {r.id for r in load_dataset(routed_path).test if fitted.routed(r.prompt)}
    assert routed
    for o in result.outcomes:
        assert o.routed == (o.row.id in routed)
        if o.routed:  # one attempt, at the last stage, charged only for it
            assert o.stage == len(fitted.models) - 1
            assert o.cost_usd == pytest.approx(o.row.answers[fitted.models[-1]].cost_usd, abs=1e-9)
    share = len(routed) / len(result.outcomes)
    assert rep["router"]["skipped_share"] == pytest.approx([share, 0.0])
    assert rep["escalation_rate"][0] == pytest.approx(1.0 - share)
    # the random baseline routes the same share at random: an accuracy, never more than every row right
    rd = rep["baselines"]["random"]
    last = rep["single_models"][fitted.models[-1]]["accuracy"]
    assert 0.0 <= rd["accuracy"] <= 1.0
    assert rd["cost_usd"] >= share * rep["single_models"][fitted.models[-1]]["cost_usd"] - 1e-12
    assert rd["accuracy"] >= share * last - 1e-12
    # the HTTP figures are the offline simulation's
    sim = simulate(fitted, load_dataset(routed_path).test)
    assert rep["accuracy"] == pytest.approx(sim.accuracy)
    assert rep["cost_usd"] == pytest.approx(sim.cost_usd, abs=1e-9)
    assert main(["replay", str(routed_path), "--quiet", "--target-quality", "0.95"]) == 0
    assert "router (route-then-cascade): chosen" in capsys.readouterr().out


def test_router_config_is_checked(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "upstreams": {"a": {"base_url": "http://127.0.0.1:9/v1", "model": "a"}},
        "cascades": {"one": {"stages": [{"upstream": "a"}], "router": {"model": "r.json", "threshold": 0.5}}},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(base, env={})
    assert any("cascades.one.router" in p and "two stages" in p for p in err.value.problems)
    bad = yaml.safe_load(json.dumps(base))
    bad["cascades"]["one"]["router"]["threshold"] = 2
    with pytest.raises(ConfigError) as err:
        parse_config(bad, env={})
    assert any("cascades.one.router.threshold" in p for p in err.value.problems)


def test_a_router_file_that_cannot_serve_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cascade check-config`` (and so ``serve``) refuses a router it cannot load, or a stage scorer's file
    given as the router, naming the key; never a traceback, never a cascade that routes on nonsense."""
    from app.learning.fitting import fit_logistic
    from app.scoring.feature_spec import FeatureSpec

    stage_scorer, spec = tmp_path / "stage0.json", FeatureSpec(hash_dim=0)
    fit_logistic([[0.0] * spec.dim, [1.0] * spec.dim], [0, 1], feature_spec=spec).save(stage_scorer)
    for model, says in ((tmp_path / "missing.json", "No such file"), (stage_scorer, "not a router")):
        cfg = {
            "upstreams": {n: {"base_url": "http://127.0.0.1:9/v1", "model": n} for n in ("a", "b")},
            "cascades": {
                "one": {
                    "stages": [
                        {"upstream": "a", "threshold": 0.5, "scorers": [{"type": "heuristic"}]},
                        {"upstream": "b"},
                    ],
                    "router": {"model": str(model), "threshold": 0.5},
                }
            },
        }
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["check-config", str(path)]) == 2
        err = capsys.readouterr().err
        assert "cascades.one.router.model: cannot load" in err and says in err, err


def test_with_the_router_no_stage_is_kept_that_no_request_reaches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The router and the stage thresholds are searched together; where the joint choice has the first
    stage accept every answer (the router sending the rest to the last), the middle stage is reached by
    no request. The fit drops it (the same policy on the train rows) instead of serving a configured,
    scored upstream that is never called: on this generated world the report said "mistral -> mixtral
    -> gpt-4, thresholds 0, 0, reach 60 / 0 / 40 %"."""
    import dataclasses

    from bench import synthetic

    world = synthetic.generate(3, 1000, 500)
    train = [r for r in world.rows if r.split == "train"]
    test = [r for r in world.rows if r.split == "test"]
    three = ("mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "gpt-4-1106-preview")
    rows, every = [], []
    for i, r in enumerate(x for j in range(100) for x in (train[2 * j], test[j], train[2 * j + 1])):
        answers = {m: r.answers[m] for m in three}
        if i % 4 == 0:  # answers empty, or in another script
            answers[three[0]] = dataclasses.replace(answers[three[0]], answer="")
        elif i % 4 == 1:
            answers[three[0]] = dataclasses.replace(answers[three[0]], answer="答案是 C 🤖\u0000")
        elif i % 4 == 2:
            answers[three[1]] = dataclasses.replace(answers[three[1]], answer="")
        every.append(dataclasses.replace(r, prompt=f"Ω≈ç√ {r.prompt} 😀", answers=answers))
    rows = [r for r in every if r.split == "train"]
    fitted = fit_cascade(rows, list(three), target_quality=0.95)
    assert fitted.router is not None  # the joint search chose the router
    assert fitted.models == [three[0], three[2]] and len(fitted.thresholds) == 1
    assert all(share > 0 for share in fitted.train["reach"])
    assert len(fitted.scorers) == len(fitted.scoring) == len(fitted.oof_scores) == 1
    # ... and what `cascade replay` serves through the proxy (train and test rows, the dataset's split)
    path = tmp_path / "world3.jsonl"
    synthetic.write(types.SimpleNamespace(rows=every), str(path))  # type: ignore[arg-type]
    assert main(["replay", str(path), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[-1])
    assert rep["stages"] == [three[0], three[2]] and rep["router"]["chosen"]
    assert len(rep["thresholds"]) == 1 and len(rep["escalation_rate"]) == 2
