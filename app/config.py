"""config.yaml: closed, frozen models, validated once with one dotted-path message per problem.

Over 400 lines on purpose: every key config.yaml accepts, and its checks, in one place to read.

``load_config(path)`` reads the YAML, interpolates ``${VAR}`` / ``${VAR:-default}`` in every string,
validates the tree and the cross references (stage -> upstream, judge -> upstream, names) and either
returns a ``Config`` or raises ``ConfigError`` whose ``problems`` are lines like
``cascades.default.stages[1].upstream: unknown upstream 'medum'``. Values are never echoed back in a
message (they may be keys).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.errors import CascadeBaseError


class ConfigError(CascadeBaseError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_NUMBERS: tuple[Any, ...] = (int, float, int | None, float | None)


class _Model(BaseModel):
    # Every number finite: .nan / .inf passed check-config and then failed every request (a NaN
    # hedge_after_s: 500s from the event loop; an infinite price: null costs and +Inf counters).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        # `port: true` was port 1 and `max_retries: yes` one retry: YAML's booleans are no numbers here.
        # As text they fail the field's own check, which names the field.
        if isinstance(data, dict):
            for name, f in cls.model_fields.items():
                key = f.alias or name
                if f.annotation in _NUMBERS and isinstance(data.get(key), bool):
                    data = {**data, key: str(data[key]).lower()}
        return data


# --- server / auth ------------------------------------------------------------------------------------


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP token (RFC 9110), fullmatch
_HEADER_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")  # no control characters but tab
_KEY = re.compile(r"[^\s\x00-\x1f\x7f]+")  # an API key: no spaces, no control characters


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"'{name[:64]}' is not a valid HTTP header name")
        if not _HEADER_VALUE.fullmatch(value):
            raise ValueError(f"the value of '{name}' must not contain control characters (line breaks...)")
    return {k: v.strip() for k, v in headers.items()}


class ServerConfig(_Model):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    # With workers > 1, each worker listens on its own SO_REUSEPORT socket, so the kernel spreads new
    # connections evenly (one shared socket lets one worker take most of a burst of keep-alive
    # connections). False, or a platform other than Linux: one shared socket.
    reuse_port: bool = True
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_messages: int = Field(2048, ge=1)
    shutdown_grace_s: float = Field(30.0, ge=0)
    # A new connection sends its first request whole (head and body) within this many seconds of
    # connecting, a kept-alive one each later request within this of its first byte; else the connection
    # is closed (slow or stalled clients would otherwise hold a connection, a descriptor and a task).
    read_timeout_s: float = Field(60.0, gt=0, le=3600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    # Tune the shared upstream connection pool (per upstream host).
    max_connections: int = Field(1024, ge=1)
    # SIGTERM: /readyz answers 503 for this long while requests are still served (load balancers and
    # Kubernetes stop routing here), then the server stops accepting and drains for shutdown_grace_s.
    drain_delay_s: float = Field(0.0, ge=0, le=300)


class KeyConfig(_Model):
    """A named proxy key: its spend is counted under its name (``cascade_key_cost_usd_total{key}``),
    and it may be held to a daily budget, a highest stage and a set of models."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._\-]+$")
    key: str
    # USD per UTC day, counted from what its requests cost (answers and scoring). Null: no budget.
    budget_usd_per_day: float | None = Field(None, ge=0)
    # Over budget: null answers 429 budget_exceeded until the day ends; a stage number serves the key's
    # requests from that stage at most (the cheaper stages keep answering).
    over_budget_max_stage: int | None = Field(None, ge=0)
    # The highest stage this key's requests reach (that stage is then their last, served unscored).
    max_stage: int | None = Field(None, ge=0)
    # The models (cascades or upstreams) this key may use; empty: all.
    cascades: tuple[str, ...] = ()
    # Whether this key may steer its requests with x-cascade-min-stage / x-cascade-max-stage / `cascade`.
    stage_control: bool = True


