"""The retry contract for SDK clients (README "Errors"): a 502 or 504 says ``x-should-retry: false`` (the
proxy already retried its upstreams and walked every stage; a client retry would run the whole cascade
again), and 429/503 say how long to wait (``retry-after``, and ``retry-after-ms`` when known)."""

from __future__ import annotations

import anyio
import openai
import pytest

from tests.conftest import chat, loopback_stack, proxy, two_stage
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio


async def test_502_and_504_tell_sdks_not_to_retry(fake: FakeUpstream) -> None:
    cfg = two_stage("refuse", "slow-3000")
    cfg["cascades"]["default"]["deadline_s"] = 0.3
    async with proxy(two_stage("error-500", "error-500"), fake) as (c, _):
        failed = await c.post("/v1/chat/completions", json=chat())
        failed_r = await c.post("/v1/responses", json={"model": "default", "input": "x"})
    async with proxy(cfg, fake) as (c, _):
        late = await c.post("/v1/chat/completions", json=chat())
    assert (failed.status_code, failed_r.status_code, late.status_code) == (502, 502, 504)
    for r in (failed, failed_r, late):
        assert r.headers["x-should-retry"] == "false"


async def test_429_and_503_say_how_long_to_wait(fake: FakeUpstream) -> None:
    async with proxy(two_stage("error-429", "error-429"), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 429
    # The fake says `retry-after: 0`: wait at least a second; no `retry-after-ms: 0` beside it (a client
    # taking the milliseconds read "retry now" where the seconds said one).
    assert r.headers["retry-after"] == "1" and "retry-after-ms" not in r.headers
    assert "x-should-retry" not in r.headers  # waiting helps: the SDKs retry 429 by default
    cfg = two_stage("error-500", "error-500")
    for up in cfg["upstreams"].values():
        up.update(max_retries=0, circuit={"failures": 1, "cooldown_s": 30})
    async with proxy(cfg, fake) as (c, _):
        await c.post("/v1/chat/completions", json=chat())
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and "x-should-retry" not in r.headers
    assert 29 <= int(r.headers["retry-after"]) <= 30
    assert 29_000 <= int(r.headers["retry-after-ms"]) <= 30_000


@pytest.mark.loopback
async def test_the_openai_sdk_does_not_rerun_a_failed_cascade() -> None:
    """With its default ``max_retries=2`` the SDK would send an all-failing cascade three times."""
    async with loopback_stack(two_stage("error-500", "error-500")) as (url, fake, _):

        def run() -> int:
            with openai.OpenAI(base_url=url, api_key="unused") as client:  # default max_retries (2)
                try:
                    client.chat.completions.create(
                        model="default", messages=[{"role": "user", "content": "x"}]
                    )
                except openai.APIStatusError as exc:
                    return exc.status_code
            raise AssertionError("the cascade should have failed")

        status = await anyio.to_thread.run_sync(run)
        assert status == 502
        # One cascade: each of the 2 stages asked once plus its one upstream retry (max_retries 1).
        assert len(fake.requests) == 4
