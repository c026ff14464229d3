"""The exception tree and the one table from exception to HTTP status + OpenAI error body.

Every exception the package raises on purpose derives from ``CascadeBaseError``::

    CascadeBaseError
    ├── ProxyError                  what a client sees: status, OpenAI type and code (this module)
    │   ├── InvalidRequest (400), AuthenticationFailed (401), Forbidden (403), NotFound (404)
    │   │   └── ModelNotFound, PayloadTooLarge (413), ConfigRejected (422), RateLimited (429)
    │   └── AllStagesFailed (502), ServiceUnavailable (503), DeadlineExceeded (504), InternalError (500)
    ├── UpstreamError               an upstream call failed; the cascade makes it an attempt (this module)
    │   ├── UpstreamTimeout, UpstreamConnectError, UpstreamProtocolError, UpstreamStatusError
    │   └── UpstreamUnavailable (circuit open), UpstreamSaturated (concurrency limit full)
    ├── TransportError              the HTTP seam under the upstream client (app.upstream.transport)
    │   └── TransportTimeout, TransportConnectError, TransportTooLarge
    ├── SSEEventTooLarge            a streamed event over 64 MiB (app.upstream.sse): a protocol error
    ├── ScorerError                 a scorer could not score: its ``on_error`` policy applies (this module)
    │   └── ScorerCallError (app.scoring.asking), ScorerServiceError (app.scoring.http),
    │       MissingLogprobs (app.scoring.logprob)
    ├── Abstain                     a scorer has no opinion: left out of the mean (app.scoring.base)
    ├── ConfigError                 config.yaml problems, one dotted path each (app.config)
    ├── StoreError                  the trace store failed (app.learning.store)
    ├── CalibrateError, FitError    `cascade calibrate` / `fit-scorer --from-store` cannot run as asked
    │                               (app.learning.cli, app.learning.fit_scorer): exit codes 1 or 2
    ├── ReplayError                 `cascade replay` cannot run as asked (app.replay.configure): exit 2
    ├── LabelError                  a recorded row without correctness (app.replay.dataset; a ValueError)
    ├── ReplayLookupError           the replay upstream has no row for a request (app.replay.upstream)
    ├── ClientGone                  the client disconnected before the answer was ready (app.api.http_io)
    ├── EarlyAbort                  a stream check rejected a scored stage mid-stream (app.cascade.calls)
    ├── _NoTime                     a stage cannot fit in what is left of the cascade deadline; never
    │                               leaves app.cascade.engine (it becomes DeadlineExceeded or the fallback)
    └── _BeforeFirstByte            an upstream error before any byte, so a retry is safe; never leaves
                                    app.upstream.client

``ProxyError`` subclasses carry their own status, OpenAI ``type`` and ``code``: the one table from error
to HTTP reply. ``UpstreamError`` never reaches a client directly: the cascade turns it into attempts and,
when every stage failed, into one ``AllStagesFailed``. Third-party exceptions (aiohttp, httpx, orjson,
sqlite3, psycopg) are translated at the boundary where they happen, ``from exc``. Messages never contain
upstream keys, proxy keys, prompts or answers.
"""

from __future__ import annotations

from typing import Any


class CascadeBaseError(Exception):
    """Root of every exception this package raises on purpose."""


# --- errors a client sees -------------------------------------------------------------------------


class ProxyError(CascadeBaseError):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # Headers every reply of this class carries (the retry contract: README "Errors").
    fixed_headers: dict[str, str] = {}

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = {**self.fixed_headers, **headers} if headers else dict(self.fixed_headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ConfigRejected(ProxyError):
    """A reload found the new config invalid; the running one is kept. The message lists the problems
    (dotted paths, never values)."""

    status = 422
    type = "invalid_request_error"
    code = "config_invalid"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ProxyError):
    """Every stage was rate-limited upstream, or the proxy's own concurrency limit is full."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


# The proxy already retried each upstream and walked every stage (or spent the cascade's whole
# deadline): a client retry would run the whole cascade again, so the OpenAI SDKs are told not to.
_NO_RETRY = {"x-should-retry": "false"}


class AllStagesFailed(ProxyError):
    status = 502
    type = "upstream_error"
    code = "all_stages_failed"
    fixed_headers = _NO_RETRY


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class DeadlineExceeded(ProxyError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"
    fixed_headers = _NO_RETRY


class InternalError(ProxyError):
    status = 500
    type = "server_error"
    code = "internal_error"


# --- upstream failures (internal; become attempts) --------------------------------------------------


class UpstreamError(CascadeBaseError):
    """An upstream call failed. ``kind`` is the metric label: timeout, connect, status_4xx, status_5xx,
    protocol. ``retryable`` says whether a retry inside the same attempt may help."""

    kind: str = "protocol"
    reason: str = "upstream_error"  # escalation reason

    def __init__(self, upstream: str, detail: str, *, retryable: bool = False) -> None:
        super().__init__(f"upstream '{upstream}': {detail}")
        self.upstream = upstream
        self.detail = detail
        self.retryable = retryable


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    reason = "timeout"


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamProtocolError(UpstreamError):
    """Bad JSON, bad SSE, wrong content type, an error object inside a 200, a stream cut short."""

    kind = "protocol"


class UpstreamStatusError(UpstreamError):
    def __init__(
        self,
        upstream: str,
        status: int,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(upstream, f"HTTP {status}: {message}", retryable=retryable)
        self.status = status
        self.upstream_message = message
        self.retry_after = retry_after
        self.kind = "status_4xx" if status < 500 else "status_5xx"


class UpstreamUnavailable(UpstreamError):
    """Not called at all: the upstream's circuit is open (see ``app.upstream.breaker``)."""

    kind = "circuit_open"

    def __init__(self, upstream: str, detail: str, *, retry_after: float) -> None:
        super().__init__(upstream, detail)
        self.retry_after = retry_after


class UpstreamSaturated(UpstreamError):
    """Not called at all: the upstream's ``max_concurrency`` stayed full for ``queue_timeout_s``."""

    kind = "saturated"


# --- scorers -----------------------------------------------------------------------------------------


class ScorerError(CascadeBaseError):
    """A scorer could not score this answer; its ``on_error`` policy decides the score."""


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
