"""Process settings from environment variables (see README, "Configuration")."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.observability import LOG_FORMATS, TRACE_EXPORTERS


class ConfigError(ValueError):
    """A setting has a value the process cannot use."""


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, default).strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return value


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r}: must be between {low} and {high}")
    return value


@dataclass(frozen=True)
class Settings:
    database_url: str
    data_dir: Path
    listen: str
    log_format: str
    log_level: str
    trace_exporter: str
    sweep_interval_s: float
    pool_size_max: int
    shutdown_grace_s: float
    cheaper_models: dict[str, str]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            database_url=env.get("DATABASE_URL", ""),
            data_dir=Path(env.get("TOKENLEDGER_DATA_DIR", "var")),
            listen=env.get("TOKENLEDGER_LISTEN", "127.0.0.1:50051"),
            log_format=_choice(env, "TOKENLEDGER_LOG_FORMAT", "json", LOG_FORMATS),
            log_level=_choice(
                env, "TOKENLEDGER_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            trace_exporter=_choice(env, "TOKENLEDGER_TRACE_EXPORTER", "none", TRACE_EXPORTERS),
            sweep_interval_s=_number(env, "TOKENLEDGER_SWEEP_INTERVAL_S", 1.0, 0.05, 3600),
            pool_size_max=int(_number(env, "TOKENLEDGER_POOL_SIZE_MAX", 10, 1, 1000)),
            shutdown_grace_s=_number(env, "TOKENLEDGER_SHUTDOWN_GRACE_S", 10.0, 0, 600),
            cheaper_models=_pairs(env, "TOKENLEDGER_CHEAPER_MODELS"),
        )


def _pairs(env: Mapping[str, str], name: str) -> dict[str, str]:
    """`a=b,c=d` as {a: b, c: d}."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in env.get(name, "").split(","))):
        model, sep, cheaper = (s.strip() for s in item.partition("="))
        if not (sep and model and cheaper):
            raise ConfigError(f"{name}: {item!r} is not model=cheaper_model")
        out[model] = cheaper
    return out
