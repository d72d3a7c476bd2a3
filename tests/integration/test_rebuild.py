"""`Ledger.rebuild`: the projections of a tenant rewritten from its log equal what the
ledger kept live, repair edited or deleted projection rows, touch no other tenant, and leave
the log and the idempotency records as they were."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from ledger.application import Ledger
from ledger.model import AccountKey, Commit, Period, Reserve, SetQuota, Usage
from ledger.postgres.store import PostgresStore
from ledger.reads import RebuildReport
from services.platform import db
from tests.support import ServerThread, cycle, new_id, verify_tenant

TABLES = ("accounts", "reservations", "usage_hourly", "rate_limits", "idempotency_keys")


def rebuild(url: str, tenant: str) -> RebuildReport:
    async def run() -> RebuildReport:
        async with db.make_pool(url, 2) as pool:
            return await Ledger(PostgresStore(pool)).rebuild(tenant)

    return asyncio.run(run())


def snapshot(url: str, tenant: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every projection row of the tenant, without bookkeeping times."""
    out = {}
    with psycopg.connect(url) as conn:
        for table in TABLES:
            rows = conn.execute(
                f"SELECT * FROM {table} WHERE tenant_id = %s",  # noqa: S608 (constant names)
                (tenant,),
            )
            names = [c.name for c in rows.description or ()]
            keep = [i for i, n in enumerate(names) if n not in ("updated_at", "created_at")]
            out[table] = sorted(tuple(row[i] for i in keep) for row in rows.fetchall())
    return out


def test_rebuild_of_intact_projections_changes_nothing(database_url: str, busy_tenant: str) -> None:
    before = snapshot(database_url, busy_tenant)
    report = rebuild(database_url, busy_tenant)
    assert report.events > 10 and report.reservations == 4 and report.rate_limits == 1
    assert report.events_under_lock == 0  # nothing was written meanwhile
    assert snapshot(database_url, busy_tenant) == before


def test_rebuild_repairs_edited_and_deleted_projection_rows(
    database_url: str, busy_tenant: str, ledger: ServerThread
) -> None:
    other = new_id("t")
    with ledger.stub() as stub:
        cycle(stub, other, "zed", "", 10, 5)
    before, other_before = snapshot(database_url, busy_tenant), snapshot(database_url, other)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE accounts SET used_total = 0, grants = '[]' WHERE tenant_id = %s",
                     (busy_tenant,))  # fmt: skip
        conn.execute("DELETE FROM reservations WHERE tenant_id = %s AND state = 'committed'",
                     (busy_tenant,))  # fmt: skip
        conn.execute("UPDATE usage_hourly SET commits = 99 WHERE tenant_id = %s", (busy_tenant,))
        conn.execute("DELETE FROM rate_limits WHERE tenant_id = %s", (busy_tenant,))
    assert verify_tenant(database_url, busy_tenant).differences
    rebuild(database_url, busy_tenant)
    assert snapshot(database_url, busy_tenant) == before
    assert snapshot(database_url, other) == other_before
    report = verify_tenant(database_url, busy_tenant)
    assert not report.breaks and not report.differences


def test_writes_during_a_rebuild_wait_and_land(database_url: str) -> None:
    """A rebuild holds the tenant's row lock; a Reserve and Commit started meanwhile wait and
    then apply on the rebuilt rows, so the log still explains every projection."""
    tenant = new_id("t")
    key = AccountKey(tenant, "u")

    async def run() -> None:
        async with db.make_pool(database_url, 4) as pool:
            store = Ledger(PostgresStore(pool))
            await store.set_quota(SetQuota(new_id("q"), AccountKey(tenant), 10_000, Period.DAY))
            writes = []
            for i in range(20):
                r = await store.reserve(Reserve(new_id("r"), key, "gpt-4o", 100 + i, 60))
                writes.append(
                    store.commit(Commit(tenant, r.reservation.reservation_id, Usage(50, 10, 0)))
                )
            await asyncio.gather(store.rebuild(tenant), *writes)

    asyncio.run(run())
    report = verify_tenant(database_url, tenant)
    assert not report.breaks and not report.differences


def test_what_is_appended_while_the_log_is_folded_is_folded_under_the_lock(
    database_url: str,
) -> None:
    """The first fold holds no lock. A Reserve that commits after it read the log and before
    the rebuild takes the tenant's lock is folded in then: nothing is lost, nothing doubled.
    Order is forced with the tenant's row lock, held here by hand: the Reserve queues on it
    first, the rebuild's second step second, and row-lock waiters are served in turn."""
    tenant = new_id("t")
    key = AccountKey(tenant, "u", "c")

    async def waiting(conn: psycopg.AsyncConnection[Any], count: int) -> None:
        """Until `count` backends of this database wait for a lock (the second waits for the
        first, which waits for the holder)."""
        for _ in range(1000):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND cardinality(pg_blocking_pids(pid)) > 0"
            )
            row = await cur.fetchone()
            if row and row[0] >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"fewer than {count} waited for the lock")

    async def run() -> RebuildReport:
        async with db.make_pool(database_url, 4) as pool:
            store = Ledger(PostgresStore(pool))
            await store.set_quota(SetQuota(new_id("q"), AccountKey(tenant), 10_000, Period.DAY))
            await store.reserve(Reserve(new_id("r"), key, "gpt-4o", 100, 60))
            connect = psycopg.AsyncConnection.connect
            async with (
                await connect(database_url) as lock,
                await connect(database_url, autocommit=True) as watch,
            ):
                await lock.execute(
                    "SELECT 1 FROM accounts WHERE tenant_id = %s AND user_id = '' "
                    "AND conversation_id = '' FOR UPDATE",
                    (tenant,),
                )
                late = asyncio.ensure_future(
                    store.reserve(Reserve(new_id("r"), key, "gpt-4o", 200, 60))
                )
                await waiting(watch, 1)
                rebuilt = asyncio.ensure_future(store.rebuild(tenant))
                await waiting(watch, 2)  # the fold is done; the rebuild awaits the lock
                await lock.rollback()
                await late
                return await rebuilt

    folded = asyncio.run(run())
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tenant,)).fetchone()
    assert row is not None and folded.events == row[0] == 3  # the quota, and both holds
    assert folded.events_under_lock == 1  # the late hold: the rest was folded without the lock
    report = verify_tenant(database_url, tenant)
    assert not report.breaks and not report.differences
