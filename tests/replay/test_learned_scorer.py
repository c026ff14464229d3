"""The `learned` scorer as the proxy builds it: same score as the model file, inputs taken from the
request and the attempt trace, a missing file is a startup error."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, LearnedScorer, StageConfig
from app.learning.train import StageExample, crossfit_stage_scorer
from app.scoring.base import Answer, ScoreContext
from app.scoring.learned import Learned, answer_text
from app.scoring.model import LogisticModel as Model
from app.scoring.registry import ScorerDeps, build_stage_scorers

pytestmark = pytest.mark.anyio


def _model_file(tmp_path: Path) -> Path:
    examples, labels = [], []
    for i in range(40):
        ok = i % 2 == 0
        answer = f"{i} + 1 = {i + 1}. The answer is {i + 1}." if ok else f"I think maybe {i}, not sure."
        examples.append(StageExample(f"What is {i} + 1?", answer, ("x",) if i % 3 else ()))
        labels.append(ok)
    path = tmp_path / "stage0.json"
    crossfit_stage_scorer(examples, labels).model.save(path)
    return path


def _answer(content: str | None, stage: int = 0, **message: object) -> Answer:
    msg = {"role": "assistant", "content": content, **message}
    return Answer(msg, "stop", {"choices": [{"message": msg}]}, f"up{stage}", stage)


async def test_scores_like_the_model_file(tmp_path: Path) -> None:
    path = _model_file(tmp_path)
    scorer = Learned(LearnedScorer(type="learned", model=str(path)))
    model = Model.load(path)
    request = {"model": "c", "messages": [{"role": "user", "content": "What is 6 + 1?"}]}
    for text, prev in (("6 + 1 = 7. The answer is 7.", ["7"]), ("I think maybe 6, not sure.", [])):
        ctx = ScoreContext("c", len(prev), request, _answer(text, len(prev)), [_answer(p) for p in prev])
        got = await scorer.score(ctx)
        assert got.value == model.score("What is 6 + 1?", text, prev)
        assert got.reason.startswith("learned P(good)")
    good = await scorer.score(ScoreContext("c", 0, request, _answer("6 + 1 = 7. The answer is 7.")))
    bad = await scorer.score(ScoreContext("c", 0, request, _answer("I think maybe 6, not sure.")))
    assert good.value > 0.5 > bad.value


def test_tool_calls_are_scored_as_json() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    assert answer_text(_answer(None, tool_calls=[call])) == '[{"name":"add","arguments":"{\\"a\\": 1}"}]'
    assert answer_text(_answer("plain")) == "plain"


def test_missing_or_bad_model_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    for path in (tmp_path / "missing.json", bad):
        stage = StageConfig(
            upstream="u", threshold=0.5, scorers=(LearnedScorer(type="learned", model=str(path)),)
        )
        with pytest.raises(ConfigError) as exc:
            build_stage_scorers("cascades.c.stages[0]", stage, ScorerDeps(None, {"u": None}))  # type: ignore[arg-type]
        assert exc.value.problems[0].startswith("cascades.c.stages[0].scorers[0]: cannot load")
