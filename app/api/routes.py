"""HTTP routes. Handlers parse, call one engine method, render."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.auth import check_key
from app.api.chat import ChatEndpoint
from app.api.http_io import json_response
from app.api.responses import ResponsesEndpoint
from app.errors import NotFound
from app.protocol import model_object
from app.state import AppState

if TYPE_CHECKING:
    from app.runtime import Runtime

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


def _may_use(request: Request, rt: Runtime) -> Callable[[str], bool]:
    """Which model names the request's key may use: a named key's ``cascades`` list, else all (as the
    chat route admits them: listing a model that then answers 404 misleads SDK model pickers)."""
    index = check_key(request, rt.keys)
    nk = rt.named[index] if index >= 0 else None
    allowed = nk.models if nk is not None else None
    return (lambda name: True) if allowed is None else allowed.__contains__


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    rt = state.runtime
    ok = _may_use(request, rt)
    data = [model_object(name, "cascade", rt.plans.created) for name in rt.config.cascades if ok(name)]
    data += [model_object(name, "upstream", rt.plans.created) for name in rt.config.upstreams if ok(name)]
    return json_response({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    state = _state(request)
    rt = state.runtime
    if _may_use(request, rt)(model_id):
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
