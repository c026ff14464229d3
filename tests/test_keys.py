"""Named keys (``auth.keys``): attribution by name, daily budgets (429 ``budget_exceeded`` or a cap to a
cheaper stage), a highest stage, allowed models; and budgets shared through the store."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from app.budgets import DAY_S, Budgets
from app.config import ConfigError, parse_config
from app.learning.spend import shared_spend
from app.learning.store import Store
from tests.conftest import SECRET_PROXY_KEY, chat, proxy, two_stage
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio

TEAM_A = "team-a-key-0123456789"
PLAIN = "plain-key-0123456789"


def keyed(**key: Any) -> dict[str, Any]:
    cfg = two_stage("refuse")  # stage 0 is always rejected: every request reaches stage 1 unless capped
    cfg["auth"] = {"api_keys": [PLAIN], "keys": [{"name": "team-a", "key": TEAM_A, **key}]}
    return cfg


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def test_spend_is_attributed_to_the_keys_name_never_its_secret(fake: FakeUpstream) -> None:
    cfg = keyed()
    cfg["auth"]["keys"][0]["key"] = SECRET_PROXY_KEY
    reg = CollectorRegistry()
    async with proxy(cfg, fake, registry=reg) as (c, _):
        r1 = await c.post("/v1/chat/completions", json=chat(), headers=bearer(SECRET_PROXY_KEY))
        r2 = await c.post("/v1/chat/completions", json=chat(), headers={"x-api-key": SECRET_PROXY_KEY})
        plain = await c.post("/v1/chat/completions", json=chat(), headers=bearer(PLAIN))
        wrong = await c.post("/v1/chat/completions", json=chat(), headers=bearer("nope"))
        models = await c.get("/v1/models", headers=bearer(SECRET_PROXY_KEY))
    assert r1.status_code == r2.status_code == plain.status_code == models.status_code == 200
    assert wrong.status_code == 401
    spent = r1.json()["cascade"]["cost_usd"] + r2.json()["cascade"]["cost_usd"]
    assert sample(reg, "cascade_key_cost_usd_total", key="team-a") == pytest.approx(spent)
    exposition = generate_latest(reg).decode()
    assert SECRET_PROXY_KEY not in exposition and 'key="team-a"' in exposition


async def test_over_budget_is_429_until_the_day_ends(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(keyed(budget_usd_per_day=1e-9), fake, registry=reg) as (c, _):
        first = await c.post("/v1/chat/completions", json=chat(), headers=bearer(TEAM_A))
        second = await c.post("/v1/chat/completions", json=chat(), headers=bearer(TEAM_A))
        other = await c.post("/v1/chat/completions", json=chat(), headers=bearer(PLAIN))
    assert first.status_code == 200  # under budget when it started; it takes the key past the line
    assert second.status_code == 429, second.text
    err = second.json()["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "rate_limit_error"
    assert 1 <= int(second.headers["retry-after"]) <= DAY_S
    assert other.status_code == 200  # other keys are not affected
    assert sample(reg, "cascade_budget_exceeded_total", key="team-a", action="rejected") == 1


async def test_over_budget_can_be_capped_to_a_cheaper_stage_instead(fake: FakeUpstream) -> None:
    reg = CollectorRegistry()
    async with proxy(keyed(budget_usd_per_day=1e-9, over_budget_max_stage=0), fake, registry=reg) as (c, _):
        first = await c.post("/v1/chat/completions", json=chat(), headers=bearer(TEAM_A))
        second = await c.post("/v1/chat/completions", json=chat(), headers=bearer(TEAM_A))
    assert first.json()["cascade"]["stage"] == 1
    assert second.status_code == 200 and second.json()["cascade"]["stage"] == 0
    assert sample(reg, "cascade_budget_exceeded_total", key="team-a", action="capped") == 1


async def test_a_keys_max_stage_and_models(fake: FakeUpstream) -> None:
    async with proxy(keyed(max_stage=0, cascades=["default"]), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(), headers=bearer(TEAM_A))
        asks_more = await c.post(
            "/v1/chat/completions", json=chat(cascade={"min_stage": 1}), headers=bearer(TEAM_A)
        )
        other_model = await c.post("/v1/chat/completions", json=chat("large"), headers=bearer(TEAM_A))
        plain = await c.post("/v1/chat/completions", json=chat("large"), headers=bearer(PLAIN))
    assert r.status_code == 200 and r.json()["cascade"]["stage"] == 0
    assert asks_more.status_code == 400 and asks_more.json()["error"]["param"] == "cascade.min_stage"
    assert other_model.status_code == 404 and other_model.json()["error"]["code"] == "model_not_found"
    assert plain.status_code == 200


async def test_models_lists_what_the_key_may_use(fake: FakeUpstream) -> None:
    """A key limited to some cascades sees those in /v1/models (the list showed every model, and a model
    picker then offered ones that answer 404), and /v1/models/{id} of another is 404, as OpenAI does."""
    async with proxy(keyed(cascades=["default", "small"]), fake) as (c, _):
        mine = await c.get("/v1/models", headers=bearer(TEAM_A))
        other = await c.get("/v1/models/large", headers=bearer(TEAM_A))
        own = await c.get("/v1/models/small", headers=bearer(TEAM_A))
        plain = await c.get("/v1/models", headers=bearer(PLAIN))
    assert [m["id"] for m in mine.json()["data"]] == ["default", "small"]
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert own.status_code == 200 and own.json()["id"] == "small"
    assert {m["id"] for m in plain.json()["data"]} == {"default", "small", "large"}


async def test_a_key_may_be_denied_steering(fake: FakeUpstream) -> None:
    async with proxy(keyed(stage_control=False), fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat(cascade={"max_stage": 0}), headers=bearer(TEAM_A))
        plain = await c.post(
            "/v1/chat/completions", json=chat(cascade={"max_stage": 0}), headers=bearer(PLAIN)
        )
    assert r.status_code == 403 and r.json()["error"]["param"] == "cascade.max_stage"
    assert plain.status_code == 200


def test_key_config_is_checked() -> None:
    cfg = keyed(cascades=["nope"], over_budget_max_stage=0)
    cfg["auth"]["keys"].append({"name": "team-a", "key": TEAM_A})
    with pytest.raises(ConfigError) as err:
        parse_config(cfg, env={})
    text = str(err.value)
    assert "auth.keys[0].cascades[0]: unknown cascade or upstream 'nope'" in text
    assert "auth.keys[0].over_budget_max_stage: needs budget_usd_per_day" in text
    assert "auth.keys[1].name: another key has the same name" in text
    assert "auth.keys[1].key: the same key is configured twice" in text
    assert TEAM_A not in text
    bad = keyed()
    bad["auth"]["keys"][0]["name"] = "bad name!"  # a metric label: letters, digits, . _ -
    with pytest.raises(ConfigError) as err:
        parse_config(bad, env={})
    assert "auth.keys[0].name" in str(err.value)


async def test_budgets_roll_over_at_midnight_utc() -> None:
    now = [10 * DAY_S - 30.0]
    b = Budgets(clock=lambda: now[0])
    b.add("k", 2.0)
    assert b.over("k", 1.0) and b.retry_after() == 30
    now[0] += 31
    assert not b.over("k", 1.0) and b.spent("k") == 0


async def test_budgets_add_up_across_processes_through_the_store(tmp_path: Any) -> None:
    store = Store(f"sqlite:///{tmp_path}/traces.db")
    try:
        await store.open()
        shared = shared_spend(store)
        a, b = Budgets(), Budgets()
        a.add("team-a", 0.75)
        b.add("team-a", 0.5)
        await a.sync(shared)
        await b.sync(shared)
        await a.sync(shared)
        assert a.spent("team-a") == pytest.approx(1.25) and b.spent("team-a") == pytest.approx(1.25)
        assert a.over("team-a", 1.0) and b.over("team-a", 1.0)
        a.add("team-a", 0.25)  # not synced yet: counted locally at once
        assert a.spent("team-a") == pytest.approx(1.5)
    finally:
        await store.close()


async def test_a_failing_store_keeps_the_spend_for_the_next_sync() -> None:
    from app.learning.store import StoreError

    calls: list[dict[str, float]] = []

    async def broken(day: int, deltas: dict[str, float]) -> dict[str, float]:
        calls.append(dict(deltas))
        raise StoreError("down")

    b = Budgets()
    b.add("k", 1.0)
    await b.sync(broken)
    b.add("k", 1.0)
    await b.sync(broken)
    assert calls == [{"k": 1.0}, {"k": 2.0}] and b.spent("k") == 2.0


async def test_named_keys_may_not_call_admin_routes(fake: FakeUpstream) -> None:
    async with proxy(keyed(), fake) as (c, _):
        named = await c.post("/admin/reload", headers=bearer(TEAM_A))
        plain = await c.post("/admin/reload", headers=bearer(PLAIN))
    assert named.status_code == 403 and named.json()["error"]["code"] == "admin_forbidden"
    assert plain.status_code == 422  # let in; this in-process app has no config file to re-read


async def test_the_responses_endpoint_honours_budgets_and_stage_control(fake: FakeUpstream) -> None:
    async with proxy(keyed(budget_usd_per_day=1e-9), fake) as (c, _):
        body = {"model": "default", "input": "What is 6*7?"}
        steered = await c.post(
            "/v1/responses", json=body, headers={**bearer(TEAM_A), "x-cascade-max-stage": "0"}
        )
        over = await c.post("/v1/responses", json=body, headers=bearer(TEAM_A))
    assert steered.status_code == 200, steered.text
    assert steered.headers["x-cascade-stage"] == "0"
    assert over.status_code == 429 and over.json()["error"]["code"] == "budget_exceeded"
