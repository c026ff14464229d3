"""The learned scorer stays fast on adversarial answers (its equation regex used to backtrack
exponentially: a 12-term sum "100 + 101 + ... <<" took 20 s, blocking the event loop)."""

from __future__ import annotations

import random
import re
import time

from app.scoring.arithmetic import EQ_RE as _EQ_RE
from app.scoring.feature_spec import FeatureSpec
from app.scoring.features import extract_features

# The pattern before possessive whitespace / atomic numbers: the reference for equivalence.
_PLAIN_EQ_RE = re.compile(
    r"((?:\(?\s*-?\d+(?:\.\d+)?\s*\)?\s*[-+*/x×÷]\s*)+\(?\s*-?\d+(?:\.\d+)?\s*\)?)\s*=\s*(-?\d+(?:\.\d+)?)"
)


def test_equation_regex_matches_the_plain_pattern() -> None:
    rnd = random.Random(0)
    alphabet = "0123456789 .()=-+*/x×÷ab\n"
    samples = [
        "3 * 4 = 12 and (5 + 6) / 2 = 5.5",
        "<<500*105+250*150+450*45=72500+37500+20250=130250>>130250",
        "x - -3 = 7, 2 x 3 = 6, 1.5.2 = 3",
    ]
    samples += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 28))) for _ in range(3000)]
    for s in samples:
        assert _EQ_RE.findall(s) == _PLAIN_EQ_RE.findall(s), s


def test_features_of_a_long_sum_are_fast() -> None:
    answer = "So the total is " + " + ".join(str(100 + i) for i in range(40)) + " <<x>> and a = 1."
    t0 = time.perf_counter()
    extract_features("What is the total?", answer, (), spec=FeatureSpec(hash_dim=0))
    assert time.perf_counter() - t0 < 0.5  # was exponential (hours at 40 terms)
