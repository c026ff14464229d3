"""A small generated dataset in the shared/data format, with made-up models (never real data)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# name -> (accuracy, recorded cost per call in USD or None = estimate from the price table)
MODELS: dict[str, tuple[float, float | None]] = {
    "acme/tiny-1": (0.55, 2e-6),
    "bolt-mid": (0.72, 1e-5),
    "Zeta/Large-X": (0.9, 1e-4),
    "quark-xl": (0.91, None),
}


def rows(
    n: int = 150, seed: int = 7, models: dict[str, tuple[float, float | None]] | None = None
) -> list[dict[str, Any]]:
    """Arithmetic questions. A wrong answer usually hedges ("I think"), a right one rarely, so a learned
    scorer has signal; stronger models agree with each other more. Two rows share one prompt with
    different answers (the replay must tell them apart by id). Every 10th row has no split (hashed)."""
    rnd = random.Random(seed)
    models = models or MODELS
    out: list[dict[str, Any]] = []
    for i in range(n):
        a, b = rnd.randint(2, 99), rnd.randint(2, 99)
        prompt = f"Q{i}: What is {a} + {b}? Answer with the number."
        if i == n - 1:
            prompt = out[0]["prompt"]  # a duplicate prompt
        gold = a + b
        recs: dict[str, Any] = {}
        for m, (acc, cost) in models.items():
            ok = rnd.random() < acc
            val = gold if ok else gold + rnd.choice([-10, -1, 1, 2, 10])
            hedge = rnd.random() < (0.1 if ok else 0.75)
            text = f"I think it is {val}, not sure." if hedge else f"{a} + {b} = {val}. The answer is {val}."
            rec: dict[str, Any] = {"answer": text, "correct": ok}
            if cost is not None:
                rec["cost_usd"] = cost * (1 + 0.1 * rnd.random())
            recs[m] = rec
        row: dict[str, Any] = {
            "id": f"syn-{i}",
            "dataset": "synthetic",
            "prompt": prompt,
            "reference": gold,
            "models": recs,
        }
        if i % 10:
            row["split"] = "train" if i < n * 2 // 3 else "test"
        out.append(row)
    return out


def write(
    path: Path, n: int = 150, seed: int = 7, models: dict[str, tuple[float, float | None]] | None = None
) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows(n, seed, models)) + "\n", encoding="utf-8")
    return path


def routed_rows(n: int = 240, seed: int = 5, hard_share: float = 0.35) -> list[dict[str, Any]]:
    """A dataset where the prompt alone says when the cheap model will fail: "proof" questions are hard
    (the cheap model is wrong, and sure of itself, so its scorer cannot tell), the rest easy. The cheap
    call costs a third of the big one, so skipping it on hard prompts pays: what a router is for."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        a, b = rnd.randint(2, 99), rnd.randint(2, 99)
        hard = rnd.random() < hard_share
        prompt = (
            f"Q{i}: Prove, step by step and with a formal proof, what {a} + {b} is."
            if hard
            else f"Q{i}: What is {a} + {b}?"
        )
        gold = a + b
        recs: dict[str, Any] = {}
        for m, cost, p_ok in (("cheap", 3e-4, 0.02 if hard else 0.92), ("big", 1e-3, 0.97)):
            ok = rnd.random() < p_ok
            val = gold if ok else gold + rnd.choice([-10, -1, 1, 2, 10])
            recs[m] = {"answer": f"{a} + {b} = {val}. The answer is {val}.", "correct": ok, "cost_usd": cost}
        out.append(
            {
                "id": f"rt-{i}",
                "dataset": "routed",
                "prompt": prompt,
                "split": "train" if i < n * 2 // 3 else "test",
                "models": recs,
            }
        )
    return out


def write_routed(path: Path, n: int = 240, seed: int = 5) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in routed_rows(n, seed)) + "\n", encoding="utf-8")
    return path
