"""Shared fixtures: the fake upstream, a proxy built on it, and helpers to read SSE replies."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app.config import parse_config
from app.logs import JsonFormatter, TextFormatter
from app.main import create_app
from tests.fake_upstream import FakeUpstream, create_fake_upstream, serve_in_background

FAKE = "http://fake.local/v1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's CASCADE_* settings or proxy variables."""
    import os

    for key in list(os.environ):
        if key.startswith("CASCADE_") or key == "PROMETHEUS_MULTIPROC_DIR":
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def fake() -> FakeUpstream:
    return create_fake_upstream()


def upstream(model: str, **extra: Any) -> dict[str, Any]:
    """An upstream entry on the fake: ``model`` picks the fake's behaviour."""
    return {"base_url": FAKE, "model": model, "price": {"input": 1.0, "output": 2.0}, "timeout_s": 5, **extra}


def base_config(**cascades: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"log_level": "warning"},
        "upstreams": {
            "small": upstream("ok", price={"input": 0.1, "output": 0.2}),
            "large": upstream("answer-large_says_hi", price={"input": 10.0, "output": 20.0}),
        },
        "cascades": {
            "default": {
                "stages": [
                    {"upstream": "small", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
                    {"upstream": "large"},
                ]
            }
        },
    }
    cfg["cascades"].update(cascades)
    return cfg


def two_stage(first_model: str, last_model: str = "answer-large_says_hi", **stage0: Any) -> dict[str, Any]:
    cfg = base_config()
    cfg["upstreams"]["small"]["model"] = first_model
    cfg["upstreams"]["large"]["model"] = last_model
    cfg["cascades"]["default"]["stages"][0].update(stage0)
    return cfg


class Router(httpx.AsyncBaseTransport):
    """Routes upstream calls by host to in-process ASGI apps (the fake upstream, a scoring service...)."""

    def __init__(self, apps: Mapping[str, Any]) -> None:
        self._t = {host: httpx.ASGITransport(app=app) for host, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        t = self._t.get(request.url.host)
        if t is None:
            raise httpx.ConnectError(f"no route to {request.url.host}", request=request)
        return await t.handle_async_request(request)


@asynccontextmanager
async def proxy(
    cfg: dict[str, Any],
    fake: FakeUpstream,
    *,
    registry: CollectorRegistry | None = None,
    apps: Mapping[str, Any] | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    config = parse_config(copy.deepcopy(cfg), env={})
    app = create_app(
        config,
        registry=registry or CollectorRegistry(),
        transport=Router({"fake.local": fake, **(apps or {})}),
    )
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://proxy", timeout=30
        ) as client,
    ):
        yield client, app


@asynccontextmanager
async def loopback_stack(cfg: dict[str, Any]) -> AsyncIterator[tuple[str, FakeUpstream, CollectorRegistry]]:
    """Fake upstream and proxy, both under uvicorn on loopback; yields the proxy's /v1 URL."""
    fake = create_fake_upstream()
    registry = CollectorRegistry()
    async with serve_in_background(fake) as fake_url:
        cfg = copy.deepcopy(cfg)
        for up in cfg["upstreams"].values():
            up["base_url"] = fake_url + "/v1"
        app = create_app(parse_config(cfg, env={}), registry=registry)
        async with serve_in_background(app) as proxy_url:
            yield proxy_url + "/v1", fake, registry


async def wait_for(cond: Callable[[], object], what: str = "", *, within: float = 10.0) -> None:
    """Wait until ``cond()`` is true, polling; fail after ``within`` seconds. The bound is generous on
    purpose (a loaded 2-core machine stalls for seconds): it only stops a test whose condition never
    comes, it measures nothing."""
    end = time.monotonic() + within
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {within:g}s: {what or 'condition'}")
        await asyncio.sleep(0.005)


def chat(model: str = "default", content: str = "What is 6*7?", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list[Any]:
    """Parse an SSE body into its data payloads: JSON objects, and the string "[DONE]"."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


# --- secrets must never reach a log line ------------------------------------------------------------------
# Tests that exercise auth, upstream keys, faults and lifecycle use these in their configs and prompts. A
# handler on the root logger sees every record of the whole suite (the app's own loggers down to DEBUG)
# and, at the end of the session, the run fails if any formatted record ever contained one of them.
# Subprocess output (``cascade serve``) goes through ``check_no_secrets``.

SECRET_UPSTREAM_KEY = "sk-upstream-TESTSECRET-4f9c2a7e1b"
SECRET_PROXY_KEY = "proxy-key-TESTSECRET-8d3e6b0a5c"
SECRET_PROMPT = "PROMPT-MARKER-TESTSECRET-c71e09"  # put in prompts: neither it nor answers echoing it may log
SECRETS = (SECRET_UPSTREAM_KEY, SECRET_PROXY_KEY, SECRET_PROMPT)


class _SecretWatch(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records = 0
        self.leaks: list[str] = []
        self._json = JsonFormatter()
        self._text = TextFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        try:
            text = self._json.format(record) + "\n" + self._text.format(record)
        except Exception as exc:  # a record that cannot be formatted is a finding too
            text = f"unformattable record {record.name}: {type(exc).__name__}"
        check_no_secrets(text, f"log record of {record.name!r} ({record.pathname}:{record.lineno})")


_WATCH = _SecretWatch()


def check_no_secrets(text: str, where: str) -> None:
    """Record (and report at session end) every secret found in ``text``."""
    for secret in SECRETS:
        if secret in text:
            _WATCH.leaks.append(f"{where}: contains {secret[:14]}...")


def _attach_watch() -> None:
    root = logging.getLogger()
    if _WATCH not in root.handlers:
        root.addHandler(_WATCH)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    app_logger = logging.getLogger("cascade")
    if app_logger.getEffectiveLevel() > logging.DEBUG:
        app_logger.setLevel(logging.DEBUG)


@pytest.fixture(scope="session", autouse=True)
def _no_secrets_in_logs() -> Iterator[None]:
    _attach_watch()
    yield
    logging.getLogger().removeHandler(_WATCH)
    assert not _WATCH.leaks, "secrets reached the logs:\n" + "\n".join(_WATCH.leaks[:20])


@pytest.fixture(autouse=True)
def _secret_watch_attached() -> None:
    """Something (``setup_logging``) may have replaced the root handlers: attach again per test."""
    _attach_watch()
