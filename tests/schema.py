"""Validation against the vendored official OpenAI schemas (tests/spec, MIT, see its LICENSE): chat
completions, and the Responses API."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SPEC = Path(__file__).parent / "spec" / "openai-chat.schema.json"
URN = "urn:openai-chat-subset:schema"
RESPONSES_SPEC = Path(__file__).parent / "spec" / "openai-responses.schema.json"
RESPONSES_URN = "urn:openai-responses-subset:schema"


@cache
def _validator(name: str, spec: Path = SPEC, urn: str = URN) -> Draft202012Validator:
    schema = json.loads(spec.read_text())
    registry: Registry[Any] = Registry().with_resource(urn, Resource.from_contents(schema))
    return Draft202012Validator({"$ref": f"{urn}#/$defs/{name}"}, registry=registry)


def check(name: str, instance: Any, *, responses: bool = False) -> None:
    v = _validator(name, RESPONSES_SPEC, RESPONSES_URN) if responses else _validator(name)
    errors = sorted(v.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def check_completion(body: Any) -> None:
    check("CreateChatCompletionResponse", body)


def check_chunk(chunk: Any) -> None:
    check("CreateChatCompletionStreamResponse", chunk)


def check_error(body: Any) -> None:
    check("ErrorResponse", body)


def check_response(body: Any) -> None:
    """A Responses API ``response`` object."""
    check("Response", body, responses=True)


def check_response_request(body: Any) -> None:
    """A Responses API request body (``CreateResponse``)."""
    check("CreateResponse", body, responses=True)


def check_response_event(event: Any) -> None:
    """One Responses stream event (an SSE ``data:`` payload)."""
    check("ResponseStreamEvent", event, responses=True)
