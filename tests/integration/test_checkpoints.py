"""Audit checkpoints (migration 0010, ledger/postgres/checkpoints.py): a checkpoint is taken
only over a log that verifies, chained to the previous one; a verification from it reads only
what was appended since and reports what a full one does about that; a full verification
checks every checkpoint; each kind of tampering is found by the mode that should find it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import psycopg
import pytest

from ledger import codec
from ledger.checkpoints import Checkpoint
from ledger.errors import CheckpointRefused
from ledger.postgres.audit import LedgerAudit
from ledger.reads import Scope, VerifyReport
from services.platform import db
from tests.support import ServerThread, cycle, new_id, verify_tenant

USERS = [f"u{n}" for n in range(12)]


def audit_call(url: str, workers: int, method: str, *args: Any, **kwargs: Any) -> Any:
    async def run() -> Any:
        async with db.make_pool(url, 2) as pool:
            with closing(LedgerAudit(pool, workers=workers)) as audit:
                return await getattr(audit, method)(*args, **kwargs)

    return asyncio.run(run())


def take(url: str, tenant: str, workers: int = 1) -> tuple[VerifyReport, Checkpoint | None]:
    result: tuple[VerifyReport, Checkpoint | None] = audit_call(url, workers, "checkpoint", tenant)
    return result


def since(url: str, tenant: str, workers: int = 1) -> VerifyReport:
    report: VerifyReport = audit_call(url, workers, "verify", Scope(tenant), from_checkpoint=True)
    return report


def traffic(ledger: ServerThread, tenant: str, round_: int) -> None:
    with ledger.stub() as stub:
        for n, user in enumerate(USERS):
            cycle(stub, tenant, user, f"c{n % 3}", 100 + n + round_, 50 + n)
        cycle(stub, tenant, "ann", "c1", 301, 200)  # a stream the busy tenant has too


def rows(url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def checkpoint_count(url: str) -> int:
    return int(rows(url, "SELECT count(*) FROM audit_checkpoints")[0][0]) + int(
        rows(url, "SELECT count(*) FROM audit_checkpoint_rows")[0][0]
    )


@pytest.fixture
def tenant(ledger: ServerThread, busy_tenant: str) -> Iterator[str]:
    traffic(ledger, busy_tenant, 0)
    yield busy_tenant


def clean(report: VerifyReport) -> bool:
    return not report.breaks and not report.differences


def test_checkpoints_chain_and_verification_from_one_reads_only_what_came_after(
    database_url: str, ledger: ServerThread, tenant: str
) -> None:
    total = int(
        rows(database_url, "SELECT count(*) FROM events WHERE tenant_id = %s", tenant)[0][0]
    )
    report, first = take(database_url, tenant, workers=3)
    assert clean(report) and first is not None
    assert (first.seq, first.events, first.prev_hash) == (1, total, codec.GENESIS_HASH)
    assert first.state["account"].rows > len(USERS) and first.state["stream"].rows > len(USERS)
    assert first.delta_rows == sum(d.rows for d in first.state.values())

    traffic(ledger, tenant, 1)
    appended = int(rows(database_url, "SELECT count(*) FROM events WHERE tenant_id = %s "
                        "AND position > %s", tenant, first.position)[0][0])  # fmt: skip
    assert appended > len(USERS)
    one, three = since(database_url, tenant, 1), since(database_url, tenant, 3)
    assert clean(one) and one == three
    assert (one.events_checked, one.from_checkpoint, one.from_position) == (
        appended, 1, first.position,
    )  # fmt: skip

    report, second = take(database_url, tenant)
    assert clean(report) and second is not None
    assert (second.seq, second.prev_hash, second.events) == (2, first.hash, total + appended)
    # Its own rows are what changed: fewer than the whole state, and the digest followed.
    assert 0 < second.delta_rows < sum(d.rows for d in second.state.values())
    full = verify_tenant(database_url, tenant, workers=3)
    assert clean(full) and full.checkpoints_checked == 2
    assert full.events_checked == total + appended


def test_a_checkpoint_is_refused_with_nothing_written(
    database_url: str, ledger: ServerThread, tenant: str
) -> None:
    before = checkpoint_count(database_url)
    with pytest.raises(CheckpointRefused, match="has no events"):
        take(database_url, new_id("nobody"))
    with pytest.raises(CheckpointRefused, match="no checkpoint yet"):
        since(database_url, tenant)
    with pytest.raises(CheckpointRefused, match="whole tenant"):
        audit_call(database_url, 1, "verify", Scope(tenant, "ann"), from_checkpoint=True)
    # A log that does not verify gets no checkpoint: the report says why.
    with psycopg.connect(database_url) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE accounts SET held = held + 1 WHERE tenant_id = %s AND user_id = 'u1' "
                     "AND conversation_id = ''", (tenant,))  # fmt: skip
    report, made = take(database_url, tenant)
    assert made is None and [d.key for d in report.differences] == [f"{tenant}/u1"]
    assert checkpoint_count(database_url) == before
    with psycopg.connect(database_url) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE accounts SET held = held - 1 WHERE tenant_id = %s AND user_id = 'u1' "
                     "AND conversation_id = ''", (tenant,))  # fmt: skip
    assert take(database_url, tenant)[1] is not None
    after = checkpoint_count(database_url)
    with pytest.raises(CheckpointRefused, match=r"no event of tenant .* since checkpoint 1"):
        take(database_url, tenant)
    assert checkpoint_count(database_url) == after


def test_checkpoints_cannot_be_changed_even_by_their_owner(database_url: str, tenant: str) -> None:
    assert take(database_url, tenant)[1] is not None
    for sql in (
        "UPDATE audit_checkpoints SET events = events + 1 WHERE tenant_id = %s",
        "DELETE FROM audit_checkpoint_rows WHERE tenant_id = %s",
        "TRUNCATE audit_checkpoints CASCADE",
    ):
        with (
            psycopg.connect(database_url) as conn,
            pytest.raises(psycopg.errors.RestrictViolation, match="append-only"),
        ):
            conn.execute(sql, (tenant,) if "%s" in sql else ())
