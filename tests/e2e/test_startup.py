"""Start-up a newcomer can read: a service that cannot start says why in one line naming the
setting to change (exit code 2, no traceback); `tokenledger run` (`make run`) stops as a
whole; the context service is ready only while its ledger serves, and stays live."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from grpc_health.v1 import health_pb2

from services.context.server import SERVICE_NAME
from services.platform.serve import LIVENESS
from tests.support import (
    TOKENLEDGER,
    ContextServerThread,
    ServerThread,
    free_port,
    health_status,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT_S = 60


@pytest.fixture
def taken() -> Iterator[str]:
    """An address another process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def tokenledger(
    command: str, timeout_s: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOKENLEDGER), command],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ | {"TOKENLEDGER_LOG_FORMAT": "json"} | env,
    )


@pytest.mark.parametrize(
    ("command", "setting", "what"),
    [
        ("serve", "TOKENLEDGER_LISTEN", "ledger"),
        ("context-serve", "TOKENLEDGER_CONTEXT_LISTEN", "context service"),
    ],
)
def test_a_service_on_a_taken_port_says_so_in_one_line_and_exits_2(
    command: str, setting: str, what: str, taken: str, database_url: str
) -> None:
    ran = tokenledger(command, DATABASE_URL=database_url, **{setting: taken})
    assert ran.returncode == 2
    assert ran.stderr == (
        f"tokenledger {command}: {what}: {taken} is taken; set {setting} to a free host:port\n"
    )


def test_the_ledger_without_its_database_says_so_in_one_line(taken: str) -> None:
    ran = tokenledger(
        "serve",
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing",
        TOKENLEDGER_LISTEN=f"127.0.0.1:{free_port()}",
    )
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1, ran.stderr
    assert ran.stderr.startswith("tokenledger serve: ledger: cannot reach the database (")
    assert ran.stderr.endswith("; check DATABASE_URL\n") and "Traceback" not in ran.stderr


def test_run_refuses_a_taken_port_before_starting_anything(taken: str, database_url: str) -> None:
    started = time.monotonic()
    ran = tokenledger(
        "run",
        DATABASE_URL=database_url,
        TOKENLEDGER_LISTEN=f"127.0.0.1:{free_port()}",
        TOKENLEDGER_CONTEXT_LISTEN=taken,
    )
    assert time.monotonic() - started < 10  # no service started: no database, no tokenizers
    assert ran.returncode == 2 and ran.stdout == ""
    assert ran.stderr == (
        f"tokenledger run: context service: {taken} is taken; set TOKENLEDGER_CONTEXT_LISTEN "
        "to a free host:port\n"
    )


@pytest.fixture
def unmigrated_url(database_url: str) -> Iterator[str]:
    """An empty database beside the test run's: no schema."""
    name = f"tokenledger_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield psycopg.conninfo.make_conninfo(database_url, dbname=name)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_run_stops_the_context_service_when_the_ledger_cannot_start(unmigrated_url: str) -> None:
    """Both start; the ledger then refuses a database at another schema revision (exit 2,
    one line): `run` stops the context service gracefully and exits 2, adding nothing."""
    context = f"127.0.0.1:{free_port()}"
    ran = tokenledger(
        "run",
        timeout_s=90,
        DATABASE_URL=unmigrated_url,
        TOKENLEDGER_MIGRATE_ON_START="false",
        TOKENLEDGER_LISTEN=f"127.0.0.1:{free_port()}",
        TOKENLEDGER_CONTEXT_LISTEN=context,
    )
    assert ran.returncode == 2
    failures = [line for line in ran.stderr.splitlines() if not line.startswith("{")]
    assert len(failures) == 1, ran.stderr
    assert failures[0].startswith("tokenledger serve: ledger: the database is at schema revision")
    assert failures[0].endswith("run `tokenledger migrate` as the schema owner first")
    # A context service that got to serve stops gracefully; one still loading its tokenizers
    # when the ledger failed (a loaded machine) is ended by the same SIGTERM before it serves.
    if '"event":"serving"' in ran.stderr:
        assert '"event":"stopped"' in ran.stderr
    with socket.socket() as probe:  # nothing is left listening either way
        assert probe.connect_ex(("127.0.0.1", int(context.rsplit(":", 1)[1]))) != 0


def _wait(target: str, service: str, status: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while health_status(target, service) != status:
        assert time.monotonic() < deadline, f"{service or '(server)'} never became {status}"
        time.sleep(0.05)


def test_context_readiness_follows_its_ledger_while_liveness_stays_serving(
    database_url: str,
) -> None:
    ledger_address = f"127.0.0.1:{free_port()}"
    context = ContextServerThread(ledger_address, ledger_check_s=0.1).start()
    try:
        for service in ("", SERVICE_NAME):
            assert health_status(context.target, service) == NOT_SERVING  # no ledger yet
        assert health_status(context.target, LIVENESS) == SERVING
        ledger = ServerThread(database_url, listen=ledger_address).start()
        _wait(context.target, "", SERVING)
        assert health_status(context.target, SERVICE_NAME) == SERVING
        ledger.stop()
        _wait(context.target, "", NOT_SERVING)
        assert health_status(context.target, SERVICE_NAME) == NOT_SERVING
        assert health_status(context.target, LIVENESS) == SERVING
        ledger = ServerThread(database_url, listen=ledger_address).start()
        _wait(context.target, "", SERVING)
        ledger.stop()
    finally:
        context.stop()
