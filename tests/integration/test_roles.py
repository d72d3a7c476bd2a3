"""The database role the service runs as can append events but never change or remove them;
the ledger works with nothing more; the reader role can only read."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from grpc_health.v1 import health_pb2
from psycopg import errors as pg_errors

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from tests.support import (
    TOKENLEDGER,
    LedgerProcess,
    ServerThread,
    cycle,
    free_port,
    new_id,
    wait_health,
)


@pytest.fixture
def login_role(database_url: str) -> Iterator[str]:
    """A login role in tokenledger_app (trust authentication needs no password here)."""
    name = f"tl_svc_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN IN ROLE tokenledger_app")
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"DROP ROLE {name}")


def as_role(url: str, role: str) -> str:
    return psycopg.conninfo.make_conninfo(url, user=role)


def test_the_ledger_runs_as_the_app_role_which_cannot_change_the_log(
    database_url: str, login_role: str
) -> None:
    url = as_role(database_url, login_role)
    ledger = ServerThread(url).start()
    try:
        with ledger.stub() as stub:
            tenant = new_id("t")
            stub.SetQuota(
                pb.SetQuotaRequest(
                    idempotency_key=new_id("q"), tenant_id=tenant, limit=1_000,
                    period=pb.PERIOD_DAY,
                )
            )  # fmt: skip
            cycle(stub, tenant, "u", "c", 100, 60)
    finally:
        ledger.stop()
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tenant,))
        assert rows.fetchone() == (3,)
        for statement in (
            "UPDATE events SET amount = 0 WHERE tenant_id = %s",
            "DELETE FROM events WHERE tenant_id = %s",
            "DELETE FROM idempotency_keys WHERE tenant_id = %s",
        ):
            with pytest.raises(pg_errors.InsufficientPrivilege):
                conn.execute(statement, (tenant,))
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("TRUNCATE events")


def test_the_reader_role_reads_and_writes_nothing(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SET ROLE tokenledger_reader")
        conn.execute("SELECT count(*) FROM events").fetchone()
        conn.execute("SELECT count(*) FROM usage_hourly").fetchone()
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO accounts (tenant_id, user_id, conversation_id) VALUES ('x', '', '')"
            )


def test_serve_as_the_app_role_checks_the_schema_instead_of_migrating(
    database_url: str, login_role: str, tmp_path: Path
) -> None:
    """With TOKENLEDGER_MIGRATE_ON_START=false the service role (which may not run DDL) only
    checks the schema revision, and serves."""
    ledger = LedgerProcess(
        as_role(database_url, login_role), tmp_path / "ledger.log",
        TOKENLEDGER_MIGRATE_ON_START="false",
    )  # fmt: skip
    ledger.start()
    try:
        wait_health(ledger.target, health_pb2.HealthCheckResponse.SERVING, 60)
    finally:
        ledger.stop()


def test_serve_refuses_a_database_at_another_schema_revision(database_url: str) -> None:
    name = f"tl_unmigrated_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        env = os.environ | {
            "DATABASE_URL": psycopg.conninfo.make_conninfo(database_url, dbname=name),
            "TOKENLEDGER_MIGRATE_ON_START": "false",
            "TOKENLEDGER_LISTEN": f"127.0.0.1:{free_port()}",
        }
        run = subprocess.run(
            [str(TOKENLEDGER), "serve"], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    assert run.returncode == 2
    assert "schema revision none" in run.stderr and "tokenledger migrate" in run.stderr


def test_the_app_role_prunes_expired_keys_only_through_the_function(
    database_url: str, login_role: str
) -> None:
    """It may not DELETE keys; prune_idempotency_keys deletes those created before a time."""
    tenant = new_id("t")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO idempotency_keys (tenant_id, idempotency_key, operation, request, "
            "response, created_at) VALUES (%s, 'old', 'Reserve', '{}', '{}', now() - "
            "interval '9 days'), (%s, 'new', 'Reserve', '{}', '{}', now())",
            (tenant, tenant),
        )
    with psycopg.connect(as_role(database_url, login_role), autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("DELETE FROM idempotency_keys WHERE tenant_id = %s", (tenant,))
        pruned = conn.execute(
            "SELECT prune_idempotency_keys(now() - interval '8 days', 1000)"
        ).fetchone()
        left = conn.execute(
            "SELECT idempotency_key FROM idempotency_keys WHERE tenant_id = %s", (tenant,)
        ).fetchall()
    assert pruned is not None and pruned[0] >= 1
    assert left == [("new",)]


def test_the_app_role_takes_checkpoints_but_cannot_change_them(
    database_url: str, login_role: str, busy_tenant: str
) -> None:
    """The service may take a checkpoint (TOKENLEDGER_CHECKPOINT_EVERY_EVENTS) and read them;
    changing or removing one is refused to it by privilege, to everyone by the trigger."""
    import asyncio
    from contextlib import closing

    from ledger.postgres.audit import LedgerAudit
    from services.platform import db

    url = as_role(database_url, login_role)

    async def take() -> object:
        async with db.make_pool(url, 2) as pool:
            with closing(LedgerAudit(pool, workers=1)) as audit:
                return (await audit.checkpoint(busy_tenant))[1]

    assert asyncio.run(take()) is not None
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in (
            "UPDATE audit_checkpoints SET events = 0 WHERE tenant_id = %s",
            "DELETE FROM audit_checkpoints WHERE tenant_id = %s",
            "UPDATE audit_checkpoint_rows SET value = '' WHERE tenant_id = %s",
            "DELETE FROM audit_checkpoint_rows WHERE tenant_id = %s",
        ):
            with pytest.raises(pg_errors.InsufficientPrivilege):
                conn.execute(statement, (busy_tenant,))
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("TRUNCATE audit_checkpoint_rows")
        row = conn.execute("SELECT count(*) FROM audit_checkpoints WHERE tenant_id = %s",
                           (busy_tenant,)).fetchone()  # fmt: skip
        assert row == (1,)
