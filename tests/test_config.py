"""config.yaml loading, interpolation, validation messages, settings precedence, the CLI's exit codes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import main
from app.config import ConfigError, load_config, parse_config
from app.settings import load_effective
from tests.conftest import base_config, chat, proxy
from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]


def _problems(raw: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env=env or {})
    return info.value.problems


def test_the_bundled_config_is_valid() -> None:
    cfg = load_config(ROOT / "config.yaml", env={})
    assert cfg.cascades, "the default config must define a cascade"


@pytest.mark.parametrize(
    "path",
    [
        "config.openai.yaml",
        *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "deploy/examples").glob("*.yaml"))),
    ],
)
def test_every_shipped_example_config_is_valid(path: str) -> None:
    # The configs the README points users at must load as they are (unset ${VAR}s take their defaults).
    cfg = load_config(ROOT / path, env={"OPENAI_API_KEY": "sk-test"})
    assert cfg.cascades and all(len(c.stages) >= 2 for c in cfg.cascades.values())


def test_dotted_paths_one_line_per_problem() -> None:
    raw = base_config()
    raw["upstreams"]["small"]["bogus"] = 1
    raw["upstreams"]["large"]["base_url"] = "ftp://x"
    raw["cascades"]["default"]["stages"][1]["upstream"] = "medum"
    raw["cascades"]["default"]["stages"][0]["scorers"] = [
        {"type": "heuristic", "weight": -1},
        {"type": "nah"},
    ]
    problems = _problems(raw)
    assert "upstreams.small.bogus: unknown key" in problems
    assert any(p.startswith("upstreams.large.base_url: must be an http(s) URL") for p in problems)
    assert any(p.startswith("cascades.default.stages[0].scorers[0].weight:") for p in problems)
    assert any(p.startswith("cascades.default.stages[0].scorers[1]: unknown scorer type") for p in problems)


def test_cross_reference_problems() -> None:
    raw = base_config()
    raw["cascades"]["default"]["stages"][1]["upstream"] = "medum"
    raw["cascades"]["default"]["stages"][0].pop("threshold")
    raw["cascades"]["small"] = {"stages": [{"upstream": "small", "threshold": 0.5}]}
    problems = _problems(raw)
    assert "cascades.default.stages[1].upstream: unknown upstream 'medum'" in problems
    assert "cascades.default.stages[0].threshold: required on every stage but the last" in problems
    assert "cascades.small: name clashes with an upstream of the same name" in problems
    assert (
        "cascades.small.stages[0].threshold: the last stage is always accepted; remove its threshold"
        in problems
    )


def test_interpolation_with_defaults_and_missing_variables() -> None:
    raw = base_config()
    raw["upstreams"]["small"]["api_key"] = "${KEY_A}"
    raw["upstreams"]["large"]["api_key"] = "${KEY_B:-fallback}"
    raw["auth"] = {"api_keys": ["${PROXY_KEY:-}", "k2"]}
    cfg = parse_config(raw, env={"KEY_A": "sk-a"})
    assert cfg.upstreams["small"].api_key == "sk-a"
    assert cfg.upstreams["large"].api_key == "fallback"
    assert cfg.auth.api_keys == ("k2",)  # an unset optional key is no key, not the empty key
    assert _problems(raw, env={}) == ["upstreams.small.api_key: environment variable KEY_A is not set"]


def test_problem_messages_never_echo_values() -> None:
    raw = base_config()
    raw["upstreams"]["small"]["timeout_s"] = "sk-SECRET-VALUE"
    problems = _problems(raw)
    assert problems and not any("SECRET" in p for p in problems)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("upstreams:\n  small: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "line" in info.value.problems[0]


def test_settings_precedence_cli_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = base_config()
    raw["server"] = {"host": "127.0.0.9", "port": 9001}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    _, cfg = load_effective(str(p), {})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.9", 9001)
    monkeypatch.setenv("CASCADE_PORT", "9002")
    monkeypatch.setenv("CASCADE_HOST", "127.0.0.2")
    _, cfg = load_effective(str(p), {})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.2", 9002)
    _, cfg = load_effective(str(p), {"port": 9003, "host": None})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.2", 9003)
    monkeypatch.setenv("CASCADE_CONFIG", str(p))
    path, _ = load_effective(None, {})
    assert path == str(p)


def test_check_config_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base_config()))
    assert main(["check-config", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    raw = base_config()
    raw["cascades"]["default"]["stages"][1]["upstream"] = "medum"
    raw["upstreams"]["small"]["api_key"] = "sk-SECRET-KEY-xyz"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "cascades.default.stages[1].upstream: unknown upstream 'medum'"
    assert "SECRET" not in err


def test_serve_with_a_bad_config_exits_2_before_binding(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {}\n")
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(bad), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["upstreams: must have at least 1 item(s)"]


@pytest.mark.parametrize("name", ["small-\u2603", "tab\there", "line\nbreak"])
def test_an_upstream_name_that_cannot_be_a_header_value_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Upstream names go out in the ``x-cascade-upstream`` header, which is Latin-1 text without control
    characters: such a name used to pass config and make a 500 after the upstream was paid."""
    raw = base_config()
    raw["upstreams"][name] = raw["upstreams"].pop("large")
    raw["cascades"]["default"]["stages"][1]["upstream"] = name
    shown = name if name.isprintable() else name.encode("unicode_escape").decode()  # one line each
    expected = f"upstreams.{shown}: the name goes out in a response header, so it must be printable Latin-1"
    assert _problems(raw) == [expected]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.anyio
