"""The line per RPC (services/platform/observability.log_rpc): written straight out when JSON
lines are configured, it carries every field the structlog chain would give it."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from services.platform import observability


class _Stderr(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.buffer = io.BytesIO()


@pytest.fixture
def stderr() -> Iterator[_Stderr]:
    """Where configure_logging finds stderr: set in the test itself (pytest sets sys.stderr
    again between a fixture and the test)."""
    yield _Stderr()
    structlog.reset_defaults()
    observability._rpc_lines = None


def _configure(out: _Stderr, fmt: str, level: str) -> None:
    real, sys.stderr = sys.stderr, out
    try:
        observability.configure_logging(fmt, level)
    finally:
        sys.stderr = real


def _lines(out: _Stderr) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.buffer.getvalue().splitlines()]


def test_the_direct_line_has_the_fields_of_the_structlog_line(stderr: _Stderr) -> None:
    _configure(stderr, "json", "info")
    log = structlog.get_logger("tokenledger.rpc")
    token = observability.bind_call({"request_id": "r", "trace_id": "t" * 32, "rpc": "/s/M",
                                     "tenant_id": "acme"})  # fmt: skip
    observability.add_to_call(actor="key:k1")
    structlog.contextvars.bind_contextvars(extra="bound elsewhere")
    try:
        observability.log_rpc(log, logging.WARNING, {"status": "NOT_FOUND", "error": "gone"})
        log.warning("rpc", status="NOT_FOUND", error="gone")
    finally:
        observability.unbind_call(token)
        structlog.contextvars.clear_contextvars()
    direct, chained = _lines(stderr)
    assert direct.pop("timestamp").endswith("Z") and chained.pop("timestamp").endswith("Z")
    assert direct == chained == {
        "event": "rpc", "status": "NOT_FOUND", "error": "gone", "request_id": "r",
        "trace_id": "t" * 32, "rpc": "/s/M", "tenant_id": "acme", "actor": "key:k1",
        "extra": "bound elsewhere", "level": "warning",
    }  # fmt: skip


def test_the_direct_line_keeps_the_level_threshold_and_the_call_fields_end_with_the_call(
    stderr: _Stderr,
) -> None:
    _configure(stderr, "json", "warning")
    log = structlog.get_logger("tokenledger.rpc")
    token = observability.bind_call({"request_id": "r"})
    observability.log_rpc(log, logging.INFO, {"status": "OK"})
    observability.unbind_call(token)
    log.warning("later")
    assert _lines(stderr) == [{"event": "later", "level": "warning",
                               "timestamp": _lines(stderr)[0]["timestamp"]}]  # fmt: skip


def test_console_lines_go_through_structlog(stderr: _Stderr) -> None:
    _configure(stderr, "console", "info")
    assert observability._rpc_lines is None
    observability.log_rpc(structlog.get_logger("x"), logging.INFO, {"status": "OK"})
    assert "rpc" in stderr.getvalue() and "status=OK" in stderr.getvalue()
