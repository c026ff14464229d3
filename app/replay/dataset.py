"""Recorded multi-model datasets for `cascade replay` (format: shared/data/README.md). Stdlib only.

One JSON object per line::

    {"id", "dataset", ["split"], "prompt", ["reference"], ["contaminated"],
     "models": {"<model>": {"answer", "correct", ["score"], ["cost_usd"]}}}

API::

    ds = load_dataset(path, prices=None, test_fraction=0.5, drop_contaminated=True)
    ds.models                       # models present in every row, cheapest (mean cost) first
    resplit(rows, n_test, seed, strata=None) -> rows with a new stratified random train/test split
    ds.train, ds.test               # lists of Row
    model_summary(rows, models) -> {model: ModelSummary(accuracy, mean_cost_usd, total_cost_usd, n)}
    best_single(summary) -> model   # most accurate, cheaper on ties
    quality_vs_best(accuracy, best_accuracy) -> float   # 1.0 when no model is ever right
    oracle(rows, models) -> OracleSummary(accuracy, mean_cost_usd, total_cost_usd)  # cheapest correct model
    estimate_cost_usd(model, prompt, answer, prices=None) -> float

Rules:

* UTF-8, with or without a byte order mark; LF or CRLF line ends.
* ``split`` missing -> deterministic: ``sha256(id)`` mapped to [0, 1); below ``test_fraction`` is test.
* ``id`` repeated -> the later rows become ``id#2``, ``id#3``, ... (each row is replayed as its own;
  a hashed split still uses the recorded id, so repeated rows stay on one side).
* ``contaminated: true`` rows are dropped (``drop_contaminated``).
* ``correct`` may be a bool, a number (>= 0.5 is right) or a word (true/false, yes/no, 1/0, correct/
  incorrect, right/wrong, pass/fail); anything else is a :class:`LabelError`. Without it a graded row
  (``score``, or MT-Bench's ``turn1_score``) is correct when ``score >= pass_score``; a row with
  neither, or a graded one without ``pass_score``, is a :class:`LabelError` naming the line, the row
  and the model; except that where every such score is 0 or 1 (RouterBench's own format, at least one
  0) they are read as wrong/right (``Dataset.scores_as_correct``).
* ``prompt`` missing -> the first of MT-Bench's ``turns``, or the OpenAI ``messages`` flattened as the
  proxy flattens a request's (:func:`app.answers.messages_to_prompt`); else empty (rows are then told
  apart by id).
* ``cost_usd`` a number (or a numeric string) from 0 to :data:`MAX_COST_USD`, else a ``ValueError``
  naming the line; missing or null -> estimated from a price table (USD per 1M tokens, input/output)
  with tokens ~= ceil(chars / 4): ``(ceil(len(prompt)/4) * input + ceil(len(answer)/4) * output) / 1e6``.
  :data:`DEFAULT_PRICES` holds list prices for common models, matched on the lower-cased name with
  any ``org/`` prefix removed, exactly, then by the longest table key that stands as whole parts of
  the name (not preceded by a letter or digit, not followed by one or by a dot). Unknown
  models get :data:`FALLBACK_PRICE` ($1 / $2 per 1M). Pass ``prices`` (``--price MODEL=IN,OUT``) to
  override or extend: its names match a model's name exactly (any case, with or without the ``org/``
  prefix), and each must match a model whose cost is estimated somewhere (a
  ``ValueError`` otherwise: a typo would price nothing). ``Dataset.prices`` says, for each model whose
  cost was estimated, the price used and where it came from (``--price``, ``list``, ``fallback``).
* The model set is discovered from the rows: models present in every kept row (others are listed in
  ``Dataset.partial_models`` and ignored); a model's record ``null`` means it is missing from that
  row. No model in every row, or a record that is not an object, is a ``ValueError`` naming the line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.answers import messages_to_prompt
from app.errors import CascadeBaseError
from app.learning.rows import ModelAnswer, Row

# USD per 1M tokens (input, output). Early-2024 list prices; documented, override via `prices=`.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.5, 10.0),
    "gpt-4": (30.0, 60.0),
    "gpt-3.5-turbo": (0.5, 1.5),
    "gpt-3.5-turbo-1106": (1.0, 2.0),
    "mixtral-8x7b": (0.6, 0.6),
    "mixtral-8x7b-instruct-v0.1": (0.6, 0.6),
    "mistral-7b": (0.2, 0.2),
    "llama-2-70b": (0.9, 0.9),
    "llama-3-70b": (0.9, 0.9),
    "llama-3-8b": (0.2, 0.2),
    "claude-v2": (8.0, 24.0),
    "claude-v1": (8.0, 24.0),
    "claude-instant-v1": (0.8, 2.4),
    "claude-3-haiku": (0.25, 1.25),
    "claude-3-sonnet": (3.0, 15.0),
    "claude-3-opus": (15.0, 75.0),
    "yi-34b": (0.8, 0.8),
    "wizardlm-13b": (0.3, 0.3),
    "code-llama-instruct-34b": (0.776, 0.776),
    # later in 2024 (as FrugalGPT's 2024 price table has them)
    "claude-3.5-sonnet": (3.0, 15.0),
    "claude-3-5-sonnet": (3.0, 15.0),
    "gemini-1.5-pro": (1.25, 5.0),
    "gemini-1.5-flash": (0.075, 0.3),
    "gemini-1.5-flash-8b": (0.0375, 0.15),
    "gemma-2-9b": (0.3, 0.3),
    "jamba-1.5-large": (2.0, 8.0),
}
FALLBACK_PRICE: tuple[float, float] = (1.0, 2.0)
# A listed name inside a longer one prices it only where it stands as whole parts of that name:
# "gpt-4" prices "gpt-4-0613" and "openai/gpt-4", not "gpt-4.1-mini" or "gpt-4o" (other models).
_BEFORE = re.compile(r"[a-z0-9]")
_AFTER = re.compile(r"[a-z0-9.]")


PRICE_GIVEN, PRICE_LISTED, PRICE_FALLBACK = "--price", "list", "fallback"


def price_key(model: str, table: Mapping[str, tuple[float, float]], *, contained: bool = True) -> str | None:
    """The key of ``table`` that prices ``model``: its name (any case, or without an ``org/`` prefix),
    else (``contained``, as for the list prices) the longest key contained in its lower-cased name;
    None when none does. The user's ``--price`` names a model exactly: ``gpt-4`` must not price
    ``gpt-4o-mini`` too."""
    low = {k.lower(): k for k in table}
    name = model.lower()
    for key in (name, name.rsplit("/", 1)[-1]):
        if key in low:
            return low[key]
    hits = [k for k in low if _stands_in(k, name)] if contained else []
    return low[max(hits, key=len)] if hits else None


def _stands_in(key: str, name: str) -> bool:
    """Whether ``key`` is a run of whole parts of ``name``: not preceded by a letter or digit, and not
    followed by one or by a dot (a version: "gpt-4" in "gpt-4.1" is another model)."""
    at = name.find(key)
    while at >= 0:
        end = at + len(key)
        if (at == 0 or not _BEFORE.match(name[at - 1])) and (end == len(name) or not _AFTER.match(name[end])):
            return True
        at = name.find(key, at + 1)
    return False


def price_for(
    model: str, prices: Mapping[str, tuple[float, float]] | None = None
) -> tuple[tuple[float, float], str]:
    """(input, output) USD per 1M tokens for ``model``, and where it came from: ``prices`` (the user's,
    first), the list prices, or the fallback."""
    for table, source in ((prices or {}, PRICE_GIVEN), (DEFAULT_PRICES, PRICE_LISTED)):
        key = price_key(model, table, contained=source == PRICE_LISTED)
        if key is not None:
            return table[key], source
    return FALLBACK_PRICE, PRICE_FALLBACK


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def estimate_cost_usd(
    model: str, prompt: str, answer: str, prices: Mapping[str, tuple[float, float]] | None = None
) -> float:
    (pin, pout), _ = price_for(model, prices)
    return (estimate_tokens(prompt) * pin + estimate_tokens(answer) * pout) / 1e6


def hash_split(row_id: str, test_fraction: float = 0.5) -> str:
    h = int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if h < test_fraction else "train"


@dataclass
class Dataset:
    name: str
    rows: list[Row]
    models: list[str]  # in every row, cheapest first
    partial_models: list[str] = field(default_factory=list)
    n_dropped_contaminated: int = 0
    split_from_hash: bool = False
    cost_estimated: bool = False
    scores_as_correct: bool = False  # 'score' 0/1 without 'correct', read as right/wrong
    n_dropped_incomplete: int = 0  # rows left out for lacking a model that nearly every row records
    # per model whose cost was estimated in some row: {"input", "output" (USD per 1M tokens), "source"}
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def train(self) -> list[Row]:
        return [r for r in self.rows if r.split == "train"]

    @property
    def test(self) -> list[Row]:
        return [r for r in self.rows if r.split == "test"]


_TRUE = {"true", "1", "yes", "correct", "right", "pass"}
_FALSE = {"false", "0", "no", "incorrect", "wrong", "fail"}


def _as_bool(v: Any, where: str) -> bool | None:
    """A recorded ``correct`` (None when there is none); a value that says neither right nor wrong ("N/A",
    a list...) is a :class:`LabelError` naming ``where``: counting it as wrong would skew every figure."""
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and math.isfinite(v):
        return float(v) >= 0.5
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise LabelError(
        f"{where}.correct is {str(v)[:40]!r}: true/false, 1/0 or yes/no "
        "(leave it out and give a 'score' for a graded dataset)"
    )


_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8(s: str) -> str:
    """``s``, with any lone UTF-16 surrogate (JSON allows "\\ud83d" alone; no UTF-8 text holds it, so no
    HTTP body can carry it) replaced by U+FFFD, as a UTF-8 decoder replaces what it cannot read."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", s)  # (json.loads joins the pairs: what is left is lone)
    return s


