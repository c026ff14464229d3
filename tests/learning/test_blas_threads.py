"""The cascade process runs its fits on one BLAS thread unless told otherwise (``app/__init__.py``): the
same labels then give the same fit whatever the machine's core count (an online replay's path flipped
with the thread count, as OpenBLAS splits its sums by threads), and a fit never takes every core."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# What numpy's own OpenBLAS says it uses (the wheels bundle scipy-openblas); "none" where this numpy
# has another BLAS.
SHOW = """
import ctypes, glob, os
import app.cli, numpy
libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__) + ".libs", "*openblas*"))
get = None
for path in libs:
    lib = ctypes.CDLL(path)
    get = getattr(lib, "scipy_openblas_get_num_threads64_", None)
    get = get or getattr(lib, "openblas_get_num_threads", None)
    if get is not None:
        break
print(os.environ.get("OPENBLAS_NUM_THREADS"), get() if get is not None else "none")
"""


def _run(env_value: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if env_value is not None:
        env["OPENBLAS_NUM_THREADS"] = env_value
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("2", "2")])
def test_one_blas_thread_unless_the_operator_says_otherwise(given: str | None, seen: str) -> None:
    var, threads = _run(given)
    assert var == seen
    if threads == "none":
        pytest.skip("this numpy has no OpenBLAS of its own to ask")
    assert threads == seen  # the library itself runs on that many threads
