"""What a request may run, decided once before the engine starts: its key's models and daily budget,
and the window of stages (per-request control, ``app.cascade.control``). Every endpoint that runs the
engine (chat completions, responses) calls ``admit`` with the key ``check_presented`` matched and the
two control headers, so they share one behaviour and one set of errors:

- a named key asking for a model outside its ``cascades``: 404 ``model_not_found``;
- a key over its daily budget: 429 ``budget_exceeded`` with ``retry-after`` until the UTC day ends, or,
  with ``over_budget_max_stage``, its requests capped to that stage;
- a bad stage value: 400 naming the field or header; steering by a key that may not: 403.
"""

from __future__ import annotations

from typing import Any

from app.budgets import Budgets
from app.cascade.control import Window, steer
from app.cascade.plan import Plan
from app.errors import ModelNotFound, RateLimited
from app.metrics import Metrics
from app.runtime import Runtime

Json = dict[str, Any]


def admit(
    rt: Runtime,
    budgets: Budgets,
    metrics: Metrics,
    key_index: int,
    plan: Plan,
    body: Json,
    min_header: str | None,
    max_header: str | None,
) -> tuple[Window | None, str | None]:
    """(the stages to run, None for all; the key's name for attribution, None for an unnamed key).
    Strips the ``cascade`` control field from ``body``."""
    nk = rt.named[key_index] if key_index >= 0 else None
    n = len(plan.stages)
    if nk is None:
        return steer(body, min_header, max_header, n, rt.plain), None
    if nk.models is not None and plan.name not in nk.models:
        raise ModelNotFound(
            f"The model '{plan.name[:200]}' does not exist or this API key may not use it.", param="model"
        )
    policy = nk.policy
    if nk.budget is not None and budgets.over(nk.name, nk.budget):
        if nk.over_budget is None:
            metrics.over_budget(nk.name, "rejected")
            raise RateLimited(
                f"This API key has spent its budget of ${nk.budget:g} for today (UTC); "
                "it resets at midnight UTC.",
                code="budget_exceeded",
                headers={"retry-after": str(budgets.retry_after())},
            )
        metrics.over_budget(nk.name, "capped")
        policy = nk.over_budget
    return steer(body, min_header, max_header, n, policy), nk.name
