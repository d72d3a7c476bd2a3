"""The ledger process's settings from environment variables (see README, "Configuration")."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ledger import limits
from services.platform.config import (
    AuthSettings,
    ConfigError,
    MetricsSettings,
    choice,
    guards_from_env,
    number,
)
from services.platform.guards import Guards
from services.platform.observability import LOG_FORMATS, TRACE_EXPORTERS


@dataclass(frozen=True)
class Settings:
    database_url: str
    database_url_readonly: str
    data_dir: Path
    listen: str
    log_format: str
    log_level: str
    trace_exporter: str
    sweep_interval_s: float
    pool_size_max: int
    shutdown_grace_s: float
    cheaper_models: dict[str, str]
    migrate_on_start: bool
    audit_workers: int
    guards: Guards
    key_retention_s: int = limits.idempotency_retention_s_default
    alert_webhook_url: str = ""
    checkpoint_every_events: int = 0
    checkpoint_every_h: float = 0.0
    checkpoint_check_s: float = 60.0
    auth: AuthSettings = field(default_factory=AuthSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            database_url=env.get("DATABASE_URL", ""),
            database_url_readonly=env.get("DATABASE_URL_READONLY", ""),
            data_dir=Path(env.get("TOKENLEDGER_DATA_DIR", "var")),
            listen=env.get("TOKENLEDGER_LISTEN", "127.0.0.1:50051"),
            log_format=choice(env, "TOKENLEDGER_LOG_FORMAT", "json", LOG_FORMATS),
            log_level=choice(
                env, "TOKENLEDGER_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            trace_exporter=choice(env, "TOKENLEDGER_TRACE_EXPORTER", "none", TRACE_EXPORTERS),
            sweep_interval_s=number(env, "TOKENLEDGER_SWEEP_INTERVAL_S", 1.0, 0.05, 3600),
            pool_size_max=int(number(env, "TOKENLEDGER_POOL_SIZE_MAX", 10, 1, 1000)),
            shutdown_grace_s=number(env, "TOKENLEDGER_SHUTDOWN_GRACE_S", 10.0, 0, 600),
            cheaper_models=_pairs(env, "TOKENLEDGER_CHEAPER_MODELS"),
            migrate_on_start=_flag(env, "TOKENLEDGER_MIGRATE_ON_START", default=True),
            audit_workers=int(
                number(env, "TOKENLEDGER_AUDIT_WORKERS", min(4, os.cpu_count() or 1), 1, 64)
            ),
            guards=guards_from_env(env),
            key_retention_s=int(
                number(
                    env,
                    "TOKENLEDGER_IDEMPOTENCY_RETENTION_S",
                    limits.idempotency_retention_s_default,
                    limits.idempotency_retention_s_min,
                    10 * 365 * 86_400,
                )
            ),
            alert_webhook_url=_webhook_url(env, "TOKENLEDGER_ALERT_WEBHOOK_URL"),
            checkpoint_every_events=int(
                number(env, "TOKENLEDGER_CHECKPOINT_EVERY_EVENTS", 0, 0, 10**12)
            ),
            checkpoint_every_h=number(env, "TOKENLEDGER_CHECKPOINT_EVERY_HOURS", 0, 0, 24 * 366),
            checkpoint_check_s=number(env, "TOKENLEDGER_CHECKPOINT_CHECK_S", 60.0, 0.1, 3600),
            auth=AuthSettings.from_env(env),
            metrics=MetricsSettings.from_env(env),
        )


def _webhook_url(env: Mapping[str, str], name: str) -> str:
    url = env.get(name, "").strip()
    parts = urlsplit(url)
    if url and not (parts.scheme in ("http", "https") and parts.hostname):
        raise ConfigError(f"{name}: {url!r} is not an http:// or https:// URL")
    return url


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    return choice(env, name, "true" if default else "false", ("true", "false")) == "true"


def _pairs(env: Mapping[str, str], name: str) -> dict[str, str]:
    """`a=b,c=d` as {a: b, c: d}."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in env.get(name, "").split(","))):
        model, sep, cheaper = (s.strip() for s in item.partition("="))
        if not (sep and model and cheaper):
            raise ConfigError(f"{name}: {item!r} is not model=cheaper_model")
        out[model] = cheaper
    return out
