"""POST /v1/feedback: stores a user label against a chat completion id (CONTRACT section 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import base_config, chat, proxy
from tests.fake_upstream import FakeUpstream
from tests.learning.learning_helpers import query, settle, sqlite_url, with_learning
from tests.schema import check_error

pytestmark = pytest.mark.anyio


async def test_feedback_stores_a_user_label(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with proxy(with_learning(base_config(), url), fake) as (c, app):
        cid = (await c.post("/v1/chat/completions", json=chat())).json()["id"]
        # Right away: the record may still be queued; the label is accepted all the same.
        r = await c.post("/v1/feedback", json={"id": cid, "score": 0.25})
        assert r.status_code == 200, r.text
        assert r.json() == {"object": "feedback", "id": cid, "score": 0.25}
        await settle(app)
        r = await c.post("/v1/feedback", json={"id": cid, "score": 1})  # after it was written
        assert r.status_code == 200
    assert query(url, "SELECT trace_id, stage, source, value, weight FROM labels ORDER BY id") == [
        (cid, None, "user", 0.25, 1.0),
        (cid, None, "user", 1.0, 1.0),
    ]
    reg = app.state.cascade.metrics.registry
    assert reg.get_sample_value("cascade_labels_total", {"cascade": "default", "source": "user"}) == 2.0


async def test_feedback_takes_a_responses_id(fake: FakeUpstream, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with proxy(with_learning(base_config(), url), fake) as (c, app):
        rid = (await c.post("/v1/responses", json={"model": "default", "input": "hi"})).json()["id"]
        assert rid.startswith("resp_")
        r = await c.post("/v1/feedback", json={"id": rid, "score": 0.5})
        assert r.status_code == 200, r.text
        assert r.json() == {"object": "feedback", "id": rid, "score": 0.5}
        await settle(app)
    [(trace_id,)] = query(url, "SELECT trace_id FROM labels")
    assert trace_id == "chatcmpl-" + rid.removeprefix("resp_")


async def test_feedback_unknown_id_is_404(fake: FakeUpstream, tmp_path: Path) -> None:
    async with proxy(with_learning(base_config(), sqlite_url(tmp_path)), fake) as (c, _):
        r = await c.post("/v1/feedback", json={"id": "chatcmpl-nope", "score": 0.5})
    assert r.status_code == 404
    check_error(r.json())
    assert r.json()["error"]["param"] == "id" and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"score": 0.5}, "id"),
        ({"id": "", "score": 0.5}, "id"),
        ({"id": 7, "score": 0.5}, "id"),
        ({"id": "chatcmpl-x"}, "score"),
        ({"id": "chatcmpl-x", "score": 1.5}, "score"),
        ({"id": "chatcmpl-x", "score": -0.1}, "score"),
        ({"id": "chatcmpl-x", "score": "0.5"}, "score"),
        ({"id": "chatcmpl-x", "score": True}, "score"),
        ([1, 2], None),
    ],
)
async def test_feedback_bad_body_is_400_naming_the_field(
    fake: FakeUpstream, tmp_path: Path, body: object, param: str | None
) -> None:
    async with proxy(with_learning(base_config(), sqlite_url(tmp_path)), fake) as (c, _):
        r = await c.post("/v1/feedback", json=body)
    assert r.status_code == 400
    check_error(r.json())
    err = r.json()["error"]
    assert err["param"] == param
    if param:
        assert f"'{param}'" in err["message"]


async def test_feedback_not_json_is_400(fake: FakeUpstream, tmp_path: Path) -> None:
    async with proxy(with_learning(base_config(), sqlite_url(tmp_path)), fake) as (c, _):
        r = await c.post("/v1/feedback", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400


async def test_feedback_without_learning_is_404_feedback_disabled(fake: FakeUpstream) -> None:
    async with proxy(base_config(), fake) as (c, _):
        r = await c.post("/v1/feedback", json={"id": "chatcmpl-x", "score": 0.5})
    assert r.status_code == 404
    check_error(r.json())
    assert r.json()["error"]["code"] == "feedback_disabled"
    assert "learning" in r.json()["error"]["message"]


async def test_feedback_needs_the_proxy_key(fake: FakeUpstream, tmp_path: Path) -> None:
    cfg = with_learning(base_config(), sqlite_url(tmp_path))
    cfg["auth"] = {"api_keys": ["k1"]}
    async with proxy(cfg, fake) as (c, _):
        r = await c.post("/v1/feedback", json={"id": "chatcmpl-x", "score": 0.5})
        assert r.status_code == 401
        r = await c.post(
            "/v1/feedback", json={"id": "chatcmpl-x", "score": 0.5}, headers={"authorization": "Bearer k1"}
        )
        assert r.status_code == 404
