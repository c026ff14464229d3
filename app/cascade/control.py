"""Per-request control: which stages a request may run, from the client and from its key.

A client steers with headers ``x-cascade-min-stage`` / ``x-cascade-max-stage`` or a request field
``cascade: {"min_stage": N, "max_stage": N}`` (what an SDK's ``extra_body`` sends). The field is taken
out of the body here, before any upstream sees it. ``min_stage`` starts the cascade at that stage (no
earlier stage is called); ``max_stage`` makes that stage the last (its answer is served unscored).
A key may cap the highest stage (``auth.keys[].max_stage``, and ``over_budget_max_stage`` once over its
budget) and may be denied steering (``stage_control: false``).

Every HTTP endpoint that runs the engine (chat completions, responses) calls ``steer``: one parser,
one set of messages. Bad values are the client's error: 400 naming the field (or the header).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import Forbidden, InvalidRequest

Json = dict[str, Any]
FIELD = "cascade"
MIN_HEADER = "x-cascade-min-stage"
MAX_HEADER = "x-cascade-max-stage"


@dataclass(slots=True, frozen=True)
class Policy:
    """What the request's key allows: the highest stage (None: any) and whether it may steer."""

    max_stage: int | None = None
    may_steer: bool = True


OPEN = Policy()


@dataclass(slots=True, frozen=True)
class Window:
    """The stages a request runs: ``first`` to ``last`` inclusive (``last`` is served unscored)."""

    first: int
    last: int
    steered: bool = False  # the client, or its key, changed it from the whole cascade


def _stage_value(raw: object, where: str, n: int) -> int:
    if isinstance(raw, str):
        text = raw.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 6):  # "²" is a digit to str.isdigit
            raise InvalidRequest(f"'{where}' must be a stage number (0 to {n - 1})", param=where)
        value = int(text)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    else:
        raise InvalidRequest(f"'{where}' must be an integer stage number (0 to {n - 1})", param=where)
    if not 0 <= value < n:
        raise InvalidRequest(
            f"'{where}' is {value}, out of range: this model has stages 0 to {n - 1}", param=where
        )
    return value


def _requested(body: Json, min_header: str | None, max_header: str | None, n: int) -> tuple[Any, ...]:
    """(min, max, min's name, max's name) as the client gave them; strips the body field."""
    field = body.pop(FIELD, None)
    lo: int | None = None
    hi: int | None = None
    lo_name, hi_name = MIN_HEADER, MAX_HEADER
    if min_header is not None:
        lo = _stage_value(min_header, MIN_HEADER, n)
    if max_header is not None:
        hi = _stage_value(max_header, MAX_HEADER, n)
    if field is not None:
        if not isinstance(field, dict):
            raise InvalidRequest(
                f'\'{FIELD}\' must be an object like {{"min_stage": 0, "max_stage": 1}}', param=FIELD
            )
        for k in field:
            if k not in ("min_stage", "max_stage"):
                name = f"{FIELD}.{str(k)[:40]}"
                raise InvalidRequest(f"'{name}' is not a known field (min_stage, max_stage)", param=name)
        for key, header, current in (("min_stage", MIN_HEADER, lo), ("max_stage", MAX_HEADER, hi)):
            raw = field.get(key)
            if raw is None:
                continue
            name = f"{FIELD}.{key}"
            if isinstance(raw, str):  # JSON has integers: only a header is text
                raise InvalidRequest(f"'{name}' must be an integer stage number (0 to {n - 1})", param=name)
            value = _stage_value(raw, name, n)
            if current is not None and current != value:
                raise InvalidRequest(
                    f"'{name}' ({value}) contradicts header {header} ({current})", param=name
                )
            if key == "min_stage":
                lo, lo_name = value, name
            else:
                hi, hi_name = value, name
    return lo, hi, lo_name, hi_name


def steer(
    body: Json, min_header: str | None, max_header: str | None, n_stages: int, policy: Policy = OPEN
) -> Window | None:
    """The window of stages this request runs, or None for the whole cascade (the common case, and
    the cheap one: one dict lookup). Removes the ``cascade`` field from ``body``. Raises
    InvalidRequest (400) for a bad or out-of-range value, Forbidden (403) when the key may not steer."""
    if min_header is None and max_header is None and FIELD not in body and policy.max_stage is None:
        return None
    lo, hi, lo_name, hi_name = _requested(body, min_header, max_header, n_stages)
    steered = lo is not None or hi is not None
    if steered and not policy.may_steer:
        raise Forbidden(
            "This API key may not choose stages (x-cascade-min-stage, x-cascade-max-stage, 'cascade').",
            param=lo_name if lo is not None else hi_name,
            code="stage_control_forbidden",
        )
    last = n_stages - 1 if hi is None else hi
    if policy.max_stage is not None and policy.max_stage < last:
        last, steered = policy.max_stage, True
        if lo is not None and lo > last:
            raise InvalidRequest(
                f"'{lo_name}' is {lo}, above the highest stage this API key may use ({last})", param=lo_name
            )
    first = 0 if lo is None else lo
    if first > last:
        raise InvalidRequest(f"'{lo_name}' ({first}) is above '{hi_name}' ({last})", param=lo_name)
    if not steered:
        return None
    return Window(first, last, True)