def _answer_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return json.dumps(v, sort_keys=True)


class LabelError(CascadeBaseError, ValueError):
    """A row without the correctness a replay needs (``correct``, or ``score`` with a pass score)."""


def _number(v: Any) -> float | None:
    """A recorded number, or one written as a string ("8", "1e-4"); None for anything else (a bool too)
    and for no value."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _score(v: Any, where: str, needed: bool) -> float | None:
    """A recorded grade (``score``, MT-Bench's ``turn1_score``): a number, or one written as a string;
    None when there is none. Anything else is a :class:`LabelError` naming ``where`` when the grade is
    ``needed`` (no ``correct``), else None."""
    x = _number(v)
    if v is None or (x is not None and math.isfinite(x)):
        return x
    if needed:
        raise LabelError(f"{where}.score is {str(v)[:40]!r}: a finite number (the answer's grade)")
    return None


def _graded(score: float | None, pass_score: float | None, lineno: int, rid: str, model: str) -> bool:
    if score is None:
        raise LabelError(
            f"line {lineno} (id {rid!r}): models.{model} has no 'correct' (true/false) and no 'score': "
            "a replay needs to know whether each recorded answer was right"
        )
    if pass_score is None:
        raise LabelError(
            f"line {lineno} (id {rid!r}): models.{model} has a 'score' ({score:g}) but no 'correct': "
            "for a graded dataset say which score passes, e.g. --pass-score 8 (scores of only 0 and 1 "
            "are read as wrong/right)"
        )
    return score >= pass_score


MAX_MISSING_SHARE = 0.02  # a model missing from at most this share of the rows: those rows are left out

MAX_COST_USD = 1e6  # per call: above it a figure is not USD (and sums of such overflow to inf/NaN)


def _recorded_cost(v: Any, lineno: int, rid: str, model: str) -> float | None:
    """A recorded ``cost_usd`` (a number, or a number written as a string); None when there is none
    (the cost is estimated). A negative, non-finite or non-numeric cost is a ``ValueError``: estimating
    it instead would put other figures in the report than the dataset's."""
    if v is None:
        return None
    x = _number(v)
    if x is None or not math.isfinite(x) or not 0.0 <= x <= MAX_COST_USD:
        raise ValueError(
            f"line {lineno} (id {rid!r}): models.{model}.cost_usd is {str(v)[:40]!r}: the cost of the call "
            f"in USD, a number from 0 to {MAX_COST_USD:g} (leave it out to estimate it from the text)"
        )
    return x


def _unique_id(rid: str, seen: dict[str, int]) -> str:
    """``rid``, or ``rid#2``, ``rid#3``, ... when an earlier row has it: a replay tells rows apart by id
    (the replay upstream among rows sharing a prompt, the online stream), so each row gets its own."""
    if rid not in seen:
        seen[rid] = 1
        return rid
    k = seen[rid] + 1
    while f"{rid}#{k}" in seen:
        k += 1
    seen[rid] = k
    seen[f"{rid}#{k}"] = 1
    return f"{rid}#{k}"


def _no_common_model(rows: Sequence[Row], linenos: Sequence[int], models: Sequence[str]) -> str:
    """Why no model is in every row, naming rows: a replay only uses the models every row records."""
    where = [(ln, r) for ln, r in zip(linenos, rows, strict=True) if not r.answers]
    if where:
        ln, r = where[0]
        return f"line {ln} (id {r.id!r}): 'models' records no model (a replay needs every row to record one)"
    gaps = []
    for m in models[:3]:
        ln, r = next((ln, r) for ln, r in zip(linenos, rows, strict=True) if m not in r.answers)
        gaps.append(f"models.{m} is missing from line {ln} (id {r.id!r})")
    more = f" (and {len(models) - 3} more models)" if len(models) > 3 else ""
    return f"no model is recorded in every row: {'; '.join(gaps)}{more}"


def parse_rows(
    lines: Iterable[str],
    prices: Mapping[str, tuple[float, float]] | None = None,
    test_fraction: float = 0.5,
    drop_contaminated: bool = True,
    name: str = "",
    pass_score: float | None = None,
    check_prices: bool = True,
) -> Dataset:
    rows: list[Row] = []
    linenos: list[int] = []  # each row's line, for messages
    seen_ids: dict[str, int] = {}
    dropped = 0
    binary: dict[float, tuple[int, str, str]] = {}  # score 0/1 read as correctness: where each was first
    hashed = False
    estimated = False
    priced: set[str] = set()  # models with an estimated cost in some row
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {lineno}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("models"), dict):
            raise ValueError(f"line {lineno}: expected an object with a 'models' object")
        if drop_contaminated and bool(obj.get("contaminated")):
            dropped += 1
            continue
        rid = _utf8(str(obj["id"])) if obj.get("id") is not None else f"row{lineno}"
        key = _unique_id(rid, seen_ids)
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            turns, messages = obj.get("turns"), obj.get("messages")
            if isinstance(turns, list) and turns and isinstance(turns[0], str):
                prompt = turns[0]
            elif isinstance(messages, list):
                prompt = messages_to_prompt([m for m in messages if isinstance(m, dict)])
            else:
                prompt = ""
        prompt = _utf8(prompt)
        split = obj.get("split")
        if isinstance(split, str) and split.strip().lower() in ("train", "test"):
            split = split.strip().lower()
        elif split is None or split == "":
            split = hash_split(rid, test_fraction)
            hashed = True
        else:  # "dev", "validation"...: which side it goes is the user's call, not a hash's
            raise ValueError(
                f"line {lineno} (id {rid!r}): split is {str(split)[:40]!r}: 'train' or 'test' (leave it out "
                "and rows are split by a hash of their id)"
            )
        answers: dict[str, ModelAnswer] = {}
        for m, rec in obj["models"].items():
            if rec is None:  # not run on this row: the model is missing from it
                continue
            if not isinstance(rec, dict):
                raise ValueError(
                    f"line {lineno} (id {rid!r}): models.{m} is {type(rec).__name__}, not an object "
                    "with 'answer' and 'correct'"
                )
            text = _utf8(_answer_text(rec.get("answer")))
            where = f"line {lineno} (id {rid!r}): models.{m}"
            corr = _as_bool(rec.get("correct"), where)
            score_f = _score(rec.get("score", rec.get("turn1_score")), where, needed=corr is None)
            if corr is None and pass_score is None and score_f in (0.0, 1.0):
                # 0/1 scores (RouterBench's own format) are right/wrong, if no other score appears
                corr = score_f == 1.0
                binary.setdefault(score_f, (lineno, rid, m))
            elif corr is None:
                corr = _graded(score_f, pass_score, lineno, rid, m)
            cost = _recorded_cost(rec.get("cost_usd"), lineno, rid, m)
            if cost is not None:
                answers[m] = ModelAnswer(text, corr, cost, False, score_f)
            else:
                estimated = True
                priced.add(m)
                answers[m] = ModelAnswer(
                    text, corr, estimate_cost_usd(m, prompt, text, prices), True, score_f
                )
        rows.append(
            Row(key, prompt, str(split), answers, obj.get("reference"), str(obj.get("dataset", name)))
        )
        linenos.append(lineno)
    if not rows:
        raise ValueError("dataset has no usable rows")
    if binary and 0.0 not in binary:  # only 1s: a graded scale (1-10) as likely as 0/1
        lineno, rid, m = binary[1.0]
        _graded(1.0, pass_score, lineno, rid, m)
    all_models: set[str] = set()
    for r in rows:
        all_models.update(r.answers)
    # A model missing from a few rows (a failed call in the recording) costs those rows, not the model:
    # leaving the best model out over one row would measure every figure against a weaker one.
    have = {m: sum(1 for r in rows if m in r.answers) for m in all_models}
    near = [m for m in all_models if 0 < len(rows) - have[m] <= MAX_MISSING_SHARE * len(rows)]
    incomplete = 0
    if near and all(r.answers for r in rows):  # (a row recording no model is an error, below)
        keep = [i for i, r in enumerate(rows) if all(m in r.answers for m in near)]
        incomplete = len(rows) - len(keep)
        rows, linenos = [rows[i] for i in keep], [linenos[i] for i in keep]
    common = [m for m in all_models if all(m in r.answers for r in rows)]
    if not common:
        raise ValueError(_no_common_model(rows, linenos, sorted(all_models)))
    partial = sorted(all_models - set(common))
    mean_cost = {m: sum(r.answers[m].cost_usd for r in rows) / len(rows) for m in common}
    common.sort(key=lambda m: (mean_cost[m], m))
    ds_name = name or (rows[0].dataset if rows[0].dataset else "dataset")
    used = {}
    for m in sorted(priced & set(common)):
        (pin, pout), source = price_for(m, prices)
        used[m] = {"input": pin, "output": pout, "source": source}
    if prices and check_prices:
        _check_prices(prices, sorted(all_models), common, used)
    return Dataset(ds_name, rows, common, partial, dropped, hashed, estimated, bool(binary), incomplete, used)


