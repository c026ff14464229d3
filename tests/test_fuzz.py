"""Fuzzing: schemathesis against the app's own OpenAPI (no input gets a 5xx, every error is an OpenAI
envelope), and hypothesis on the config loader (it raises ConfigError and nothing else). The SSE decoder
is fuzzed in tests/test_sse.py. Example counts are bounded so the whole module runs in seconds."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from app.config import Config, ConfigError, load_config, parse_config
from app.main import create_app
from tests.conftest import SECRET_PROXY_KEY, SECRET_UPSTREAM_KEY, Router, base_config, check_no_secrets
from tests.fake_upstream import create_fake_upstream
from tests.schema import check_error

AUTH = {"authorization": f"Bearer {SECRET_PROXY_KEY}"}


def _app() -> Any:
    cfg = base_config()
    for up in cfg["upstreams"].values():
        up["api_key"] = SECRET_UPSTREAM_KEY
    cfg["auth"] = {"api_keys": [SECRET_PROXY_KEY]}
    app = create_app(
        parse_config(cfg, env={}),
        registry=CollectorRegistry(),
        transport=Router({"fake.local": create_fake_upstream()}),
    )

    async def without_lifespan(scope: Any, receive: Any, send: Any) -> None:
        # schemathesis runs the lifespan around every call; ours would close the upstream client after
        # the first one. The in-process transport needs no startup.
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    return without_lifespan


@pytest.fixture(scope="module")
def api_schema() -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", _app())


def _check(case: Any) -> None:
    response = case.call(headers=AUTH)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        check_error(response.json())
    check_no_secrets(response.text, f"reply to {case.method} {case.path}")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(api_schema: Any, mode: GenerationMode) -> None:
    """Every operation of the app's OpenAPI, with schema-valid and schema-violating inputs."""

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        _check(data.draw(api_schema.as_strategy(mode)))

    run()


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)
_FIELDS = (
    "stream",
    "temperature",
    "n",
    "max_tokens",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "user",
    "metadata",
    "seed",
)
_chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["default", "small", "large"]) | st.text(max_size=5)},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "role": st.sampled_from(["user", "system", "assistant", "tool"]) | _json,
                    "content": _json,
                },
            )
            | _json,
            max_size=3,
        )
        | _json,
        **{f: _json for f in _FIELDS},
    },
)


def test_chat_bodies_with_real_model_names_never_get_a_server_error(api_schema: Any) -> None:
    """The cascade itself behind the schema: real model names, arbitrary values in every known field."""
    operation = api_schema["/v1/chat/completions"]["POST"]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_chat_bodies)
    def run(body: dict[str, Any]) -> None:
        _check(operation.Case(body=body, media_type="application/json"))

    run()


# --- the config loader ------------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
_keys = st.sampled_from(
    [
        "server",
        "auth",
        "upstreams",
        "cascades",
        "learning",
        "stages",
        "upstream",
        "threshold",
        "scorers",
        "type",
        "base_url",
        "model",
        "circuit",
        "max_concurrency",
        "api_keys",
        "small",
        "default",
        "${X}",
    ]
) | st.text(max_size=6)
_trees = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_keys | st.integers(), children, max_size=5)
    ),
    max_leaves=25,
)


def _parse(raw: Any) -> None:
    try:
        assert isinstance(parse_config(raw, env={"X": "x"}), Config)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_trees)
def test_config_loader_raises_only_config_error_on_any_tree(raw: Any) -> None:
    _parse(raw)


def _mutations() -> st.SearchStrategy[dict[str, Any]]:
    """A valid config with one value somewhere replaced by an arbitrary tree."""
    valid = base_config()
    valid["upstreams"]["small"]["circuit"] = {"failures": 2}
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(valid, ())

    def mutate(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
        cfg = copy.deepcopy(valid)
        if not path:
            return cfg
        node = cfg
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return cfg

    return st.builds(mutate, st.sampled_from(paths[1:]), _trees)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_mutations())
def test_config_loader_raises_only_config_error_on_near_valid_configs(raw: dict[str, Any]) -> None:
    _parse(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=200) | _trees.map(lambda t: yaml.safe_dump(t, allow_unicode=True)))
def test_config_file_loader_raises_only_config_error_on_any_text(tmp_path_factory: Any, text: str) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path, env={})
    except ConfigError as exc:
        assert exc.problems
