"""The user's own scoring service over HTTP.

POST ``{"request": {...}, "response": {...}, "upstream": "small", "stage": 0}`` and expect
``{"score": 0.0..1.0, "reason": "..."}``. A non-200, a body that is not that shape, or a score outside
[0, 1] is a scorer error, handled by the scorer's ``on_error`` policy.
"""

from __future__ import annotations

import orjson

from app.config import HttpScorer as HttpConfig
from app.errors import ScorerError
from app.scoring.base import Score, ScoreContext
from app.upstream.transport import Timeouts, Transport, TransportError


class ScorerServiceError(ScorerError):
    """The scoring service was unreachable or answered out of shape."""


class HttpScore:
    kind = "http"

    def __init__(self, cfg: HttpConfig, http: Transport) -> None:
        self.cfg = cfg
        self._http = http
        self._headers = {"content-type": "application/json", **cfg.headers}
        self._timeouts = Timeouts(connect=min(5.0, cfg.timeout_s), read=cfg.timeout_s)

    async def score(self, ctx: ScoreContext) -> Score:
        payload = orjson.dumps(
            {
                "request": ctx.request,
                "response": ctx.answer.completion,
                "upstream": ctx.answer.upstream,
                "stage": ctx.stage,
            }
        )
        try:
            resp = await self._http.post(self.cfg.url, self._headers, payload, self._timeouts)
        except TransportError as exc:
            raise ScorerServiceError(f"scoring service unreachable ({type(exc).__name__})") from exc
        if resp.status != 200:
            raise ScorerServiceError(f"scoring service answered HTTP {resp.status}")
        try:
            body = orjson.loads(resp.body)
        except orjson.JSONDecodeError as exc:
            raise ScorerServiceError("scoring service sent invalid JSON") from exc
        value = body.get("score") if isinstance(body, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ScorerServiceError("scoring service reply has no numeric 'score'")
        reason = body.get("reason") if isinstance(body, dict) else None
        return Score(float(value), str(reason)[:200] if reason else "")