def price_notes(prices: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a report says of the costs it estimated (``Dataset.prices``): at which price, from where,
    and which models had no price known (their place in a cascade is then a guess)."""
    if not prices:
        return []
    origin = {PRICE_GIVEN: "--price", PRICE_LISTED: "list price", PRICE_FALLBACK: "no price known"}
    said = ", ".join(
        f"{m} ${v['input']:g}/${v['output']:g} ({origin.get(v['source'], v['source'])})"
        for m, v in sorted(prices.items())
    )
    notes = [
        "no cost_usd recorded: costs estimated from the texts' lengths (about 4 characters a token) at "
        f"USD per 1M input/output tokens: {said}"
    ]
    unknown = sorted(m for m, v in prices.items() if v["source"] == PRICE_FALLBACK)
    if unknown:
        notes.append(
            f"no price known for {', '.join(unknown)}: ${FALLBACK_PRICE[0]:g}/${FALLBACK_PRICE[1]:g} "
            "assumed, so the cascade's order and savings are guesses; give "
            f"--price {unknown[0]}=INPUT,OUTPUT (USD per 1M tokens)"
        )
    return notes


def unused_prices(
    prices: Mapping[str, tuple[float, float]], *used: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """The names of ``prices`` (``--price``) that priced no model in any of ``used`` (``Dataset.prices``
    of the datasets of a run): a typo, or a model whose every cost is recorded, would change nothing."""
    return [
        key
        for key in prices
        if not any(
            v["source"] == PRICE_GIVEN and price_key(m, prices, contained=False) == key
            for table in used
            for m, v in table.items()
        )
    ]


def _check_prices(
    prices: Mapping[str, tuple[float, float]],
    models: list[str],
    common: list[str],
    used: Mapping[str, Mapping[str, Any]],
) -> None:
    """Each of the user's prices must price a model the replay uses, else a ``ValueError`` saying why."""
    unused = unused_prices(prices, used)
    if not unused:
        return
    key = unused[0]
    named = [m for m in models if price_key(m, {key: (0.0, 0.0)}, contained=False) is not None]
    if not named:
        raise ValueError(f"--price {key}: no model of the dataset matches (models: {', '.join(models)})")
    kept = [m for m in named if m in common]
    if not kept:
        raise ValueError(f"--price {key}: {', '.join(named)} is left out (not recorded in every row)")
    raise ValueError(
        f"--price {key}: every row records the cost_usd of {', '.join(kept)}; --price only prices "
        "answers without a recorded cost"
    )


def name_missing_texts(ds: Dataset) -> Dataset:
    """``ds`` with the answers of each model that records no text in any row (RouteLLM's MT-Bench,
    correctness-only exports) standing as a placeholder naming the model, for ``--online``: its labels
    compare a stage's answer with the last stage's, and the replay judge finds each answer among the
    row's recorded ones by its text, so empty texts, all alike, gave no label at all while the label
    calls were paid for. The placeholder is no answer a model could give: the scorers learn nothing
    from it, as from an empty text. Costs stay as recorded or estimated (from no text)."""
    textless = [
        m
        for m in ds.models + ds.partial_models
        if all(not r.answers[m].answer for r in ds.rows if m in r.answers)
    ]
    if not textless:
        return ds
    rows = []
    for r in ds.rows:
        answers = {
            m: dataclasses.replace(a, answer=f"(no answer text recorded for {m})") if m in textless else a
            for m, a in r.answers.items()
        }
        rows.append(dataclasses.replace(r, answers=answers))
    return dataclasses.replace(ds, rows=rows)


def load_dataset(
    path: str | os.PathLike[str],
    prices: Mapping[str, tuple[float, float]] | None = None,
    test_fraction: float = 0.5,
    drop_contaminated: bool = True,
    pass_score: float | None = None,
    check_prices: bool = True,
) -> Dataset:
    p = Path(path)
    with p.open(encoding="utf-8-sig") as fh:  # a BOM (as Windows tools write) is not data
        return parse_rows(
            fh, prices, test_fraction, drop_contaminated, p.stem, pass_score, check_prices=check_prices
        )


def resplit(rows: Sequence[Row], n_test: int, seed: int, strata: Sequence[Any] | None = None) -> list[Row]:
    """The rows with a new random train/test split: ``n_test`` test rows, drawn within each stratum
    in proportion (largest remainders), seeded. Returns the rows with their ``split`` replaced."""
    import random

    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(strata if strata is not None else [0] * len(rows)):
        groups.setdefault(key, []).append(i)
    n = len(rows)
    quota = {k: len(v) * n_test / n for k, v in groups.items()}
    take = {k: int(q) for k, q in quota.items()}
    for k in sorted(groups, key=lambda k: (-(quota[k] - take[k]), str(k)))[: n_test - sum(take.values())]:
        take[k] += 1
    test: set[int] = set()
    for k in sorted(groups, key=str):
        test.update(rng.sample(groups[k], take[k]))
    return [dataclasses.replace(r, split="test" if i in test else "train") for i, r in enumerate(rows)]


@dataclass(frozen=True)
class ModelSummary:
    accuracy: float
    mean_cost_usd: float
    total_cost_usd: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "cost_usd": self.mean_cost_usd,
            "total_cost_usd": self.total_cost_usd,
        }


