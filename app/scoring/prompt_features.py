"""Features of a request alone, before any answer exists: what a router (route-then-cascade) sees.

Stdlib only and fast (tens of microseconds for a few-KB prompt). The vector is ``PROMPT_NAMES`` then,
when ``spec.hash_dim > 0``, signed CRC32-hashed tokens of the prompt's tail, as the answer features
hash theirs. A router saved with a ``kind: prompt`` feature spec is scored with :func:`prompt_features`.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from app.answers import messages_to_prompt
from app.scoring.feature_spec import PROMPT_NAMES, FeatureSpec

_TOKEN_RE = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
_NUM_RE = re.compile(r"\d+(?:\.\d+)?")
_OPTION_RE = re.compile(r"^\s*[\(\[]?([A-E])[\)\]\.:]\s+\S", re.MULTILINE)
_CODE_WORDS = ("def ", "return", "function", "class ", "import ", "```", "print(", "list", "string")
# str.translate tables that delete a class of characters: counting by length difference runs in C.
_DROP_DIGITS = str.maketrans("", "", "0123456789")
_DROP_UPPER = str.maketrans("", "", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DROP_MATH = str.maketrans("", "", "+-*/=^%<>")


def _log1p(x: float) -> float:
    return math.log1p(max(0.0, x))


def prompt_features(
    prompt: str, spec: FeatureSpec, messages: Sequence[Mapping[str, Any]] | None = None
) -> list[float]:
    """Fixed-size vector (``spec.dim`` floats) for one request. ``messages``, when given, adds how many
    there are and whether one is a system message."""
    p = prompt
    low = p.lower()
    n = len(p)
    f: dict[str, float] = {"bias_one": 1.0}
    f["log_chars"] = _log1p(n)
    f["log_words"] = _log1p(len(p.split()))
    f["log_lines"] = _log1p(p.count("\n"))
    f["log_numbers"] = _log1p(len(_NUM_RE.findall(p)))
    f["digit_share"] = (n - len(p.translate(_DROP_DIGITS))) / n if n else 0.0
    f["upper_share"] = (n - len(p.translate(_DROP_UPPER))) / n if n else 0.0
    f["question_marks"] = _log1p(p.count("?"))
    opts = {m for m in _OPTION_RE.findall(p[-1500:])}
    f["n_options"] = float(len(opts))
    f["has_options"] = 1.0 if len(opts) >= 2 else 0.0
    f["has_code"] = 1.0 if "```" in p or "def " in p else 0.0
    f["code_words"] = _log1p(sum(low.count(w) for w in _CODE_WORDS))
    f["math_symbols"] = _log1p(n - len(p.translate(_DROP_MATH)))
    f["log_longest_word"] = _log1p(max(map(len, p.split()), default=0))
    if messages is not None:
        f["n_messages"] = _log1p(len(messages))
        f["has_system"] = 1.0 if any(m.get("role") == "system" for m in messages) else 0.0
    vec = [f.get(name, 0.0) for name in PROMPT_NAMES]
    if spec.hash_dim > 0:
        vec.extend([0.0] * spec.hash_dim)
        toks = _TOKEN_RE.findall(low[-spec.prompt_tail_chars :] if spec.prompt_tail_chars > 0 else low)
        counts: dict[str, int] = {}
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
        if counts:
            scale = 1.0 / math.sqrt(len(counts))
            off = len(PROMPT_NAMES)
            for t, c in counts.items():
                h = zlib.crc32(b"q:" + t.encode("utf-8"))
                sign = 1.0 if (h >> 31) & 1 == 0 else -1.0
                vec[off + h % spec.hash_dim] += sign * scale * (1 + math.log(c))
    return vec


def request_prompt_features(request: Mapping[str, Any], spec: FeatureSpec) -> list[float]:
    """:func:`prompt_features` of a chat request body (the prompt text is ``messages_to_prompt``)."""
    raw = request.get("messages")
    messages = [m for m in raw if isinstance(m, dict)] if isinstance(raw, list) else []
    return prompt_features(messages_to_prompt(messages), spec, messages)
