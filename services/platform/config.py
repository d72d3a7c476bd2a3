"""Settings both processes parse alike from environment variables (see README,
"Configuration"): auth, metrics, guards, and the helpers that read and check a value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.platform.guards import (
    Guards,
    caller_calls_max_default,
    deadline_s_default,
    stream_deadline_s_default,
)
from services.platform.metrics import METRICS_EXPORTERS, exporter_parts, split_listen


class ConfigError(ValueError):
    """A setting has a value the process cannot use."""


def choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, default).strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return value


def number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r}: must be between {low} and {high}")
    return value


AUTH_MODES = ("off", "api_key", "mtls", "mtls+api_key")


@dataclass(frozen=True)
class AuthSettings:
    """How callers authenticate (README, "Security"). `off` is for a local `make run` only."""

    mode: str = "off"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @property
    def client_certs(self) -> bool:
        """Whether the server requires and verifies client certificates."""
        return self.mode in ("mtls", "mtls+api_key")

    @property
    def api_keys(self) -> bool:
        """Whether a bearer API key carries the caller's tenant and roles."""
        return self.mode in ("api_key", "mtls+api_key")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AuthSettings:
        mode = choice(env, "TOKENLEDGER_AUTH", "off", AUTH_MODES)
        cert, key, ca = (
            _file(env, f"TOKENLEDGER_TLS_{name}") for name in ("CERT", "KEY", "CLIENT_CA")
        )
        if (cert is None) != (key is None):
            raise ConfigError("TOKENLEDGER_TLS_CERT and TOKENLEDGER_TLS_KEY go together")
        needs_certs = mode in ("mtls", "mtls+api_key")
        if needs_certs and (cert is None or ca is None):
            raise ConfigError(
                f"TOKENLEDGER_AUTH={mode} needs TOKENLEDGER_TLS_CERT, TOKENLEDGER_TLS_KEY and "
                "TOKENLEDGER_TLS_CLIENT_CA"
            )
        if ca is not None and not needs_certs:
            raise ConfigError(
                "TOKENLEDGER_TLS_CLIENT_CA requires client certificates: set "
                "TOKENLEDGER_AUTH=mtls or mtls+api_key"
            )
        return cls(mode, cert, key, ca)


@dataclass(frozen=True)
class MetricsSettings:
    """Where metrics go (README, "Metrics"): a Prometheus endpoint on `listen`, OTLP, both or
    neither. Setting only the address means Prometheus."""

    exporter: str = "none"
    listen: str = ""

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], listen_name: str = "TOKENLEDGER_METRICS_LISTEN"
    ) -> MetricsSettings:
        listen = env.get(listen_name, "").strip()
        if listen:
            try:
                split_listen(listen)
            except ValueError:
                raise ConfigError(f"{listen_name}={listen!r}: must be host:port") from None
        default = "prometheus" if listen else "none"
        name = "TOKENLEDGER_METRICS_EXPORTER"
        exporter = choice(env, name, default, METRICS_EXPORTERS)
        prometheus = "prometheus" in exporter_parts(exporter)
        if prometheus and not listen:
            raise ConfigError(f"{name}={exporter}: set {listen_name} (host:port) for /metrics")
        if listen and not prometheus:
            raise ConfigError(f"{listen_name} is set but {name}={exporter} serves no /metrics")
        return cls(exporter, listen)


def _file(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{name}={raw!r}: no such file")
    return path


def guards_from_env(env: Mapping[str, str], deadline_s: float = deadline_s_default) -> Guards:
    """Default deadlines and the per-caller cap (services/platform/guards.py); both services
    read the same variables, each with its own unary default."""
    return Guards(
        deadline_s=number(env, "TOKENLEDGER_DEFAULT_DEADLINE_S", deadline_s, 0.01, 86_400),
        stream_deadline_s=number(
            env, "TOKENLEDGER_STREAM_DEADLINE_S", stream_deadline_s_default, 0.01, 7 * 86_400
        ),
        caller_calls_max=int(
            number(
                env, "TOKENLEDGER_CALLER_CONCURRENCY_MAX", caller_calls_max_default, 0, 1_000_000
            )
        ),
    )
