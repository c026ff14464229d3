"""HTTP routes. Handlers parse, call one engine method, render."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.auth import check_key
from app.api.transport import ClientGone, SSEResponse, json_response, parse_json, read_body, run_or_cancel
from app.cascade.engine import Completed
from app.cascade.trace import Trace
from app.errors import NotFound
from app.protocol import model_object, new_id, validate_chat_request
from app.state import AppState

router = APIRouter()

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

_CHAT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "messages"],
                    "properties": {
                        "model": {"type": "string", "description": "A cascade name or an upstream name."},
                        "messages": {"type": "array", "items": {"type": "object"}, "minItems": 1},
                        "stream": {"type": "boolean"},
                    },
                    "additionalProperties": True,
                }
            }
        },
    }
}


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.cascade
    return state


def _request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id")
    if rid is None or not _REQUEST_ID.match(rid):
        rid = new_id("req-")
    request.state.request_id = rid
    return rid


def _cascade_headers(trace: Trace, request_id: str) -> dict[str, str]:
    a = trace.serving
    h = {"x-request-id": request_id, "x-cascade-escalations": str(trace.escalations)}
    if a is not None:
        h["x-cascade-upstream"] = a.upstream
        h["x-cascade-stage"] = str(a.stage)
    return h


@router.post("/v1/chat/completions", openapi_extra=_CHAT_BODY, response_model=None)
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    rt = state.runtime
    request_id = _request_id(request)
    check_key(request, rt.keys)
    raw = await read_body(request, rt.config.server.max_body_bytes)
    body = validate_chat_request(parse_json(raw), max_messages=rt.config.server.max_messages)
    plan = rt.plans.resolve(body["model"])
    stream = body.get("stream") is True
    state.metrics.in_flight.inc()
    handed_off = False
    try:
        try:
            result = await run_or_cancel(
                request.receive, rt.engine.run(plan, body, request_id=request_id, stream=stream)
            )
        except ClientGone:
            return Response(status_code=499)
        headers = _cascade_headers(result.trace, request_id)
        if isinstance(result, Completed):
            headers["x-cascade-cost-usd"] = f"{result.trace.cost_usd:.10f}"
            return json_response(result.body, headers=headers)
        handed_off = True
        return SSEResponse(result.events, headers, on_close=state.metrics.in_flight.dec)
    finally:
        if not handed_off:
            state.metrics.in_flight.dec()


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    rt = state.runtime
    check_key(request, rt.keys)
    data = [model_object(name, "cascade", rt.plans.created) for name in rt.config.cascades]
    data += [model_object(name, "upstream", rt.plans.created) for name in rt.config.upstreams]
    return json_response({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    state = _state(request)
    rt = state.runtime
    check_key(request, rt.keys)
    if model_id in rt.config.cascades:
        return json_response(model_object(model_id, "cascade", rt.plans.created))
    if model_id in rt.config.upstreams:
        return json_response(model_object(model_id, "upstream", rt.plans.created))
    raise NotFound(f"The model '{model_id[:200]}' does not exist.", param="model", code="model_not_found")


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = _state(request)
    rt = state.runtime
    if rt.config.auth.protect_metrics:
        check_key(request, rt.keys)
    payload, ctype = state.exposition()
    return Response(payload, media_type=ctype)
