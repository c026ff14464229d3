import json
import math
from pathlib import Path

import numpy as np
import pytest

from app.learning.fitting import fit_logistic
from app.scoring.feature_spec import FeatureSpec
from app.scoring.features import extract_features
from app.scoring.model import MODEL_FORMAT, LogisticModel


def _synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    logits = 2.0 * x[:, 0] - 1.0 * x[:, 1]
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(float)
    return x, y


def test_fit_recovers_signal() -> None:
    x, y = _synthetic()
    m = fit_logistic(x, y, l2=1.0, class_weight=None)
    assert m.coef[0] > 0.5 and m.coef[1] < -0.2 and abs(m.coef[2]) < 0.3
    p = np.array(m.predict_proba_many(x.tolist()))
    acc = float(((p >= 0.5) == (y > 0.5)).mean())
    assert acc > 0.75
    assert all(0.0 < v < 1.0 for v in p)


def test_l2_shrinks_coefficients() -> None:
    x, y = _synthetic()
    weak = fit_logistic(x, y, l2=0.01)
    strong = fit_logistic(x, y, l2=1000.0)
    assert sum(abs(c) for c in strong.coef) < sum(abs(c) for c in weak.coef)


def test_balanced_class_weight_centres_scores() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2))
    y = (rng.random(300) < 0.9).astype(float)  # mostly positive, no signal
    plain = fit_logistic(x, y, class_weight=None)
    bal = fit_logistic(x, y, class_weight="balanced")
    assert plain.predict_proba([0.0, 0.0]) > 0.8
    assert abs(bal.predict_proba([0.0, 0.0]) - 0.5) < 0.1


def test_sample_weights_matter() -> None:
    x = np.array([[0.0], [0.0], [1.0], [1.0]])
    y = np.array([0.0, 1.0, 0.0, 1.0])
    m = fit_logistic(x, y, class_weight=None, sample_weight=[1.0, 9.0, 1.0, 1.0], l2=0.1)
    assert m.predict_proba([0.0]) > m.predict_proba([1.0])


def test_constant_column_and_single_class() -> None:
    x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    m = fit_logistic(x, [1, 1, 1])
    assert m.predict_proba([1.0, 5.0]) > 0.5
    with pytest.raises(ValueError):
        fit_logistic(np.zeros((0, 2)), [])


def test_save_load_roundtrip(tmp_path: Path) -> None:
    spec = FeatureSpec(hash_dim=8)
    rows = [("What is 2+2?", "2 + 2 = 4\n#### 4", 1), ("What is 2+2?", "2 + 2 = 5\n#### 5", 0)] * 10
    x = [extract_features(p, a, spec=spec) for p, a, _ in rows]
    y = [lab for _, _, lab in rows]
    m = fit_logistic(x, y, feature_spec=spec, meta={"stage": 0})
    path = tmp_path / "sub" / "stage0.json"
    m.save(path)
    d = json.loads(path.read_text())
    assert d["format"] == MODEL_FORMAT and d["version"] == 1 and d["feature_spec"]["hash_dim"] == 8
    m2 = LogisticModel.load(path)
    for v in x[:2]:
        assert math.isclose(m.predict_proba(v), m2.predict_proba(v), rel_tol=1e-12)
    scorer = LogisticModel.load(path)
    good = scorer.score("What is 2+2?", "2 + 2 = 4\n#### 4")
    bad = scorer.score("What is 2+2?", "2 + 2 = 5\n#### 5")
    assert good > 0.5 > bad
    assert m2.meta["stage"] == 0
    assert m2.top_features(3)


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError):
        LogisticModel.load(p)
    x, y = _synthetic(50)
    m = fit_logistic(
        np.hstack([x, np.zeros((50, FeatureSpec(hash_dim=0).dim - 3))]),
        y,
        feature_spec=FeatureSpec(hash_dim=0),
    )
    d = m.to_dict()
    d["coef"] = d["coef"][:-1]
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError):
        LogisticModel.load(p)
