"""``POST /v1/feedback``: a user's quality label for a past answer (CONTRACT section 1).

``{"id": "<chat completion id>", "score": 0.0..1.0}`` (or a ``/v1/responses`` id, ``resp_...``: the same
answer under its Responses name) -> 200 ``{"object": "feedback", "id", "score"}``.
400 names the bad field; 404 when no answer with that id is known, and also when this proxy has no
``learning`` section (no trace store: code ``feedback_disabled``; a 404, not a 5xx, so SDKs do not retry
a request that can never succeed); 503 when the store cannot be reached.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.auth import check_key
from app.api.http_io import json_response, parse_json, read_body
from app.errors import InvalidRequest, NotFound, ServiceUnavailable
from app.learning.store import StoreError
from app.state import AppState

router = APIRouter()

_MAX_BODY = 64 * 1024


def _parse(body: Any) -> tuple[str, float]:
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object with 'id' and 'score'.")
    cid = body.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > 256:
        raise InvalidRequest("'id': must be the chat completion id (a non-empty string).", param="id")
    score = body.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise InvalidRequest("'score': must be a number between 0 and 1.", param="score")
    if not 0.0 <= score <= 1.0:
        raise InvalidRequest("'score': must be between 0 and 1.", param="score")
    return cid, float(score)


@router.post("/v1/feedback")
async def feedback(request: Request) -> Response:
    state: AppState = request.app.state.cascade
    check_key(request, state.runtime.keys)
    cid, score = _parse(parse_json(await read_body(request, _MAX_BODY)))
    learning = state.learning
    if learning is None:
        raise NotFound(
            "Feedback is not enabled on this proxy: its config has no 'learning' section (trace store).",
            code="feedback_disabled",
        )
    # A Responses id names the same answer as the chat completion id it was made from (app.responses.reply).
    trace_id = "chatcmpl-" + cid.removeprefix("resp_") if cid.startswith("resp_") else cid
    try:
        known = await learning.feedback(trace_id, score)
    except StoreError as exc:
        raise ServiceUnavailable(
            "The trace store is unavailable; try again later.", code="store_unavailable"
        ) from exc
    if not known:
        raise NotFound(
            f"No answer with id '{cid[:100]}' is known to this proxy.", param="id", code="not_found"
        )
    return json_response({"object": "feedback", "id": cid, "score": score})