async def test_a_latin1_upstream_name_serves(fake: FakeUpstream) -> None:
    raw = base_config()
    raw["upstreams"]["café"] = raw["upstreams"].pop("large")
    raw["cascades"]["default"]["stages"][1]["upstream"] = "café"
    async with proxy(raw, fake) as (c, _):
        r = await c.post("/v1/chat/completions", json=chat("café", stream=True))
    assert r.status_code == 200
    assert dict(r.headers.raw)[b"x-cascade-upstream"] == "café".encode("latin-1")


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("cascades", "default", "stages", 0, "hedge_after_s"), math.nan),
        (("upstreams", "small", "price", "input"), math.inf),
        (("upstreams", "small", "min_budget_s"), math.inf),
        (("cascades", "default", "stages", 0, "scorers", 0, "weight"), math.inf),
        (("server", "shutdown_grace_s"), math.inf),
    ],
)
def test_numbers_must_be_finite(where: tuple[Any, ...], value: float) -> None:
    """``.nan`` and ``.inf`` passed check-config, then broke the proxy: a NaN hedge_after_s made every
    request a 500, an infinite price null costs and +Inf counters, an infinite scorer weight a NaN score,
    an infinite shutdown_grace_s a traceback at serve."""
    raw = base_config()
    raw.setdefault("server", {})
    node: Any = raw
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    dotted = ".".join(f"[{k}]" if isinstance(k, int) else k for k in where).replace(".[", "[")
    [problem] = _problems(raw)
    assert problem.startswith(f"{dotted}:") and "finite" in problem, problem


