"""Process settings from the environment: defaults, and a clear error for each bad value."""

from __future__ import annotations

import pytest

from services.ledger.config import Settings
from services.platform.config import ConfigError


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.listen == "127.0.0.1:50051" and settings.cheaper_models == {}


def test_cheaper_models_are_read_as_pairs() -> None:
    env = {"TOKENLEDGER_CHEAPER_MODELS": " gpt-4o = gpt-4o-mini, claude-opus-4=claude-haiku-4 ,"}
    assert Settings.from_env(env).cheaper_models == {
        "gpt-4o": "gpt-4o-mini",
        "claude-opus-4": "claude-haiku-4",
    }


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("TOKENLEDGER_CHEAPER_MODELS", "gpt-4o", "not model=cheaper_model"),
        ("TOKENLEDGER_CHEAPER_MODELS", "=gpt-4o-mini", "not model=cheaper_model"),
        ("TOKENLEDGER_CHEAPER_MODELS", "gpt-4o=", "not model=cheaper_model"),
        ("TOKENLEDGER_LOG_FORMAT", "xml", "must be one of"),
        ("TOKENLEDGER_SWEEP_INTERVAL_S", "soon", "must be a number"),
        ("TOKENLEDGER_SWEEP_INTERVAL_S", "0", "must be between"),
        ("TOKENLEDGER_AUDIT_WORKERS", "0", "must be between"),
        ("TOKENLEDGER_AUDIT_WORKERS", "many", "must be a number"),
        ("TOKENLEDGER_IDEMPOTENCY_RETENTION_S", "3600", "must be between"),
        ("TOKENLEDGER_IDEMPOTENCY_RETENTION_S", "week", "must be a number"),
        ("TOKENLEDGER_ALERT_WEBHOOK_URL", "ftp://example.test/x", "not an http:// or https://"),
        ("TOKENLEDGER_ALERT_WEBHOOK_URL", "http://", "not an http:// or https://"),
        ("TOKENLEDGER_CHECKPOINT_EVERY_EVENTS", "-1", "must be between"),
        ("TOKENLEDGER_CHECKPOINT_EVERY_EVENTS", "often", "must be a number"),
        ("TOKENLEDGER_CHECKPOINT_EVERY_HOURS", "-2", "must be between"),
        ("TOKENLEDGER_CHECKPOINT_EVERY_HOURS", "daily", "must be a number"),
        ("TOKENLEDGER_CHECKPOINT_CHECK_S", "0", "must be between"),
    ],
)
def test_bad_setting_is_a_config_error_naming_it(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        Settings.from_env({name: value})
    assert says in str(info.value)
