"""Verification in parts (ledger/verify.py): the parts of a plan cover every event and every
projection row exactly once, a verification in parts reports exactly what a single part does,
tampered or not, and a worker's failure reaches the caller as a clear, retryable error."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import pickle
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import psycopg
import pytest

from ledger.errors import StoreUnavailable
from ledger.postgres import verify
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.rows import scope_where
from ledger.postgres.verify import Part
from ledger.reads import Scope
from services.platform import db
from tests.support import ServerThread, cycle, exits_within, run_cli, verify_tenant

TABLES = ("events", "accounts", "reservations", "usage_hourly", "rate_limits")
USERS = [f"user-{n}" for n in range(60)]


@pytest.fixture
def crowded_tenant(ledger: ServerThread, busy_tenant: str) -> Iterator[str]:
    """The busy tenant (tenant-level quota and rate limit included) with sixty more users,
    so that every bucket of a plan has some."""
    with ledger.stub() as stub:
        for n, user in enumerate(USERS):
            cycle(stub, busy_tenant, user, f"c{n % 3}", 100 + n, 50 + n)
    yield busy_tenant


def count(url: str, table: str, where: str, params: tuple[object, ...]) -> int:
    with psycopg.connect(url) as conn:
        query = f"SELECT count(*) FROM {table} WHERE {where}"  # noqa: S608 (constant names)
        row = conn.execute(query, params).fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("handoff", [True, False])
def test_the_parts_of_a_plan_cover_every_row_once(
    database_url: str, crowded_tenant: str, workers: int, handoff: bool
) -> None:
    """Every projection row is compared by one part; every event is read by one part (with
    the handoff) or by one user part and the tenant part (the design before it)."""
    scope = Scope(crowded_tenant)
    parts = verify.plan(scope, workers, before_handoff=not handoff)
    assert [p.tenant_level for p in parts].count(True) == 1 and len(parts) == 1 + 3 * workers
    for table in TABLES:
        everything = count(database_url, table, *scope_where(scope))
        assert everything > 0, table
        covered = sum(count(database_url, table, *p.rows_where()) for p in parts)
        assert covered == everything, table
        # and every bucket holds some users, so the split is real
        assert all(count(database_url, "accounts", *p.rows_where()) for p in parts)
    # The user parts split the users' events; the tenant part reads its own events (and the
    # user parts hand it the effects of theirs) or, before the handoff, every event.
    events = count(database_url, "events", *scope_where(scope))
    tenant_part, *user_parts = parts
    own = events - sum(count(database_url, "events", *p.events_where()) for p in user_parts)
    assert own == count(database_url, "events", *Part(scope, True, False).rows_where()) > 0
    read = count(database_url, "events", *tenant_part.events_where())
    assert read == (own if handoff else events)


def test_a_users_scope_is_one_part_without_the_tenants_account() -> None:
    scope = Scope("t", "ann")
    assert verify.plan(scope, 4) == [Part(scope, tenant_level=False, users=True)]
    assert verify.plan(Scope("t"), 1) == [Part(Scope("t"), tenant_level=True, users=True)]


TAMPERING = {
    "nothing": "",
    "a user's event": "UPDATE events SET input_tokens = input_tokens + 7 WHERE tenant_id = %s "
    "AND user_id = 'user-3' AND version = 2",
    "the tenant's own event": "UPDATE events SET data = jsonb_set(data, '{limit}', '1') "
    "WHERE tenant_id = %s AND user_id = '' AND event_type = 'QuotaSet'",
    "a deleted conversation event": "DELETE FROM events WHERE tenant_id = %s "
    "AND user_id = 'user-5' AND conversation_id = 'c2' AND version = 1",
    "the tenant's account row": "UPDATE accounts SET used_total = used_total + 1 "
    "WHERE tenant_id = %s AND user_id = ''",
    "a user's usage row": "UPDATE usage_hourly SET input_tokens = 0 WHERE tenant_id = %s "
    "AND user_id = 'user-8'",
    "a tenant-level limiter": "UPDATE rate_limits SET tokens_tat = tokens_tat + 5 "
    "WHERE tenant_id = %s AND user_id = ''",
}


@pytest.mark.parametrize("change", TAMPERING)
def test_a_verification_in_parts_reports_exactly_what_one_part_does(
    database_url: str, crowded_tenant: str, change: str
) -> None:
    if TAMPERING[change]:
        with psycopg.connect(database_url) as conn:
            conn.execute("SET session_replication_role = replica")  # triggers off: superuser
            assert conn.execute(TAMPERING[change], (crowded_tenant,)).rowcount >= 1
    whole = verify_tenant(database_url, crowded_tenant, workers=1)
    assert verify_tenant(database_url, crowded_tenant, workers=3) == whole
    assert verify_tenant(database_url, crowded_tenant, workers=2, handoff=False) == whole
    assert whole.events_checked == count(
        database_url, "events", *scope_where(Scope(crowded_tenant))
    )
    found = bool(whole.breaks or whole.differences)
    assert found == bool(TAMPERING[change]), (whole.breaks, whole.differences)


@pytest.mark.parametrize("since_checkpoint", [False, True])
def test_a_part_leaves_nothing_for_the_cycle_collector(
    database_url: str, ledger: ServerThread, crowded_tenant: str, since_checkpoint: bool
) -> None:
    """Parts run with the cycle collector off (verify._collector_paused): what they make must
    be freed by reference counting alone, or a long verification would hold on to it all."""
    tenant = crowded_tenant
    if since_checkpoint:
        assert run_cli(["audit", "checkpoint", "--tenant", tenant],
                       {"DATABASE_URL": database_url}).returncode == 0  # fmt: skip
        with ledger.stub() as stub:
            cycle(stub, tenant, USERS[0], "c-new", 100, 50)
    with psycopg.connect(database_url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        last = conn.execute(
            "SELECT seq, position FROM audit_checkpoints WHERE tenant_id = %s "
            "ORDER BY seq DESC LIMIT 1", (tenant,),
        ).fetchone()  # fmt: skip
        assert row is not None and (last is not None) == since_checkpoint
        since = {"since_seq": last[0], "since": last[1]} if last else {}
        parts = verify.plan(Scope(tenant), 2, **since)
        # In a process of its own: this one runs servers' threads, whose garbage would count.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            checked, problems, garbage = fresh.submit(
                _garbage_after, database_url, row[0], parts
            ).result(timeout=120)
    assert checked > 0 and problems == 0
    assert garbage == 0


def _garbage_after(url: str, snapshot: str, parts: list[Part]) -> tuple[int, int, int]:
    """The events checked, the problems found and the objects the cycle collector finds
    after running every part of a plan with the collector off (the user parts, then the
    tenant part with their effects, in chunks of 100 events)."""
    gc.collect()
    gc.disable()
    tenant_part, *user_parts = parts
    handed = [verify.check_users(url, snapshot, p) for p in user_parts]
    last = verify.check(url, snapshot, tenant_part, 100, [e for _, e in handed])
    report = verify.merge([*(r for r, _ in handed), last])
    checked, problems = report.events_checked, len(report.breaks) + len(report.differences)
    del handed, last, report
    return checked, problems, gc.collect()


def test_a_worker_that_dies_is_a_retryable_error_and_is_replaced(
    database_url: str, busy_tenant: str
) -> None:
    async def run() -> None:
        async with db.make_pool(database_url, 2) as pool:
            audit = LedgerAudit(pool, workers=1)
            try:
                with pytest.raises(StoreUnavailable, match="worker process died"):
                    await audit._in_worker(os._exit, 3)
                report = await audit.verify(Scope(busy_tenant))
                assert report.events_checked > 10 and not report.differences
            finally:
                audit.close()

    asyncio.run(run())


def test_workers_started_ahead_serve_the_verifications(database_url: str, busy_tenant: str) -> None:
    """start_workers starts every worker process before any verification, which then runs
    on them (none is started again); after close, none starts."""

    async def run() -> None:
        async with db.make_pool(database_url, 2) as pool:
            audit = LedgerAudit(pool, workers=2)
            pids = await audit.start_workers()
            assert len(set(pids)) == 2 and os.getpid() not in pids
            assert set(pids) <= {p.pid for p in multiprocessing.active_children()}
            report = await audit.verify(Scope(busy_tenant))
            assert report.events_checked > 10 and not report.differences
            assert await audit.start_workers() == pids
            audit.close()
            assert all(exits_within(pid, 30) for pid in pids)
            with pytest.raises(StoreUnavailable, match="stopping"):
                await audit.start_workers()

    asyncio.run(run())


def test_closing_stops_workers_in_the_middle_of_a_part(database_url: str) -> None:
    """A server's stop does not wait for a long verification to finish; Ctrl-C, which the
    terminal sends to every process of the group, is the server's to handle, not its workers'."""

    async def run() -> None:
        async with db.make_pool(database_url, 2) as pool:
            audit = LedgerAudit(pool, workers=1)
            pid = await audit._in_worker(os.getpid)  # the worker is up and initialized
            (worker,) = [p for p in multiprocessing.active_children() if p.pid == pid]
            part = asyncio.ensure_future(audit._in_worker(time.sleep, 600))
            await asyncio.sleep(0)  # the part is submitted
            os.kill(pid, signal.SIGINT)
            worker.join(1)
            assert worker.is_alive()
            audit.close()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(part, 30)
            # Not worker.join(): the executor's own thread reaps the worker too, and whichever
            # waits second never learns the exit code. The process is what must be gone.
            assert exits_within(pid, 30)
            with pytest.raises(StoreUnavailable, match="stopping"):  # and none starts again
                await audit.verify(Scope("t"))

    asyncio.run(run())


def test_database_errors_in_a_worker_survive_the_trip_back(database_url: str) -> None:
    """A worker's exception is pickled to the server: psycopg's would not survive that."""
    part = Part(Scope("t"), tenant_level=True, users=True)
    with pytest.raises(StoreUnavailable, match="cannot be read") as unavailable:
        verify.check("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2", "x", part)
    with pytest.raises(RuntimeError, match="snapshot") as refused:
        verify.check(database_url, "00000003-0000001B-1", part)
    for error in (unavailable.value, refused.value):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