def model_summary(rows: Sequence[Row], models: Sequence[str]) -> dict[str, ModelSummary]:
    n = len(rows)
    out: dict[str, ModelSummary] = {}
    for m in models:
        acc = sum(1 for r in rows if r.answers[m].correct) / n if n else 0.0
        tot = sum(r.answers[m].cost_usd for r in rows)
        out[m] = ModelSummary(acc, tot / n if n else 0.0, tot, n)
    return out


def best_single(summary: Mapping[str, ModelSummary]) -> str:
    """Most accurate model; among equally accurate ones the cheapest."""
    return min(summary, key=lambda m: (-round(summary[m].accuracy, 9), summary[m].mean_cost_usd))


def savings_vs_best(cost: float, best_cost: float) -> float | None:
    """1 - cost / the best single model's cost. None where the best model costs nothing and ``cost`` is
    more: no share of nothing is saved (it read as 0 % saved, whatever the cascade spent)."""
    if best_cost > 0:
        return 1.0 - cost / best_cost
    return 0.0 if cost <= 0 else None


def quality_vs_best(accuracy: float, best_accuracy: float) -> float:
    """Accuracy relative to the best single model's. When the best is never right (offline no model is,
    nor anything choosing among them) the answer is as good as the best: 1.0, not 0 (a missed target)."""
    return accuracy / best_accuracy if best_accuracy > 0 else 1.0


