"""Process settings and their precedence: command-line flags > environment (``CASCADE_*``) > config file
> defaults. The config file itself is loaded and validated by ``app.config``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.config import Config, ConfigError, load_config

DEFAULT_CONFIG = "config.yaml"


class EnvSettings(BaseSettings):
    """``CASCADE_*`` environment variables. Unset ones leave the config file's value alone."""

    model_config = SettingsConfigDict(env_prefix="CASCADE_", extra="ignore", frozen=True)

    config: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    workers: int | None = Field(None, ge=1, le=64)
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    log_format: Literal["json", "text"] | None = None
    metrics_dir: str | None = None


def config_path(cli: str | None, env: EnvSettings) -> str:
    return cli or env.config or DEFAULT_CONFIG


def apply_overrides(config: Config, env: EnvSettings, cli: dict[str, Any]) -> Config:
    """Return ``config`` with server settings overridden by the environment, then by CLI flags."""
    update: dict[str, Any] = {}
    for key in ("host", "port", "workers", "log_level", "log_format"):
        value = getattr(env, key)
        if value is not None:
            update[key] = value
    update.update({k: v for k, v in cli.items() if v is not None})
    if not update:
        return config
    server = config.server.model_validate({**config.server.model_dump(), **update})
    return config.model_copy(update={"server": server})


def _env() -> EnvSettings:
    try:
        return EnvSettings()
    except ValidationError as exc:
        raise ConfigError(
            [f"CASCADE_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors(include_url=False)]
        ) from exc


def load_effective(path: str | None, cli: dict[str, Any]) -> tuple[str, Config]:
    """The config file's path and its contents with the environment's and ``cli``'s overrides."""
    env = _env()
    p = config_path(path, env)
    cfg = load_config(p)
    try:
        return p, apply_overrides(cfg, env, cli)
    except ValidationError as exc:
        raise ConfigError(
            [f"{_source(str(e['loc'][0]), env, cli)}: {e['msg']}" for e in exc.errors(include_url=False)]
        ) from exc


def _source(key: str, env: EnvSettings, cli: dict[str, Any]) -> str:
    """Where the bad value of server setting ``key`` came from: a flag, the environment or the file."""
    if cli.get(key) is not None:
        return f"--{key.replace('_', '-')}"
    if getattr(env, key, None) is not None:
        return f"CASCADE_{key.upper()}"
    return f"server.{key}"
