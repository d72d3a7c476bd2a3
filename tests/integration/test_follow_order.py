"""The gap-free follower (SubscribeEvents, `export nats`) hands events on in transaction-id
order. Its rows carry the id as text, so that order must be the column's, not the text's:
by the text, 1000 comes before 999. A fresh cluster (make test's embedded PostgreSQL) crosses
such a boundary within minutes; here the ids of three committed transactions are set by hand
(triggers off for that session) to straddle the largest power of ten below today's ids."""

from __future__ import annotations

import asyncio

import psycopg

from ledger import validation
from ledger.application import Ledger
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.store import PostgresStore
from services.platform import db
from tests.support import new_id


def _straddling(conn: psycopg.Connection[tuple[int]]) -> tuple[int, int, int]:
    """Three ids around a power of ten, all older than any transaction still to come."""
    (now,) = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone() or (0,)
    ten = 10 ** (len(str(now)) - 1)
    ten = ten if ten + 1 < now else ten // 10
    return (ten - 1, ten, ten + 1)


def _reserve(tenant: str, user: str) -> validation.Reserve:
    return validation.reserve(
        idempotency_key=new_id("k"), tenant_id=tenant, user_id=user, conversation_id="",
        model="m", amount=1, ttl_seconds=60, labels={},
    )  # fmt: skip


async def _followed(url: str, tenant: str) -> tuple[tuple[int, int, int], list[tuple[int, str]]]:
    async with db.make_pool(url, 2) as pool:
        ledger = Ledger(PostgresStore(pool))
        for user in ("a", "b", "c"):  # one transaction each
            await ledger.reserve(_reserve(tenant, user))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")  # the append-only rule off
            rows = conn.execute(
                "SELECT user_id FROM events WHERE tenant_id = %s ORDER BY position", (tenant,)
            ).fetchall()
            xids = _straddling(conn)
            for (user,), xid in zip(rows, xids, strict=True):
                conn.execute(
                    "UPDATE events SET xid = %s::text::xid8 WHERE tenant_id = %s AND user_id = %s",
                    (str(xid), tenant, user),
                )
        audit = LedgerAudit(pool)
        stop, seen = asyncio.Event(), []
        try:
            async for event in audit.follow(tenant, (0, 0), 0, stop):
                seen.append((event.transaction_id, event.key.user_id))
                if len(seen) == len(xids):
                    stop.set()
        finally:
            audit.close()
        return xids, seen


def test_the_follower_orders_by_transaction_id_not_by_its_text(database_url: str) -> None:
    xids, seen = asyncio.run(_followed(database_url, new_id("t")))
    assert seen == list(zip(xids, ("a", "b", "c"), strict=True))
