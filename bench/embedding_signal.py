"""What a small text embedding would add to the learned scorer: out-of-fold AUC with and without it.

The embedding is WordLlama's ``l2_supercat_256`` (MIT; 256 dimensions, average-pooled token embeddings
taken from large language models' embedding tables), which the ``wordllama`` wheel on PyPI ships inside
it, weights and tokenizer both: nothing is downloaded at run time. (wordllama 0.4.0.post1's own
``WordLlama.load()`` looks for the tokenizer in a ``tokenizer/`` folder while the wheel has it in
``tokenizers/``, then tries Hugging Face; this script loads both files from the wheel itself.)

For each shared dataset and each of its models as a first stage: "this model's answer is correct",
predicted by a logistic fit (``app.learning.fitting.fit_logistic``, as the learned scorer is fitted) on
(a) the learned scorer's features (``app.scoring.features.extract_features`` with the fit's default
spec), (b) those and the
embedding of the prompt's end, (c) those and the embeddings of the prompt's end and of the answer, (d)
the two embeddings alone; every column standardised, ``--folds`` folds of every row, at each ``--l2``.
Printed per model, then the mean over the models per dataset. 0.5 is no signal.

Then, per dataset, whether the embedding could *label* answers in place of a judge (issue 13's
"semantic similarity with a calibrated cut-off"): for each model against the dataset's most accurate
one, the cosine similarity of the two answers as a predictor of "this answer is as good as the
reference model's" (what a label says): its AUC, and the share of labels right at the best cut-off
chosen on the same rows (an optimistic bound) against always saying "as good".

    .venv/bin/pip install wordllama        # a measurement's dependency, not the proxy's
    .venv/bin/python bench/embedding_signal.py [--data ../shared/data] [--datasets winogrande,gsm8k,mbpp]
                                               [--chars 1500] [--folds 5] [--l2 10,100] [--seed 0]

Exit 2 when the data or wordllama is missing. About 5 minutes for the three datasets on 2 CPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.learning.fitting import fit_logistic
from app.learning.routing import auc
from app.learning.train import DEFAULT_SPEC
from app.scoring.features import extract_features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.prompt_signal import shared_dataset

Matrix = npt.NDArray[np.float64]


def embedder() -> Any:
    """WordLlama's packaged 256-dimension model, loaded from the wheel's own files."""
    import wordllama  # optional: a measurement's dependency, imported here
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    root = Path(wordllama.__file__).parent
    with safe_open(str(root / "weights" / "l2_supercat_256.safetensors"), framework="np") as fh:
        table = fh.get_tensor("embedding.weight")
    tokenizer = Tokenizer.from_file(str(root / "tokenizers" / "l2_supercat_tokenizer_config.json"))
    return WordLlamaInference(table, tokenizer)


def standardise(x: Matrix) -> Matrix:
    return np.asarray((x - x.mean(0)) / (x.std(0) + 1e-9), dtype=np.float64)


def oof_auc(x: Matrix, y: Matrix, folds: npt.NDArray[np.int64], l2: float) -> float:
    pred = np.zeros(len(y))
    for k in np.unique(folds):
        fitted = fit_logistic(x[folds != k], y[folds != k], l2=l2)
        pred[folds == k] = fitted.predict_proba_many(x[folds == k].tolist())
    return auc(pred, y)


def best_cutoff_accuracy(sim: Matrix, good: Matrix) -> float:
    """The share of labels right when "as good" means similarity >= c, at the best c (in-sample)."""
    order = np.argsort(-sim)
    # c just below the i-th highest similarity: the top i are "as good", the rest not.
    hits_above = np.concatenate([[0.0], np.cumsum(good[order])])
    misses_below = (1 - good).sum() - np.concatenate([[0.0], np.cumsum(1 - good[order])])
    return float(((hits_above + misses_below) / len(good)).max())


def similarity_as_label(name: str, rows: list[Any], models: list[str], wl: Any) -> None:
    best = max(models, key=lambda m: sum(r.answers[m].correct for r in rows))
    ref = np.asarray(wl.embed([r.answers[best].answer[-4000:] or " " for r in rows], norm=True))
    aucs = []
    for model in models:
        if model == best:
            continue
        emb = np.asarray(wl.embed([r.answers[model].answer[-4000:] or " " for r in rows], norm=True))
        sim = np.asarray((emb * ref).sum(1), dtype=np.float64)
        good = np.array([float(r.answers[model].correct >= r.answers[best].correct) for r in rows])
        if good.min() == good.max():
            continue
        a = auc(sim, good)
        aucs.append(a)
        print(
            f"{name:10s} {model:36s} vs {best}: as good {good.mean():.3f} of the rows; similarity AUC "
            f"{a:.3f}; labels right at the best cut-off {best_cutoff_accuracy(sim, good):.3f}",
            flush=True,
        )
    if aucs:
        print(f"{name:10s} similarity as a label: AUC mean {statistics.mean(aucs):.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--datasets", default="winogrande,gsm8k,mbpp")
    ap.add_argument("--chars", type=int, default=1500, help="the prompt's last N characters are embedded")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--l2", default="10,100", help="penalties to try (the learned scorer's default: 10)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        wl = embedder()
    except ImportError as err:
        print(f"embedding_signal: {err}: pip install wordllama", file=sys.stderr)
        return 2
    penalties = [float(v) for v in args.l2.split(",")]
    rng = np.random.default_rng(args.seed)
    variants = ("features", "+prompt", "+prompt+answer", "embeddings only")
    for name in args.datasets.split(","):
        ds = shared_dataset(args.data, name, "embedding_signal")
        if ds is None:
            return 2
        rows = list(ds.train) + list(ds.test)
        folds = rng.permutation(len(rows)) % args.folds
        prompt_emb = standardise(
            np.asarray(wl.embed([r.prompt[-args.chars :] for r in rows]), dtype=np.float64)
        )
        means: dict[tuple[str, float], list[float]] = {}
        for model in ds.models:
            y = np.array([float(r.answers[model].correct) for r in rows])
            if y.min() == y.max():
                continue
            texts = [r.answers[model].answer for r in rows]
            feats = standardise(
                np.array(
                    [
                        extract_features(r.prompt, t, spec=DEFAULT_SPEC)
                        for r, t in zip(rows, texts, strict=True)
                    ]
                )
            )
            answer_emb = standardise(
                np.asarray(wl.embed([t[-2000:] or " " for t in texts]), dtype=np.float64)
            )
            designs = {
                "features": feats,
                "+prompt": np.hstack([feats, prompt_emb]),
                "+prompt+answer": np.hstack([feats, prompt_emb, answer_emb]),
                "embeddings only": np.hstack([prompt_emb, answer_emb]),
            }
            for l2 in penalties:
                cells = []
                for v in variants:
                    a = oof_auc(designs[v], y, folds, l2)
                    means.setdefault((v, l2), []).append(a)
                    cells.append(f"{v} {a:.3f}")
                print(f"{name:10s} {model:36s} l2 {l2:g}: " + "  ".join(cells), flush=True)
        for l2 in penalties:
            cells = [f"{v} {statistics.mean(means[(v, l2)]):.3f}" for v in variants if (v, l2) in means]
            print(f"{name:10s} {'mean over the models':36s} l2 {l2:g}: " + "  ".join(cells), flush=True)
        similarity_as_label(name, rows, list(ds.models), wl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
