"""Scoring calls that cost money (judge, self-verify, consistency samples), charged as they are sent.

Each call goes on the scored answer's ledger (``ScoreContext.spent``) before it is sent, at its estimated
prompt cost: the upstream reads, and bills, the prompt whatever happens next. It is settled with the
reported usage when it answers. A call cut off (its timeout, the scorer's, the cascade deadline, the
client leaving) keeps its estimate, as an answer call cut off does; a call the upstream refused or failed
with an error status is not charged.
"""

from __future__ import annotations

from typing import Any

from app.errors import UpstreamError, UpstreamTimeout
from app.protocol import estimate_prompt_tokens, token_count
from app.scoring.base import ScoreContext, Spend
from app.upstream.client import Upstream, price_usd

Json = dict[str, Any]


async def complete(ctx: ScoreContext, up: Upstream, body: Json) -> Json:
    """POST ``body`` (not yet prepared) to ``up`` for a scorer; the reply body. Raises UpstreamError."""
    req = up.prepare(body, stream=False)
    pt = estimate_prompt_tokens(req)
    sent = Spend(up.name, pt, 0, price_usd(up.cfg.price, pt, 0), estimated=True)
    ledger = ctx.spent
    ledger.append(sent)
    try:
        reply = (await up.complete(req)).body
    except UpstreamTimeout:
        raise  # the upstream had the prompt: the estimate stays
    except UpstreamError:
        _remove(ledger, sent)
        raise
    usage = reply.get("usage")
    if isinstance(usage, dict) and token_count(usage.get("prompt_tokens")) is not None:
        pt, ct, usd = up.cost(usage)
        ledger[_index(ledger, sent)] = Spend(up.name, pt, ct, usd)
    return reply


def _index(ledger: list[Spend], item: Spend) -> int:
    return next(i for i, s in enumerate(ledger) if s is item)


def _remove(ledger: list[Spend], item: Spend) -> None:
    del ledger[_index(ledger, item)]
