"""Proxy API keys: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request

from app.errors import AuthenticationFailed


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def check_key(request: Request, keys: Sequence[bytes]) -> None:
    """Raise AuthenticationFailed unless the request carries one of ``keys`` (none configured: open)."""
    if not keys:
        return
    presented = presented_key(request)
    if presented is None:
        raise AuthenticationFailed(
            "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            code="missing_api_key",
        )
    candidate = presented.encode()
    # Compare against every key, without stopping at the first match, so timing reveals nothing.
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(candidate, k)
    if not ok:
        raise AuthenticationFailed("Incorrect API key provided.")