def quality_vs_best_se(correct: Sequence[bool], best_correct: Sequence[bool]) -> float | None:
    """The standard error of ``quality_vs_best`` that comes from the test rows alone: how far the same
    policy's figure would move on another draw of as many rows (delta method for the ratio of the two
    means; within a few per cent of a bootstrap's on the shared sets). None under two rows or where the
    best model is never right (the ratio is then fixed at 1.0)."""
    n = len(correct)
    hits = sum(best_correct)
    if n < 2 or hits == 0:
        return None
    ratio = sum(correct) / hits
    d = [float(c) - ratio * float(b) for c, b in zip(correct, best_correct, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return math.sqrt(var / n) / (hits / n)


@dataclass(frozen=True)
class OracleSummary:
    accuracy: float
    mean_cost_usd: float
    total_cost_usd: float

    def to_dict(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "cost_usd": self.mean_cost_usd,
            "total_cost_usd": self.total_cost_usd,
        }


def oracle(rows: Sequence[Row], models: Sequence[str], cascade: bool = False) -> OracleSummary:
    """Per row the cheapest correct model (else the cheapest): an unreachable upper bound.

    ``cascade=False`` charges only that model (a perfect router); ``cascade=True`` charges every model
    tried in increasing price order up to the first correct one (a perfect-scorer cascade).
    """
    n = len(rows)
    if n == 0 or not models:
        return OracleSummary(0.0, 0.0, 0.0)
    correct = 0
    total = 0.0
    for r in rows:
        order = sorted(models, key=lambda m: (r.answers[m].cost_usd, m))
        hit = next((m for m in order if r.answers[m].correct), None)
        if hit is not None:
            correct += 1
        if cascade:
            upto = order if hit is None else order[: order.index(hit) + 1]
            total += sum(r.answers[m].cost_usd for m in upto)
        else:
            total += r.answers[hit if hit is not None else order[0]].cost_usd
    return OracleSummary(correct / n, total / n, total)
