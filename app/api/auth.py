"""Proxy API keys: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request

from app.errors import AuthenticationFailed


def _presented(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return x_api_key.strip() if x_api_key and x_api_key.strip() else None


def check_presented(authorization: str | None, x_api_key: str | None, keys: Sequence[bytes]) -> int:
    """Raise AuthenticationFailed unless the headers carry one of ``keys`` (none configured: open);
    return which one (its index; -1 when none are configured)."""
    if not keys:
        return -1
    presented = _presented(authorization, x_api_key)
    if presented is None:
        raise AuthenticationFailed(
            "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            code="missing_api_key",
        )
    candidate = presented.encode()
    # Compare against every key, without stopping at the first match, so timing reveals nothing.
    found = -1
    for i, k in enumerate(keys):
        if hmac.compare_digest(candidate, k):
            found = i
    if found < 0:
        raise AuthenticationFailed("Incorrect API key provided.")
    return found


def check_key(request: Request, keys: Sequence[bytes]) -> int:
    return check_presented(request.headers.get("authorization"), request.headers.get("x-api-key"), keys)
