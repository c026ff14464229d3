"""HTTP routes. Handlers parse, call one engine method, render."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.auth import check_key
from app.api.chat import ChatEndpoint
from app.api.http_io import json_response
from app.api.responses import ResponsesEndpoint
from app.errors import NotFound
from app.protocol import model_object
from app.state import AppState

router = APIRouter()

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


_RESPONSES_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "input"],
                    "properties": {
                        "model": {"type": "string", "description": "A cascade name or an upstream name."},
                        "input": {
                            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]
                        },
                        "instructions": {"type": "string"},
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


@router.post("/v1/chat/completions", openapi_extra=_CHAT_BODY, response_model=None)
async def chat_completions() -> Response:
    # Normally answered by CascadeApp.__call__ before routing; documents the route, serves as fallback.
    return ChatEndpoint()


@router.post("/v1/responses", openapi_extra=_RESPONSES_BODY, response_model=None)
async def create_response() -> Response:
    # The OpenAI Responses API, translated onto the chat engine (app.api.responses).
    return ResponsesEndpoint()


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
    payload, ctype = await state.exposition()
    return Response(payload, media_type=ctype)
