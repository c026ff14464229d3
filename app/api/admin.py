"""Admin routes: ``POST /admin/reload`` re-reads config.yaml, like SIGHUP.

Admin needs a proxy key: any key of ``auth.api_keys`` may call it (the named keys of ``auth.keys``,
handed to teams and clients, may not: 403). Without keys the proxy has no way to
tell an operator from anyone else who can reach the port, so admin routes answer 403 ``admin_disabled``
(SIGHUP still works). A reload only re-reads the file the operator controls; it never takes config from
the request.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.auth import check_key
from app.api.http_io import json_response
from app.config import ConfigError
from app.errors import ConfigRejected, Forbidden
from app.state import AppState

router = APIRouter()


@router.post("/admin/reload")
async def reload_config(request: Request) -> Response:
    """Reload config.yaml: 200 with the new upstreams and cascades, or 422 with the problems (the running
    config is kept). In-flight requests finish on the config they started with."""
    state: AppState = request.app.state.cascade
    rt = state.runtime
    if not rt.config.auth.api_keys:
        raise Forbidden(
            "Admin routes are disabled: they need auth.api_keys (any of those keys may call them). "
            "Send SIGHUP to reload without keys.",
            code="admin_disabled",
        )
    if rt.named[check_key(request, rt.keys)] is not None:
        raise Forbidden("Named keys (auth.keys) may not call admin routes.", code="admin_forbidden")
    try:
        rt = await state.reload()
    except ConfigError as exc:
        raise ConfigRejected(
            "The new config was rejected; the running config is kept. Problems: " + "; ".join(exc.problems)
        ) from exc
    fanned_out = state.tell_other_workers()
    return json_response(
        {
            "status": "reloaded",
            "reloads": state.reloads,
            "upstreams": sorted(rt.config.upstreams),
            "cascades": sorted(rt.config.cascades),
            "all_workers": fanned_out or state.supervisor_pid is None,
        }
    )
