"""`make run` on a machine without DATABASE_URL: embedded PostgreSQL, migrations, the ledger and
the context service on loopback; `tokenledger demo` succeeds against the ledger, the context
service prepares a conversation through it, and SIGTERM stops both gracefully."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from tests.support import TOKENLEDGER, free_port, wait_health

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120


def test_make_run_serves_with_embedded_postgres_and_demo_succeeds(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    context_target = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {
        "TOKENLEDGER_LISTEN": target,
        "TOKENLEDGER_CONTEXT_LISTEN": context_target,
        "TOKENLEDGER_LEDGER_TARGET": target,
        "TOKENLEDGER_DATA_DIR": str(tmp_path / "var"),
        "TOKENLEDGER_LOG_FORMAT": "json",
        "TOKENLEDGER_TRACE_EXPORTER": "none",
    }
    server = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_health(target, health_pb2.HealthCheckResponse.SERVING, STARTUP_TIMEOUT_S)
        demo = subprocess.run(
            [str(TOKENLEDGER), "demo", "--target", target],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "-> RESOURCE_EXHAUSTED: requested 50000 tokens" in demo.stdout
        wait_health(context_target, health_pb2.HealthCheckResponse.SERVING, STARTUP_TIMEOUT_S)
        with grpc.insecure_channel(context_target) as channel:
            prepared = cpb_grpc.ContextServiceStub(channel).PrepareContext(
                cpb.PrepareContextRequest(
                    idempotency_key="make-run-1", tenant_id="demo", user_id="carol",
                    model="gpt-4o", max_output_tokens=256,
                    messages=[cpb.ChatMessage(role=cpb.CHAT_ROLE_USER, content="Hello there")],
                ),
                timeout=60,
            )  # fmt: skip
        assert prepared.reservation_id and len(prepared.messages) == 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output, _ = server.communicate(timeout=60)

    assert (tmp_path / "var" / "pg" / "PG_VERSION").exists(), "not the embedded database"
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events.count("shutting down") == 2 and events[-1] == "stopped", output
    assert events.count("stopped") == 2, output
    reserves = [line for line in lines if line.get("rpc", "").endswith("/Reserve")]
    assert {line["status"] for line in reserves} == {"OK", "RESOURCE_EXHAUSTED"}
    for line in reserves:
        assert line["tenant_id"] == "demo"
        assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
        assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"])
        assert line["duration_ms"] >= 0 and line["level"] in ("info", "warning")