def test_a_key_read_from_a_file_with_its_newline_is_trimmed_and_control_characters_refused() -> None:
    """A key from a Kubernetes secret made with --from-file ends in a newline: every request failed
    building its Authorization header (a 500, and no escalation)."""
    raw = base_config()
    raw["upstreams"]["small"]["api_key"] = "${KEY}"
    raw["upstreams"]["large"]["headers"] = {"x-team": " blue \n"}
    assert _problems(raw, env={"KEY": "sk-abc\n"}) == [
        "upstreams.large.headers: the value of 'x-team' must not contain control characters (line breaks...)"
    ]
    raw["upstreams"]["large"]["headers"] = {"x-team": " blue "}
    cfg = parse_config(raw, env={"KEY": "sk-abc\n"})
    assert cfg.upstreams["small"].api_key == "sk-abc" and cfg.upstreams["large"].headers == {"x-team": "blue"}
    raw["upstreams"]["large"]["headers"] = {"x bad name": "v"}
    assert _problems(raw, env={"KEY": "sk-a\tb"}) == [
        "upstreams.small.api_key: must not contain spaces or control characters (line breaks, tabs...)",
        "upstreams.large.headers: 'x bad name' is not a valid HTTP header name",
    ]


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently: a second ``small:`` upstream replaced the first."""
    p = tmp_path / "c.yaml"
    p.write_text(
        "upstreams:\n  small: {base_url: http://a/v1, model: m}\n  small: {base_url: http://b/v1, model: m}\n"
        "cascades: {}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.problems == [f"{p}: line 3, column 3: duplicate key 'small' (first on line 2)"]
    p.write_text("upstreams:\n  small: {base_url: 'http://a/v1', base_url: 'http://b/v1', model: m}\n")
    with pytest.raises(ConfigError) as info:  # twice on one line
        load_config(p)
    assert info.value.problems == [f"{p}: line 2, column 36: duplicate key 'base_url' (first on line 2)"]
    # YAML merge keys still override as YAML says.
    p.write_text(
        "x-base: &base {base_url: 'http://a/v1', model: m, timeout_s: 5}\n"
        "upstreams:\n  small: {<<: *base, timeout_s: 9}\n  large: {<<: *base}\n"
        "cascades:\n  default: {stages: [{upstream: small, threshold: 0.5}, {upstream: large}]}\n"
    )
    with pytest.raises(ConfigError) as info:  # (x-base is not a config key: the merge itself passed)
        load_config(p)
    assert info.value.problems == ["x-base: unknown key"]


def test_a_config_file_that_is_not_utf8_is_one_line_without_its_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was a UnicodeDecodeError traceback (exit 1), and on reload its repr, the whole file with its
    keys, went into the log."""
    p = tmp_path / "c.yaml"
    p.write_bytes(b"upstreams:\n  small: {base_url: http://x/v1, model: caf\xe9, api_key: sk-SECRET}\n")
    assert main(["check-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"{p}: line 2: not UTF-8 text (byte 54); save the file as UTF-8"
    assert "SECRET" not in err


def test_interpolation_nests_defaults_and_escapes_dollars() -> None:
    """``${A:-${B}}`` gave the literal "${B}" (or "aye}" with A set), and a literal ``$`` before a brace
    could not be written."""
    raw = base_config()
    raw["upstreams"]["small"]["api_key"] = "${KEY_A:-${KEY_B}}"
    raw["upstreams"]["large"]["api_key"] = "${KEY_C:-${KEY_D:-fallback}}"
    raw["upstreams"]["large"]["headers"] = {"x-note": "costs $${PRICE} and $$5"}
    cfg = parse_config(raw, env={"KEY_B": "sk-b"})
    assert cfg.upstreams["small"].api_key == "sk-b" and cfg.upstreams["large"].api_key == "fallback"
    assert cfg.upstreams["large"].headers == {"x-note": "costs ${PRICE} and $5"}
    assert parse_config(raw, env={"KEY_A": "sk-a", "KEY_B": "x"}).upstreams["small"].api_key == "sk-a"
    assert _problems(raw, env={}) == ["upstreams.small.api_key: environment variable KEY_B is not set"]


def test_odd_names_booleans_and_a_bad_item_say_one_thing_each() -> None:
    raw = base_config()
    raw["cascades"]["default"]["stages"] = [{"threshold": 0.5}]  # a stage without its upstream
    # (it also said "stages: must have at least 1 item(s)" of a list of one item)
    assert _problems(raw) == ["cascades.default.stages[0].upstream: required key is missing"]
    raw = base_config()
    raw["cascades"][None] = {"stages": "s"}  # `null:` or `~:` in YAML
    assert _problems(raw) == ["cascades.None: a name must be a string (write it in quotes)"]
    raw = base_config()
    raw["upstreams"][""] = raw["upstreams"].pop("large")
    raw["cascades"]["default"]["stages"][1]["upstream"] = ""
    assert _problems(raw) == ["upstreams: a name must not be empty"]
    raw = base_config()
    raw["server"] = {"port": True}  # it was port 1
    raw["upstreams"]["small"]["max_retries"] = True  # it was one retry
    problems = _problems(raw)
    assert [p.split(":")[0] for p in problems] == ["server.port", "upstreams.small.max_retries"]


def test_a_bad_flag_or_environment_value_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve --port 0`` reported ``server.port``, sending the user to a file that has no such line."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config()))
    with pytest.raises(ConfigError) as info:
        load_effective(str(path), {"port": 0})
    assert info.value.problems == ["--port: Input should be greater than or equal to 1"]
    monkeypatch.setenv("CASCADE_WORKERS", "0")
    with pytest.raises(ConfigError) as info:
        load_effective(str(path), {})
    assert info.value.problems == ["CASCADE_WORKERS: Input should be greater than or equal to 1"]


def test_a_fit_window_smaller_than_min_labels_is_an_error_with_auto_tune() -> None:
    """``half_life_labels: 4`` makes a window of 16 labelled requests, under the 20 a fit needs:
    auto_tune never fitted, with no line in the log."""
    raw = base_config()
    raw["learning"] = {"store": "sqlite:///x.db", "auto_tune": True, "half_life_labels": 4}
    [problem] = _problems(raw)
    assert (
        problem.startswith("learning: fits use at most 16 labelled requests") and "min_labels (20)" in problem
    )
    raw["learning"]["min_labels"] = 16
    assert parse_config(raw, env={}).learning is not None
    raw["learning"] = {"store": "sqlite:///x.db", "half_life_labels": 4}  # no auto_tune: calibrate reads all
    assert parse_config(raw, env={}).learning is not None
