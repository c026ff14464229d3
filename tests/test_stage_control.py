"""Per-request control: ``x-cascade-min-stage`` / ``x-cascade-max-stage`` headers and the request field
``cascade: {"min_stage", "max_stage"}`` (stripped before any upstream sees it)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import chat, loopback_stack, proxy, sse_events, two_stage
from tests.fake_upstream import FakeUpstream
from tests.schema import check_completion

pytestmark = pytest.mark.anyio

LARGE = "answer-large_says_hi"


def three_stage() -> dict[str, Any]:
    cfg = two_stage("refuse")
    cfg["upstreams"]["mid"] = {**cfg["upstreams"]["small"], "model": "answer-mid"}
    cfg["cascades"]["default"]["stages"] = [
        {"upstream": "small", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
        {"upstream": "mid", "threshold": 0.7, "scorers": [{"type": "heuristic"}]},
        {"upstream": "large"},
    ]
    return cfg


async def test_min_stage_header_skips_the_earlier_stages(fake: FakeUpstream) -> None:
    async with proxy(three_stage(), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(), headers={"x-cascade-min-stage": "1"})
    assert r.status_code == 200, r.text
    ext = r.json()["cascade"]
    assert ext["stage"] == 1 and [a["stage"] for a in ext["attempts"]] == [1]
    assert "refuse" not in fake.counts  # stage 0 never called


async def test_max_stage_field_serves_that_stage_unscored_and_is_stripped(fake: FakeUpstream) -> None:
    async with proxy(three_stage(), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(cascade={"max_stage": 0}))
    assert r.status_code == 200, r.text
    body = r.json()
    check_completion(body)
    # The refusal would be rejected by the heuristic scorer: as the last stage it is served unscored.
    assert body["cascade"]["stage"] == 0 and body["cascade"]["score"] is None
    assert body["cascade"]["attempts"][0]["threshold"] is None
    assert [q["body"]["model"] for q in fake.requests] == ["refuse"]
    assert all("cascade" not in q["body"] for q in fake.requests)


async def test_window_in_the_middle_streams_its_last_stage(fake: FakeUpstream) -> None:
    async with proxy(three_stage(), fake) as (c, _):
        r = await c.post(
            "/v1/chat/completions",
            json=chat(stream=True, cascade={"min_stage": 1, "max_stage": 1}),
        )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["cascade"]["stage"] == 1 and r.headers["x-cascade-stage"] == "1"
    assert [q["body"]["model"] for q in fake.requests] == ["answer-mid"]
    assert fake.requests[0]["body"]["stream"] is True and "cascade" not in fake.requests[0]["body"]


@pytest.mark.parametrize(
    ("headers", "field", "param"),
    [
        ({"x-cascade-min-stage": "3"}, None, "x-cascade-min-stage"),
        ({"x-cascade-max-stage": "-1"}, None, "x-cascade-max-stage"),
        ({"x-cascade-max-stage": "one"}, None, "x-cascade-max-stage"),
        ({}, {"min_stage": 5}, "cascade.min_stage"),
        ({}, {"max_stage": "1"}, "cascade.max_stage"),
        ({}, {"max_stage": True}, "cascade.max_stage"),
        ({}, {"min_stage": 2, "max_stage": 1}, "cascade.min_stage"),
        ({}, {"stage": 1}, "cascade.stage"),
        ({}, [1], "cascade"),
        ({"x-cascade-max-stage": "2"}, {"max_stage": 1}, "cascade.max_stage"),
    ],
)
async def test_bad_values_are_a_400_naming_the_field(
    fake: FakeUpstream, headers: dict[str, str], field: Any, param: str
) -> None:
    body = chat() if field is None else chat(cascade=field)
    async with proxy(three_stage(), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert err["type"] == "invalid_request_error"
    assert not fake.requests


async def test_a_passthrough_model_accepts_stage_zero_only(fake: FakeUpstream) -> None:
    async with proxy(three_stage(), fake) as (c, _):
        ok = await c.post("/v1/chat/completions", json=chat("mid", cascade={"max_stage": 0}))
        bad = await c.post("/v1/chat/completions", json=chat("mid"), headers={"x-cascade-min-stage": "1"})
    assert ok.status_code == 200 and ok.json()["cascade"]["stage"] == 0
    assert bad.status_code == 400 and "stages 0 to 0" in bad.json()["error"]["message"]


async def test_steering_can_be_switched_off(fake: FakeUpstream) -> None:
    cfg = three_stage()
    cfg["auth"] = {"stage_control": False}
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(), headers={"x-cascade-max-stage": "0"})
        plain = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 403 and r.json()["error"]["code"] == "stage_control_forbidden"
    assert r.json()["error"]["param"] == "x-cascade-max-stage"
    assert plain.status_code == 200 and plain.json()["cascade"]["stage"] == 1


async def test_the_openai_sdk_extra_body_steers_the_request() -> None:
    async with loopback_stack(three_stage()) as (url, fake, _):
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        r = await client.chat.completions.with_raw_response.create(
            model="default",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"cascade": {"min_stage": 2}},
        )
        await client.close()
    assert r.headers["x-cascade-stage"] == "2"
    assert [q["body"]["model"] for q in fake.requests] == [LARGE]
