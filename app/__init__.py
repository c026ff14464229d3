"""cascade: an OpenAI-compatible proxy that answers with the cheapest model that is good enough."""

import os

# Fits (learned scorers, threshold searches, the online tuner) are small matrix work off the request
# path: one BLAS thread each, so a fit never takes every core from the requests beside it, and the same
# labels give the same fit whatever the machine's core count (OpenBLAS splits its sums by thread count,
# and the changed order flipped near-tied thresholds: an online run ended at 0.99 of the best model with
# one thread and 0.94 with two). Set OPENBLAS_NUM_THREADS yourself to choose otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
