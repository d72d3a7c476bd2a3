"""Context service settings from environment variables (see README, "Configuration")."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from services.context.fitting import AllocationPolicy
from services.context.output_hold import (
    OutputHoldConfig,
    output_hold_margin_default,
    output_stats_ttl_s_default,
)
from services.context.tokenizers import (
    COUNT_CACHE_ENTRIES_MAX_DEFAULT,
    POOL_MEMORY_BYTES_MAX_DEFAULT,
)
from services.platform.auth import ClientAuth
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

LISTEN_DEFAULT = "127.0.0.1:50052"
LEDGER_TARGET_DEFAULT = "127.0.0.1:50051"
SUMMARIZER_MODEL_DEFAULT = "gpt-4o-mini"
DEADLINE_S_DEFAULT = 60.0
"""PrepareContext without a client deadline: room for a remote summarizer and ledger calls."""
POLICY_KEYS = {
    "system": "system_share",
    "history": "history_share",
    "input": "input_share",
    "reserve": "reserve_share",
}
_ADDRESS = re.compile(r"[^\s]+:[0-9]{1,5}")
_SIZE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _integer(
    env: Mapping[str, str], name: str, default: int, low: int, high: int, *, size: bool = False
) -> int:
    """A whole number; with `size`, bytes that may end in KiB, MiB or GiB."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    match = _SIZE.fullmatch(raw)
    if match is None or (match.group(2) and not size):
        unit = " (may end in KiB/MiB/GiB)" if size else ""
        raise ConfigError(f"{name}={raw!r}: must be a whole number{unit}")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r}: must be between {low} and {high}")
    return value


def _address(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    if not _ADDRESS.fullmatch(value):
        raise ConfigError(f"{name}={value!r}: must be host:port")
    return value


def _url(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip().rstrip("/")
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={value!r}: must be an http(s) URL, e.g. http://host:8000/v1")
    return value


def parse_policy(text: str, name: str = "CONTEXT_POLICY") -> AllocationPolicy:
    """`system=0.2,history=0.5,input=0.2,reserve=0.1`; missing keys keep their default."""
    shares: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or key not in POLICY_KEYS:
            raise ConfigError(f"{name}: {item!r} is not one of {', '.join(POLICY_KEYS)}=share")
        try:
            shares[POLICY_KEYS[key]] = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: {item!r}: the share must be a number") from None
    try:
        return AllocationPolicy(**shares)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class ContextSettings:
    listen: str
    ledger_target: str
    ledger_timeout_s: float
    summarizer_url: str
    summarizer_model: str
    summarizer_api_key: str
    summarizer_timeout_s: float
    policy: AllocationPolicy
    pool_bytes_max: int
    cache_entries_max: int
    count_workers: int
    log_format: str
    log_level: str
    trace_exporter: str
    shutdown_grace_s: float
    guards: Guards
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ledger_auth: ClientAuth = field(default_factory=ClientAuth)
    database_url: str = ""
    data_dir: Path = Path("var")
    output_hold: OutputHoldConfig = field(default_factory=OutputHoldConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ContextSettings:
        return cls(
            listen=_address(env, "TOKENLEDGER_CONTEXT_LISTEN", LISTEN_DEFAULT),
            ledger_target=_address(env, "TOKENLEDGER_LEDGER_TARGET", LEDGER_TARGET_DEFAULT),
            ledger_timeout_s=number(env, "TOKENLEDGER_LEDGER_TIMEOUT_S", 5.0, 0.05, 300),
            summarizer_url=_url(env, "CONTEXT_SUMMARIZER_URL"),
            summarizer_model=env.get("CONTEXT_SUMMARIZER_MODEL", "").strip()
            or SUMMARIZER_MODEL_DEFAULT,
            summarizer_api_key=env.get("CONTEXT_SUMMARIZER_API_KEY", "").strip(),
            summarizer_timeout_s=number(env, "CONTEXT_SUMMARIZER_TIMEOUT_S", 30.0, 0.1, 600),
            policy=parse_policy(env.get("CONTEXT_POLICY", "")),
            pool_bytes_max=_integer(
                env,
                "TOKENIZER_POOL_BYTES_MAX",
                POOL_MEMORY_BYTES_MAX_DEFAULT,
                1,
                64 * 2**30,
                size=True,
            ),
            cache_entries_max=_integer(
                env, "COUNT_CACHE_ENTRIES_MAX", COUNT_CACHE_ENTRIES_MAX_DEFAULT, 0, 10**8
            ),
            count_workers=_integer(env, "CONTEXT_COUNT_WORKERS", 4, 1, 256),
            log_format=choice(env, "TOKENLEDGER_LOG_FORMAT", "json", LOG_FORMATS),
            log_level=choice(
                env, "TOKENLEDGER_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            trace_exporter=choice(env, "TOKENLEDGER_TRACE_EXPORTER", "none", TRACE_EXPORTERS),
            shutdown_grace_s=number(env, "TOKENLEDGER_SHUTDOWN_GRACE_S", 10.0, 0, 600),
            guards=guards_from_env(env, DEADLINE_S_DEFAULT),
            metrics=MetricsSettings.from_env(env, "TOKENLEDGER_CONTEXT_METRICS_LISTEN"),
            auth=AuthSettings.from_env(env),
            ledger_auth=ClientAuth.from_env(env),
            database_url=env.get("DATABASE_URL", ""),
            data_dir=Path(env.get("TOKENLEDGER_DATA_DIR", "var")),
            output_hold=OutputHoldConfig(
                margin=number(env, "CONTEXT_OUTPUT_HOLD_MARGIN", output_hold_margin_default, 0, 10),
                stats_ttl_s=number(
                    env, "CONTEXT_OUTPUT_STATS_TTL_S", output_stats_ttl_s_default, 0, 300
                ),
            ),
        )
