"""Operators' corrections in the usage projection: an AdjustBalance is counted (signed, apart
from tokens used) where finance reads usage, and migration 0006 counts the adjustments an
older log already holds exactly as the live projection would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from psycopg.rows import dict_row

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.platform import db
from tests.support import ServerThread, cycle, new_id, scratch_database, stamp, verify_tenant


def by_user(ledger: ServerThread, tenant: str) -> dict[str, pb.UsageRow]:
    now = datetime.now(UTC)
    query = pb.UsageQuery(
        tenant_id=tenant,
        from_time=stamp(now - timedelta(days=1)),
        to_time=stamp(now + timedelta(hours=1)),
        group_by=[pb.USAGE_DIMENSION_USER],
    )
    with ledger.stub() as stub:
        rows = stub.QueryUsage(pb.QueryUsageRequest(query=query)).rows
    return {r.user_id: r for r in rows}


def adjust(ledger: ServerThread, tenant: str, user: str, tokens: int) -> None:
    with ledger.stub() as stub:
        stub.AdjustBalance(
            pb.AdjustBalanceRequest(
                idempotency_key=new_id("a"),
                tenant_id=tenant,
                user_id=user,
                tokens=tokens,
                reason="refund for a failed call",
            )
        )


def test_an_adjustment_is_counted_apart_from_tokens_used(
    ledger: ServerThread, busy_tenant: str, database_url: str
) -> None:
    adjust(ledger, busy_tenant, "bob", 120)
    rows = by_user(ledger, busy_tenant)
    assert (rows["ann"].adjusted_tokens, rows["ann"].adjustments) == (-50, 1)
    assert (rows["bob"].adjusted_tokens, rows["bob"].adjustments) == (120, 1)
    # total_tokens stays what models used: ann's two commits (200 + 1, 400 + 1)
    assert rows["ann"].total_tokens == 602
    report = verify_tenant(database_url, busy_tenant)
    assert not report.breaks and not report.differences


def usage_rows(url: str, tenant: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        cur = conn.execute(
            "SELECT * FROM usage_hourly WHERE tenant_id = %s ORDER BY user_id, conversation_id",
            (tenant,),
        )
        return cur.fetchall()


def test_migration_0006_counts_the_adjustments_already_in_the_log(tmp_path: Path) -> None:
    tenant = new_id("t")
    with scratch_database(tmp_path) as url:
        server = ServerThread(url).start()
        try:
            with server.stub() as stub:
                cycle(stub, tenant, "ann", "c1", 300, 200)
            adjust(server, tenant, "ann", -30)  # ann's own row also counts usage
            adjust(server, tenant, "ann", -5)
            adjust(server, tenant, "zed", 70)  # zed's row holds nothing else
        finally:
            server.stop()
        live = usage_rows(url, tenant)
        adjusted = [(r["user_id"], r["adjusted_tokens"], r["adjustments"]) for r in live]
        assert [a for a in adjusted if a[2]] == [("ann", -35, 2), ("zed", 70, 1)]

        config = db._config(url)
        command.downgrade(config, "0005")
        assert [r["user_id"] for r in usage_rows(url, tenant)] == ["ann"]  # zed's row went
        command.upgrade(config, "head")
        assert usage_rows(url, tenant) == live
        report = verify_tenant(url, tenant)
        assert not report.breaks and not report.differences
