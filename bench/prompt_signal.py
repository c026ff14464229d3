"""How much the prompt alone tells about whether a model will be right: the ceiling of prompt-side signals.

For each shared dataset and each of its models: hashed unigrams and bigrams of the prompt's last
``--chars`` characters (the question itself: WinoGrande's prompts start with few-shot examples), a
logistic fit (``app.learning.fitting.fit_logistic``), and the out-of-fold AUC over ``--folds`` folds of
every row for "this model's answer is correct". 0.5 is no signal. A prompt embedding or a prompt-only
router can do better than bag-of-words only where the topic or form of a question predicts its
difficulty; this measures whether there is any to find.

    .venv/bin/python bench/prompt_signal.py [--data ../shared/data] [--datasets winogrande,gsm8k]
                                            [--chars 1500] [--folds 5] [--l2 1.0] [--seed 0]

Exit 2 when the data is missing. About 2 minutes for the two default datasets on 2 CPUs.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.learning.fitting import fit_logistic
from app.learning.routing import auc
from app.replay.dataset import Dataset, load_dataset

DATASETS = {
    "winogrande": "routerbench/winogrande.jsonl",
    "gsm8k": "routellm/gsm8k.jsonl",
    "mbpp": "routerbench/mbpp.jsonl",
}
DIM = 2048
_WORD = re.compile(r"[a-z]+")


def features(prompt: str, chars: int) -> npt.NDArray[np.float64]:
    """L2-normalised hashed counts of the lower-cased words and word pairs of the prompt's end."""
    v = np.zeros(DIM)
    words = _WORD.findall(prompt[-chars:].lower())
    for w in words:
        v[zlib.crc32(w.encode()) % DIM] += 1.0
    for a, b in itertools.pairwise(words):
        v[zlib.crc32(f"{a} {b}".encode()) % DIM] += 1.0
    n = float(np.linalg.norm(v))
    return v / n if n else v


def shared_dataset(data: str, name: str, who: str) -> Dataset | None:
    """The shared dataset ``name`` under ``data``; None, saying so on stderr, when it is not there."""
    path = Path(data) / DATASETS[name]
    if not path.is_file():
        print(f"{who}: {path}: not found (--data points at shared/data)", file=sys.stderr)
        return None
    return load_dataset(str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--datasets", default="winogrande,gsm8k")
    ap.add_argument("--chars", type=int, default=1500)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for name in args.datasets.split(","):
        ds = shared_dataset(args.data, name, "prompt_signal")
        if ds is None:
            return 2
        rows = list(ds.train) + list(ds.test)
        X = np.array([features(r.prompt, args.chars) for r in rows])
        folds = rng.permutation(len(rows)) % args.folds
        for model in ds.models:
            y = np.array([float(r.answers[model].correct) for r in rows])
            oof = np.zeros(len(rows))
            for k in range(args.folds):
                fitted = fit_logistic(X[folds != k], y[folds != k], l2=args.l2)
                oof[folds == k] = fitted.predict_proba_many(X[folds == k].tolist())
            print(f"{name:10s} {model:40s} accuracy {y.mean():.3f}  out-of-fold AUC {auc(oof, y):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
