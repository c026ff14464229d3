"""The replay upstream: recorded answers by (model, prompt), recorded cost in usage, OpenAI shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

from app.config import parse_config
from app.main import create_app
from app.replay.dataset import estimate_tokens, load_dataset
from app.replay.upstream import ROW_ID_FIELD, ReplayUpstream
from tests.replay import synth
from tests.schema import check_chunk, check_completion, check_error

pytestmark = pytest.mark.anyio


@pytest.fixture
def dataset(tmp_path: Path) -> Any:
    return load_dataset(synth.write(tmp_path / "syn.jsonl", n=40))


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replay.local")


def _body(model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


async def test_serves_the_recorded_answer_and_cost(dataset: Any) -> None:
    row = dataset.rows[3]
    async with _client(ReplayUpstream(dataset.rows)) as c:
        for model in dataset.models:
            r = await c.post("/v1/chat/completions", json=_body(model, row.prompt))
            assert r.status_code == 200
            body = r.json()
            check_completion(body)
            rec = row.answers[model]
            assert body["model"] == model
            assert body["choices"][0]["message"]["content"] == rec.answer
            assert body["choices"][0]["finish_reason"] == "stop"
            assert body["usage"]["cost"] == rec.cost_usd
            assert body["usage"]["prompt_tokens"] == estimate_tokens(row.prompt)
            assert body["usage"]["completion_tokens"] == estimate_tokens(rec.answer)


async def test_unknown_model_prompt_and_ambiguous_rows_are_404(dataset: Any) -> None:
    dup = [r for r in dataset.rows if r.prompt == dataset.rows[0].prompt]
    assert len(dup) == 2  # the generator repeats one prompt with other answers
    model = dataset.models[0]
    async with _client(ReplayUpstream(dataset.rows)) as c:
        r = await c.post("/v1/chat/completions", json=_body("no-such-model", dup[0].prompt))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await c.post("/v1/chat/completions", json=_body(model, "never recorded"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "prompt_not_found"
        check_error(r.json())
        assert r.json()["error"]["param"] == "messages"
        assert dup[0].answers[model] != dup[1].answers[model]
        r = await c.post("/v1/chat/completions", json=_body(model, dup[0].prompt))
        assert r.status_code == 404 and r.json()["error"]["code"] == "ambiguous_prompt"
        for d in dup:
            r = await c.post(
                "/v1/chat/completions", json=_body(model, d.prompt, metadata={ROW_ID_FIELD: d.id})
            )
            assert r.json()["choices"][0]["message"]["content"] == d.answers[model].answer
        r = await c.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400
        r = await c.get("/v1/models")
        assert [m["id"] for m in r.json()["data"]] == sorted(dataset.models)


async def test_stream_carries_the_answer_and_usage(dataset: Any) -> None:
    row = dataset.rows[5]
    model = dataset.models[-1]
    body = _body(model, row.prompt, stream=True, stream_options={"include_usage": True})
    async with _client(ReplayUpstream(dataset.rows)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for ch in chunks:
        check_chunk(ch)
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == row.answers[model].answer
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["cost"] == row.answers[model].cost_usd


async def test_proxy_charges_the_recorded_cost(dataset: Any) -> None:
    """`price: {reported: true}` makes the proxy charge exactly the upstream's `usage.cost`."""
    model = dataset.models[1]
    cfg = parse_config(
        {
            "upstreams": {
                "m": {"base_url": "http://replay.local/v1", "model": model, "price": {"reported": True}}
            },
        },
        env={},
    )
    app = create_app(
        cfg, registry=CollectorRegistry(), transport=httpx.ASGITransport(app=ReplayUpstream(dataset.rows))
    )
    row = dataset.rows[7]
    async with LifespanManager(app), _client(app) as c:
        r = await c.post("/v1/chat/completions", json=_body("m", row.prompt))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == row.answers[model].answer
    assert r.json()["cascade"]["cost_usd"] == pytest.approx(row.answers[model].cost_usd, abs=1e-10)