class AuthConfig(_Model):
    api_keys: tuple[str, ...] = ()
    keys: tuple[KeyConfig, ...] = ()
    protect_metrics: bool = False
    # Whether requests with an `api_keys` key, or with no key when auth is off, may steer stages.
    stage_control: bool = True
    # Budgets are per UTC day: how often (seconds) replicas sharing a PostgreSQL learning store add their
    # spend to it and read the others'.
    budget_sync_s: float = Field(2.0, gt=0, le=300)

    @field_validator("api_keys", mode="after")
    @classmethod
    def _drop_empty(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        # "${CASCADE_API_KEY:-}" with the variable unset means "no key", not "the empty key".
        return tuple(k for k in keys if k)


# --- upstreams ------------------------------------------------------------------------------------------


class Price(_Model):
    """USD per 1M tokens. ``reported: true`` charges the ``usage.cost`` the upstream reports (OpenRouter
    style) when present, and falls back to the token prices otherwise."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)
    reported: bool = False


class CircuitConfig(_Model):
    """Circuit breaker of one upstream (see ``app.upstream.breaker``). ``circuit: false`` disables it."""

    enabled: bool = True
    # Opens when, of the attempts that ended in the last window_s, at least `failures` failed and they
    # are at least `failure_ratio` of them.
    failures: int = Field(5, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    window_s: float = Field(30.0, gt=0)
    cooldown_s: float = Field(30.0, gt=0)  # open this long, then one probe call decides (half-open)


class UpstreamConfig(_Model):
    base_url: str
    model: str
    api_key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    price: Price = Price()
    timeout_s: float = Field(30.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_retries: int = Field(1, ge=0, le=10)
    # False for upstreams that cannot return token logprobs: a logprob scorer on them is a config error.
    logprobs: bool = True
    # Whether the upstream honours ``n`` (llama.cpp ignores it): consistency then uses parallel calls.
    supports_n: bool = True
    # False for upstreams that answer tool requests only unstreamed (llama-cpp-python's function-calling
    # chat format: "Automatic streaming tool choice is not supported"): a streamed request with `tools`
    # is then asked unstreamed and its answer streamed to the client in chunks, as an earlier stage's is.
    stream_tools: bool = True
    # Request fields sent when the client did not set them, e.g. {max_tokens: 256} for a local server
    # that otherwise generates until its context is full. The client's own values always win.
    defaults: dict[str, Any] = Field(default_factory=dict)
    circuit: CircuitConfig = CircuitConfig()
    # At most this many calls in flight to this upstream (None: unlimited). A call waits up to
    # queue_timeout_s for a slot, then fails as saturated: the cascade escalates; 429 when every stage is.
    max_concurrency: int | None = Field(None, ge=1)
    queue_timeout_s: float = Field(2.0, ge=0)
    # A stage on this upstream is not started when less than this remains of the cascade's deadline (504).
    min_budget_s: float = Field(0.0, ge=0)

    @field_validator("circuit", mode="before")
    @classmethod
    def _circuit_switch(cls, v: Any) -> Any:
        # `circuit: false` / `circuit: true` as shorthands for {enabled: false} / the defaults.
        return {"enabled": v} if isinstance(v, bool) else v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http(s) URL like http://127.0.0.1:8081/v1")
        return v.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        # A key read from a file (a Kubernetes secret made with --from-file, `echo key > file`) ends in a
        # newline: sent as is, every request failed building its Authorization header (a 500).
        v = v.strip() if v is not None else None
        if v and not _KEY.fullmatch(v):
            raise ValueError("must not contain spaces or control characters (line breaks, tabs...)")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_headers(v)


# --- scorers --------------------------------------------------------------------------------------------


class ScorerCommon(_Model):
    weight: float = Field(1.0, gt=0)
    veto: bool = False
    timeout_s: float = Field(10.0, gt=0)
    on_error: Literal["reject", "ignore", "accept"] = "reject"


class HeuristicScorer(ScorerCommon):
    type: Literal["heuristic"]
    # Extra refusal/hedging phrases (case-insensitive substrings) on top of the built-in list.
    phrases: tuple[str, ...] = ()
    min_chars: int = Field(1, ge=0)
    # Early abort on streams: look at the first ``early_chars`` characters for a refusal.
    early_chars: int = Field(200, ge=0)
    # Reject answers longer than this many characters (also checked while streaming, with early_abort).
    max_chars: int | None = Field(None, ge=1)


class LogprobScorer(ScorerCommon):
    type: Literal["logprob"]
    aggregate: Literal["p10", "mean", "min", "geo", "first"] = "p10"


class JudgeScorer(ScorerCommon):
    type: Literal["judge"]
    upstream: str
    prompt: str | None = None


class SelfVerifyScorer(ScorerCommon):
    type: Literal["self_verify"]
    prompt: str | None = None


class ConsistencyScorer(ScorerCommon):
    type: Literal["consistency"]
    k: int = Field(3, ge=2, le=16)
    temperature: float = Field(0.7, ge=0, le=2)


class AgreementScorer(ScorerCommon):
    type: Literal["agreement"]
    with_: Literal["previous", "any"] = Field("previous", alias="with")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HttpScorer(ScorerCommon):
    type: Literal["http"]
    url: str
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_headers(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http(s) URL")
        return v


class LearnedScorer(ScorerCommon):
    type: Literal["learned"]
    model: str


class PythonScorer(ScorerCommon):
    type: Literal["python"]
    class_: str = Field(alias="class")
    options: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("class_")
    @classmethod
    def _spec(cls, v: str) -> str:
        if not re.match(r"^[\w.]+:[\w.]+$", v):
            raise ValueError("must be 'module:Class'")
        return v


ScorerConfig = Annotated[
    HeuristicScorer
    | LogprobScorer
    | JudgeScorer
    | SelfVerifyScorer
    | ConsistencyScorer
    | AgreementScorer
    | HttpScorer
    | LearnedScorer
    | PythonScorer,
    Field(discriminator="type"),
]
SCORER_TYPES = (
    "heuristic",
    "logprob",
    "judge",
    "self_verify",
    "consistency",
    "agreement",
    "http",
    "learned",
    "python",
)


# --- cascades -------------------------------------------------------------------------------------------


class StageConfig(_Model):
    upstream: str
    threshold: float | None = Field(None, ge=0, le=1)
    scorers: tuple[ScorerConfig, ...] = ()
    # Stream this stage upstream and let scorers that can (heuristic) reject it while it is still being
    # generated: a refusal in the first tokens is cancelled at once instead of paid for in full.
    early_abort: bool = False
    # Hedged escalation: when this stage has not answered after this many seconds, the next stage starts
    # in parallel. A number, or "p95": the 95th percentile of this stage's upstream's recent latency.
    hedge_after_s: float | Literal["p95"] | None = None

    @field_validator("hedge_after_s", mode="before")
    @classmethod
    def _hedge(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, int | float) and not 0 <= v < math.inf):
            raise ValueError('must be a finite number of seconds >= 0 or "p95"')
        return v


class RouterConfig(_Model):
    """Route-then-cascade: a prompt-only model (``cascade fit-scorer`` / ``cascade replay`` write it as
    ``router.json``) estimates, before any answer exists, the chance that the earlier stages would be
    rejected anyway; at ``threshold`` or above the request starts at the last stage."""

    model: str
    threshold: float = Field(ge=0, le=1)


class CascadeConfig(_Model):
    stages: tuple[StageConfig, ...] = Field(min_length=1)
    deadline_s: float = Field(120.0, gt=0)
    # When the last stage fails (error, or the deadline passes before it answers): "none" answers with
    # the error (502/504); "best_rejected" serves the highest-scored answer an earlier stage gave.
    fallback: Literal["none", "best_rejected"] = "none"
    router: RouterConfig | None = None
    # How labels decide "as good as the last stage's answer" for this cascade (default: learning.compare).
    compare: Literal["auto", "exact", "judge"] | None = None


class LearningConfig(_Model):
    """The trace store, labels and threshold fitting (``app.learning``). Read at startup: a reload that
    changes this section takes effect on restart."""

    # sqlite:///relative/or//absolute/path.db (WAL; one host) or postgresql://user:pw@host/db (replicas).
    store: str = "sqlite:///./data/traces.db"
    store_text: bool = False  # also keep prompt and answer texts (off: only text-free features)
    queue_size: int = Field(10_000, ge=1)  # records waiting for the store; beyond it they are dropped
    # PostgreSQL: the longest one statement may run, so a hung query cannot block writes and shutdown.
    statement_timeout_s: float = Field(30.0, gt=0)
    shadow_rate: float = Field(0.0, ge=0, le=1)
    shadow_budget_usd_per_hour: float = Field(1.0, ge=0)  # per server: each worker gets 1/workers
    # Shadow and judge spend at most this share of what the answers cost (per process, last hour);
    # null: no such cap.
    shadow_max_share: float | None = Field(0.1, gt=0, le=1)
    # The first label calls of each cascade (per process) are not held to shadow_max_share: a cascade
    # whose early stage answers nearly everything cheaply still gets the labels it starts from.
    shadow_warmup: int = Field(20, ge=0)
    shadow_max_in_flight: int = Field(8, ge=1)  # per process; more are skipped ("busy"), never queued
    # A shadow call of a cascade of three stages or more also asks the stages between the one that
    # answered and the last, and scores and labels their answers: the fit then knows what a middle stage
    # would have done for an answer the first stage accepted, instead of filling in a guess.
    shadow_middle: bool = True
    # The label definition: "as good as the last stage's answer", decided by `compare`:
    # auto: exact match of closed forms (choice, number, JSON, tool calls), else the judge, else no label;
    # exact: normalised exact match always; judge: the judge always.
    compare: Literal["auto", "exact", "judge"] = "auto"
    judge: str | None = None  # upstream that judges free-form answers (old name: shadow_judge)
    user_pass_score: float = Field(0.5, ge=0, le=1)  # feedback score >= this: "as good" (1), else 0
    target_quality: float = Field(0.95, gt=0, le=1)
    auto_tune: bool = False
    tune_every: int = Field(20, ge=1)
    min_labels: int = Field(20, ge=1)
    max_step: float = Field(0.05, gt=0, le=1)  # per fit, each threshold moves at most this far...
    max_step_up: float = Field(1.0, gt=0, le=1)  # ...or up to this far up when the target is missed
    threshold_bounds: tuple[float, float] = (0.05, 0.99)
    # Fit with quality - margin_z * standard error >= target: a margin against fitting to noise.
    margin_z: float = Field(1.0, ge=0, le=5)
    # The cheapest of ~1,600 threshold combinations that meets the target on the labels was partly
    # picked for its luck: true (default) makes each fit also reach the optimism of that choice, measured
    # on bootstrap replicates of the labels (as offline fits do); false: the plain search.
    optimism_correction: bool = True
    # Drift: a labelled request's weight halves every `half_life_labels` newer labelled requests
    # (0: no decay); fits use at most the newest `window_labels` of them (0: 4 half-lives, or all).
    half_life_labels: int = Field(2000, ge=0)
    window_labels: int = Field(0, ge=0)
    # Abrupt change: when the newest `drift_labels` labelled requests' quality at the thresholds in force
    # (or the newest 2, 4, 8 times as many) differs from the older ones' by 4 standard errors, fits
    # start over from them (0: never).
    drift_labels: int = Field(200, ge=0)
    # How often a replica looks in the store for new labels and for fits made by other replicas.
    sync_every_s: float = Field(30.0, gt=0)
    # Traces (with their attempts and labels) older than this are deleted, hourly; 0 keeps them forever.
    retention_days: float = Field(30.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _old_judge_key(cls, data: Any) -> Any:
        # `shadow_judge` was the key before labels got one definition; it still works.
        if isinstance(data, dict) and "shadow_judge" in data:
            data = dict(data)
            old = data.pop("shadow_judge")
            if data.get("judge") not in (None, old):
                raise ValueError("shadow_judge is the old name of judge: give one of them")
            data["judge"] = old
        return data

    @model_validator(mode="after")
    def _window_holds_a_fit(self) -> LearningConfig:
        # A window smaller than min_labels never holds enough labels: auto_tune silently never fitted.
        if self.auto_tune and self.window and self.window < self.min_labels:
            where = "window_labels" if self.window_labels else "4 x half_life_labels"
            raise ValueError(
                f"fits use at most {self.window} labelled requests ({where}), fewer than min_labels "
                f"({self.min_labels}): auto_tune would never fit; raise window_labels / half_life_labels "
                "or lower min_labels"
            )
        return self

    @property
    def window(self) -> int:
        """Labelled requests a fit uses at most (0: all)."""
        if self.window_labels:
            return self.window_labels
        return 4 * self.half_life_labels

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if not re.match(r"^(sqlite:///.+|postgres(ql)?://.+)$", v):
            raise ValueError("must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB")
        return v

    @field_validator("threshold_bounds")
    @classmethod
    def _bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 1:
            raise ValueError("must be [low, high] with 0 <= low < high <= 1")
        return v


class Config(_Model):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    cascades: dict[str, CascadeConfig] = Field(default_factory=dict)
    learning: LearningConfig | None = None


# --- loading ----------------------------------------------------------------------------------------------

_VAR_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.S)


def _closing(s: str, start: int) -> int:
    """The index of the ``}`` closing the ``${`` whose body starts at ``start`` (nested ones balanced)."""
    depth = 1
    for i in range(start, len(s)):
        if s.startswith("${", i):
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def expand(s: str, env: dict[str, str], missing: list[str]) -> str:
    """``${VAR}``, ``${VAR:-default}`` (the default may hold ``${...}`` itself) and ``$$`` (a literal
    ``$``, as in docker compose); the names of unset variables without a default go to ``missing``."""
    out: list[str] = []
    i = 0
    while i < len(s):
        if s.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if s.startswith("${", i):
            end = _closing(s, i + 2)
            m = _VAR_NAME.fullmatch(s, i + 2, end) if end >= 0 else None
            if m is not None:
                name, default = m.group(1), m.group(2)
                if name in env:
                    out.append(env[name])
                elif default is not None:
                    out.append(expand(default, env, missing))
                else:
                    missing.append(name)
                i = end + 1
                continue
        out.append(s[i])
        i += 1
    return "".join(out)


def _interpolate(node: Any, path: str, env: dict[str, str], problems: list[str]) -> Any:
    if isinstance(node, str):
        missing: list[str] = []
        value = expand(node, env, missing)
        problems.extend(f"{path or '<root>'}: environment variable {name} is not set" for name in missing)
        return value
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    return node


def _join(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    prev: int | str | None = None
    prev2: int | str | None = None
    for part in loc:
        # pydantic adds the discriminator tag to the location of a tagged-union member: drop it.
        if isinstance(part, str) and part in SCORER_TYPES and isinstance(prev, int) and prev2 == "scorers":
            prev2, prev = prev, part
            continue
        if part == "class_":
            part = "class"
        elif part == "with_":
            part = "with"
        path = _join(path, part)
        prev2, prev = prev, part
    return path


def _format_validation(exc: ValidationError) -> list[str]:
    out = []
    errors = exc.errors(include_url=False, include_input=False)
    bad_names = [err["loc"][: err["loc"].index("[key]")] for err in errors if "[key]" in err["loc"]]
    for err in errors:
        loc = err["loc"]
        if "[key]" in loc:  # a mapping key YAML read as a number, a boolean or null
            out.append(
                f"{_loc_to_path(loc[: loc.index('[key]')])}: a name must be a string (write it in quotes)"
            )
            continue
        if any(loc[: len(name)] == name for name in bad_names):
            continue  # what is under a bad name is said once, by the name
        if err["type"] == "too_short" and any(
            len(o["loc"]) > len(loc) and o["loc"][: len(loc)] == loc for o in errors
        ):
            continue  # the list is long enough: one of its items is wrong, and that error says which
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown scorer type; expected one of: {', '.join(SCORER_TYPES)}"
        elif err["type"] == "too_short":
            msg = f"must have at least {err.get('ctx', {}).get('min_length', 1)} item(s)"
        elif err["type"] == "union_tag_not_found":
            msg = "scorer needs a 'type'"
        msg = msg.removeprefix("Value error, ")
        out.append(f"{_loc_to_path(err['loc']) or '<root>'}: {msg}")
    return out


def _header_safe(name: str) -> bool:
    """Fits an HTTP header value: printable Latin-1 (no control characters)."""
    return name.isprintable() and all(ord(c) < 256 for c in name)


def _cross_check(cfg: Config) -> list[str]:
    problems = [
        f"{kind}: a name must not be empty"
        for kind, names in (("upstreams", cfg.upstreams), ("cascades", cfg.cascades))
        if any(not n.strip() for n in names)
    ]
    names = set(cfg.upstreams)
    for name in cfg.upstreams:
        if not _header_safe(name):
            shown = name if name.isprintable() else name.encode("unicode_escape").decode()
            problems.append(
                f"upstreams.{shown}: the name goes out in a response header, so it must be printable Latin-1"
            )
    for cname, cascade in cfg.cascades.items():
        if cascade.router is not None and len(cascade.stages) < 2:
            problems.append(
                f"cascades.{cname}.router: a router skips to the last stage; it needs two stages or more"
            )
        if cname in names:
            problems.append(f"cascades.{cname}: name clashes with an upstream of the same name")
        last = len(cascade.stages) - 1
        for i, stage in enumerate(cascade.stages):
            p = f"cascades.{cname}.stages[{i}]"
            if i == last and stage.hedge_after_s is not None:
                problems.append(f"{p}.hedge_after_s: the last stage has no next stage to hedge with")
            if stage.upstream not in names:
                problems.append(f"{p}.upstream: unknown upstream '{stage.upstream}'")
            if i < last and stage.threshold is None:
                problems.append(f"{p}.threshold: required on every stage but the last")
            if i < last and not stage.scorers:
                problems.append(f"{p}.scorers: a stage before the last needs at least one scorer")
            if i == last and stage.early_abort:
                problems.append(f"{p}.early_abort: the last stage is never scored, so it cannot abort early")
            if i == last and stage.threshold is not None:
                problems.append(f"{p}.threshold: the last stage is always accepted; remove its threshold")
            for j, sc in enumerate(stage.scorers):
                sp = f"{p}.scorers[{j}]"
                if isinstance(sc, JudgeScorer) and sc.upstream not in names:
                    problems.append(f"{sp}.upstream: unknown upstream '{sc.upstream}'")
                if (
                    isinstance(sc, LogprobScorer)
                    and stage.upstream in names
                    and not cfg.upstreams[stage.upstream].logprobs
                ):
                    problems.append(
                        f"{sp}: upstream '{stage.upstream}' does not return logprobs (logprobs: false)"
                    )
                if isinstance(sc, AgreementScorer) and i == 0:
                    problems.append(f"{sp}: the first stage has no earlier answer to agree with")
    if cfg.learning is not None:
        problems += _check_labels(cfg, cfg.learning, names)
    problems += _check_keys(cfg, names)
    return problems


def _check_keys(cfg: Config, names: set[str]) -> list[str]:
    problems = []
    seen_names: set[str] = set()
    seen_keys: set[str] = set(cfg.auth.api_keys)
    for i, k in enumerate(cfg.auth.keys):
        p = f"auth.keys[{i}]"
        if k.name in seen_names:
            problems.append(f"{p}.name: another key has the same name")
        seen_names.add(k.name)
        if not k.key:
            problems.append(f"{p}.key: empty (is its environment variable set?)")
        elif k.key in seen_keys:
            problems.append(f"{p}.key: the same key is configured twice")
        seen_keys.add(k.key)
        for j, model in enumerate(k.cascades):
            if model not in cfg.cascades and model not in names:
                problems.append(f"{p}.cascades[{j}]: unknown cascade or upstream '{model}'")
        if k.over_budget_max_stage is not None and k.budget_usd_per_day is None:
            problems.append(f"{p}.over_budget_max_stage: needs budget_usd_per_day")
    return problems


def _check_labels(cfg: Config, lcfg: LearningConfig, names: set[str]) -> list[str]:
    problems = []
    if lcfg.judge is not None and lcfg.judge not in names:
        problems.append(f"learning.judge: unknown upstream '{lcfg.judge}'")
    if lcfg.judge is None:
        if lcfg.compare == "judge":
            problems.append("learning.compare: 'judge' needs learning.judge (an upstream)")
        for cname, cascade in cfg.cascades.items():
            if cascade.compare == "judge":
                problems.append(f"cascades.{cname}.compare: 'judge' needs learning.judge (an upstream)")
    return problems


def parse_config(raw: Any, env: dict[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML tree. Raises ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: must be a mapping"])
    problems: list[str] = []
    data = _interpolate(raw, "", dict(os.environ) if env is None else env, problems)
    if problems:
        raise ConfigError(problems)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc)) from exc
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the last one
    silently (two ``small:`` upstreams, the first one's settings gone), and ``calibrate --write`` then
    refused the file that check-config had passed. ``<<`` merges still override as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says what is wrong with it
                continue
            seen.setdefault(key, key_node.start_mark.line)
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{str(key)[:64]}' (first on line {first + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def _text_line(path: Path, offset: int) -> int:
    """The 1-based line of byte ``offset`` in ``path``."""
    try:
        return path.read_bytes()[:offset].count(b"\n") + 1
    except OSError:
        return 0


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config file ({exc.strerror})"]) from exc
    except UnicodeDecodeError as exc:
        # Never the bytes themselves: the file holds keys (the decode error's repr quotes it whole).
        line = _text_line(p, exc.start)
        raise ConfigError(
            [f"{p}: line {line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"]
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{p}:{where}: {problem}"]) from exc
    return parse_config(raw, env)
