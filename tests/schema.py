"""Validation against the vendored official OpenAI chat schema (tests/spec, MIT, see its LICENSE)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SPEC = Path(__file__).parent / "spec" / "openai-chat.schema.json"
URN = "urn:openai-chat-subset:schema"


@cache
def _validator(name: str) -> Draft202012Validator:
    schema = json.loads(SPEC.read_text())
    registry: Registry[Any] = Registry().with_resource(URN, Resource.from_contents(schema))
    return Draft202012Validator({"$ref": f"{URN}#/$defs/{name}"}, registry=registry)


def check(name: str, instance: Any) -> None:
    errors = sorted(_validator(name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def check_completion(body: Any) -> None:
    check("CreateChatCompletionResponse", body)


def check_chunk(chunk: Any) -> None:
    check("CreateChatCompletionStreamResponse", chunk)


def check_error(body: Any) -> None:
    check("ErrorResponse", body)
