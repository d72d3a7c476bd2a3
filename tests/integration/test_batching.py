"""Group commit: concurrent writes of a tenant share transactions, yet each has the outcome it
would have had alone, in arrival order."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from ledger import errors, validation
from ledger.application import Ledger
from ledger.model import Commit, Period, Reserve, Rollback, Usage
from ledger.postgres import store as store_module
from ledger.postgres.store import PostgresStore
from services.platform import db
from tests.support import Clock, new_id, verify_tenant


def reserve(tenant: str, amount: int, key: str = "") -> Reserve:
    return validation.reserve(
        idempotency_key=key or new_id("k"),
        tenant_id=tenant,
        user_id="u",
        conversation_id="",
        model="m",
        amount=amount,
        ttl_seconds=60,
        labels={},
    )


async def set_limit(store: Ledger, tenant: str, limit: int) -> None:
    await store.set_quota(
        validation.set_quota(
            idempotency_key=new_id("q"),
            tenant_id=tenant,
            user_id="u",
            conversation_id="",
            limit=limit,
            period=Period.NONE,
        )
    )


def with_store(url: str, body: Callable[[Ledger], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with db.make_pool(url, 4) as pool:
            return await body(Ledger(PostgresStore(pool)))

    return asyncio.run(run())


def transactions_of(url: str, tenant: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT xid::text) FROM events WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_concurrent_writes_share_transactions_and_never_overspend(database_url: str) -> None:
    tenant = new_id("t")

    async def body(store: Ledger) -> list[Any]:
        await set_limit(store, tenant, 2_000)
        return await asyncio.gather(
            *(store.reserve(reserve(tenant, 100)) for _ in range(50)), return_exceptions=True
        )

    outcomes = with_store(database_url, body)
    granted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(granted) == 20
    assert all(isinstance(o, errors.BudgetExhausted) for o in refused)
    assert granted[-1].balance.held == 2_000
    # one by one, the quota and 20 grants would have taken 21 transactions
    assert transactions_of(database_url, tenant) < 10

    report = verify_tenant(database_url, tenant)
    assert report.events_checked == 21
    assert report.breaks == [] and report.differences == []


def test_a_refused_write_does_not_undo_its_batch_neighbours(database_url: str) -> None:
    tenant = new_id("t")
    key = new_id("k")

    async def body(store: Ledger) -> list[Any]:
        await set_limit(store, tenant, 100)
        await store.reserve(reserve(tenant, 10, key))
        return await asyncio.gather(
            store.reserve(reserve(tenant, 10)),
            store.reserve(reserve(tenant, 11, key)),  # same key, different amount
            store.reserve(reserve(tenant, 1_000)),  # over the limit
            store.reserve(reserve(tenant, 20)),
            return_exceptions=True,
        )

    first, reused, too_big, last = with_store(database_url, body)
    assert first.reservation.amount == 10 and last.reservation.amount == 20
    assert isinstance(reused, errors.IdempotencyKeyReused) and reused.field == "amount"
    assert isinstance(too_big, errors.BudgetExhausted) and too_big.level.available == 80
    assert last.balance.held == 40
    assert transactions_of(database_url, tenant) <= 3


def test_the_same_key_twice_in_one_batch_is_applied_once(database_url: str) -> None:
    tenant = new_id("t")
    key = new_id("k")

    async def body(store: Ledger) -> list[Any]:
        return await asyncio.gather(*(store.reserve(reserve(tenant, 10, key)) for _ in range(5)))

    results = with_store(database_url, body)
    assert all(r == results[0] for r in results)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tenant,)).fetchone()
    assert row == (1,)


@pytest.mark.parametrize("records_max", [1, 3])
def test_a_batch_with_more_rows_than_one_statement_takes_writes_them_in_chunks(
    database_url: str, monkeypatch: pytest.MonkeyPatch, records_max: int
) -> None:
    """The hot tables are written by one statement while every table's rows fit one (a jsonb
    array each), else a statement a table a chunk: both write the same log and projections."""
    monkeypatch.setattr(store_module, "records_per_statement", records_max)
    tenant = new_id("t")

    async def body(store: Ledger) -> list[Any]:
        await set_limit(store, tenant, 10_000)
        held = await asyncio.gather(*(store.reserve(reserve(tenant, 100)) for _ in range(10)))
        await asyncio.gather(
            *(
                store.commit(
                    validation.commit(
                        tenant_id=tenant,
                        reservation_id=r.reservation.reservation_id,
                        usage=Usage(input_tokens=30, output_tokens=20),
                    )
                )
                for r in held
            )
        )
        return held

    held = with_store(database_url, body)
    assert len({r.reservation.reservation_id for r in held}) == 10
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT held, used_total FROM accounts WHERE tenant_id = %s AND user_id = ''",
            (tenant,),
        ).fetchone()
    assert row == (0, 500)
    report = verify_tenant(database_url, tenant)
    assert report.events_checked == 21
    assert report.breaks == [] and report.differences == []


def _calls(tenant: str) -> tuple[list[Reserve], list[Commit], list[Rollback]]:
    """Holds (one too big, one key sent twice and once more with another amount), commits
    (one unknown, one repeated, one over its hold) and a rollback, all of `tenant`. Every
    hold decided takes an id (rsv_1, ...), the refused one too."""
    holds = [reserve(tenant, n, f"k{i}") for i, n in enumerate((60, 30, 20, 5))]
    holds += [reserve(tenant, 5, "k3"), reserve(tenant, 6, "k3")]
    usage = Usage(input_tokens=40, output_tokens=10)
    commits = [
        validation.commit(tenant_id=tenant, reservation_id=rid, usage=usage)
        for rid in ("rsv_1", "rsv_unknown", "rsv_1", "rsv_2")
    ]
    rollbacks = [validation.rollback(tenant_id=tenant, reservation_id="rsv_4", reason="")]
    return holds, commits, rollbacks


def _facts(url: str, tenant: str) -> list[str]:
    """The tenant's log and projection rows, without what differs between two tenants fed
    the same calls (the tenant's name, the hashes that cover it, positions, transactions)."""
    queries = {
        "events": "SELECT * FROM events WHERE tenant_id = %s ORDER BY position",
        "accounts": "SELECT * FROM accounts WHERE tenant_id = %s ORDER BY user_id",
        "reservations": "SELECT * FROM reservations WHERE tenant_id = %s ORDER BY 2",
        "usage_hourly": "SELECT * FROM usage_hourly WHERE tenant_id = %s ORDER BY user_id",
        "idempotency_keys": "SELECT * FROM idempotency_keys WHERE tenant_id = %s ORDER BY 2",
    }
    varying = {"position", "xid", "recorded_at", "hash", "prev_hash", "head_hash", "updated_at"}
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return [
            f"{table}: " + repr({k: v for k, v in row.items() if k not in varying})
            for table, sql in queries.items()
            for row in conn.execute(sql, (tenant,)).fetchall()
        ]


def _seen(outcome: Any) -> str:
    """A result as its repr; a refusal as its type, message and figures."""
    if isinstance(outcome, Exception):
        return f"{type(outcome).__name__} {outcome} {vars(outcome)}"
    return repr(outcome)


def test_a_batch_call_gets_the_outcomes_log_and_projections_of_its_calls_one_by_one(
    database_url: str,
) -> None:
    """reserve_batch, commit_batch and rollback_batch apply their items as one entry of the
    queue, in one transaction: each item's result or refusal (reason and figures), the events
    and every projection row are what the same calls made one at a time give."""
    batched, single = new_id("b"), new_id("s")
    clock = Clock()

    def ids() -> Callable[[], str]:
        return (f"rsv_{n}" for n in itertools.count(1)).__next__

    async def body(tenant: str, one_by_one: bool) -> list[str]:
        async with db.make_pool(database_url, 2) as pool:
            store = Ledger(PostgresStore(pool), clock=clock, new_id=ids())
            await store.set_quota(
                validation.set_quota(
                    idempotency_key="q", tenant_id=tenant, user_id="u", conversation_id="",
                    limit=100, period=Period.NONE,
                )
            )  # fmt: skip
            holds, commits, rollbacks = _calls(tenant)
            if one_by_one:
                outcomes = [
                    *[await _outcome(store.reserve, c) for c in holds],
                    *[await _outcome(store.commit, c) for c in commits],
                    *[await _outcome(store.rollback, c) for c in rollbacks],
                ]
            else:
                outcomes = [
                    *await store.reserve_batch(holds),
                    *await store.commit_batch(commits),
                    *await store.rollback_batch(rollbacks),
                ]
            return [_seen(o).replace(tenant, "T") for o in outcomes]

    got = asyncio.run(body(batched, one_by_one=False))
    expected = asyncio.run(body(single, one_by_one=True))
    assert got == expected
    assert sum("BudgetExhausted" in o for o in got) == 1
    assert sum("IdempotencyKeyReused" in o for o in got) == 1
    assert sum("ReservationNotFound" in o for o in got) == 1
    assert [f.replace(batched, "T") for f in _facts(database_url, batched)] == [
        f.replace(single, "T") for f in _facts(database_url, single)
    ]
    assert transactions_of(database_url, batched) == 4  # the quota, then one a batch call


async def _outcome(call: Callable[[Any], Awaitable[Any]], cmd: Any) -> Any:
    try:
        return await call(cmd)
    except errors.LedgerError as exc:
        return exc
