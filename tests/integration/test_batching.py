"""Group commit: concurrent writes of a tenant share transactions, yet each has the outcome it
would have had alone, in arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from ledger import errors, validation
from ledger.application import Ledger
from ledger.model import Period, Reserve, Usage
from ledger.postgres import store as store_module
from ledger.postgres.store import PostgresStore
from services.platform import db
from tests.support import new_id, verify_tenant


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
