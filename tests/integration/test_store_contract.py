"""The store contract (ledger/ports.py), run through the application against both adapters:
PostgreSQL and in memory. Whatever one adapter does here, the other must do too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger import codec, errors, limits, validation
from ledger.application import Ledger
from ledger.memory import MemoryStore
from ledger.model import (
    AccountKey,
    BudgetThresholdCrossed,
    Period,
    PriceEntry,
    RecordUsage,
    SetBudgetAlerts,
    SetPrices,
    State,
    TokensGranted,
    Usage,
)
from ledger.ports import Changes, Store
from ledger.postgres.store import PostgresStore
from services.platform import db
from tests.support import new_id, scratch_database

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


Body = Callable[[Ledger, Store, Clock, str], Awaitable[Any]]


@asynccontextmanager
async def _store(kind: str, url: str) -> AsyncIterator[Store]:
    if kind == "memory":
        yield MemoryStore()
        return
    async with db.make_pool(url, 4) as pool:
        yield PostgresStore(pool)


@pytest.fixture(scope="module")
def contract_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of this suite's own: no other test's sweeper or holds touch it, so totals
    across tenants are exact."""
    with scratch_database(tmp_path_factory.mktemp("contract")) as url:
        yield url


@pytest.fixture(params=["memory", "postgres"])
def run(request: pytest.FixtureRequest, contract_url: str) -> Callable[[Body], Any]:
    """Runs a body against a fresh ledger on the adapter, with a tenant of its own."""

    def runner(body: Body) -> Any:
        async def main() -> Any:
            async with _store(request.param, contract_url) as store:
                clock = Clock()
                return await body(Ledger(store, clock=clock), store, clock, new_id("t"))

        return asyncio.run(main())

    return runner


def reserve(tenant: str, amount: int, key: str = "", user: str = "u", ttl: int = 60) -> Any:
    return validation.reserve(
        idempotency_key=key or new_id("k"),
        tenant_id=tenant,
        user_id=user,
        conversation_id="",
        model="m",
        amount=amount,
        ttl_seconds=ttl,
        labels={},
    )


async def set_limit(ledger: Ledger, tenant: str, limit: int, user: str = "u") -> None:
    await ledger.set_quota(
        validation.set_quota(
            idempotency_key=new_id("q"),
            tenant_id=tenant,
            user_id=user,
            conversation_id="",
            limit=limit,
            period=Period.NONE,
        )
    )


async def logged(store: Store, tenant: str) -> list[tuple[str, int, bytes]]:
    """(event type, version, hash) of every event of the tenant, in log order."""
    async with store.transaction(tenant) as uow:
        return [(type(f.event).__name__, f.version, f.hash) async for f in uow.events_after(0)]


def test_reserve_then_commit_charges_usage_and_releases_the_rest(
    run: Callable[[Body], Any],
) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 1_000)
        held = await ledger.reserve(reserve(t, 300))
        assert held.balance.held == 300 and held.reservation.state is State.HELD
        done = await ledger.commit(
            validation.commit(
                tenant_id=t, reservation_id=held.reservation.reservation_id, usage=Usage(100, 20)
            )
        )
        assert (done.committed, done.released, done.overage) == (120, 180, 0)
        balance = await ledger.get_balance(AccountKey(t, "u"))
        assert (balance.balance.held, balance.balance.used, balance.reservable) == (0, 120, 880)
        assert [e[0] for e in await logged(store, t)] == [
            "QuotaSet",
            "TokensReserved",
            "ReservationCommitted",
        ]

    run(body)


def test_a_retried_key_returns_the_first_result_and_writes_nothing(
    run: Callable[[Body], Any],
) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 1_000)
        first = await ledger.reserve(reserve(t, 300, key="same"))
        before = await logged(store, t)
        again = await ledger.reserve(reserve(t, 300, key="same"))
        assert again.reservation == first.reservation
        assert await logged(store, t) == before
        with pytest.raises(errors.IdempotencyKeyReused, match="amount"):
            await ledger.reserve(reserve(t, 301, key="same"))
        assert await logged(store, t) == before

    run(body)


def test_a_refusal_writes_nothing(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 100)
        before = await logged(store, t)
        with pytest.raises(errors.BudgetExhausted):
            await ledger.reserve(reserve(t, 101))
        with pytest.raises(errors.ReservationNotFound):
            await ledger.commit(
                validation.commit(tenant_id=t, reservation_id="rsv_none", usage=Usage(1))
            )
        assert await logged(store, t) == before
        assert (await ledger.get_balance(AccountKey(t, "u"))).balance.held == 0

    run(body)


def test_concurrent_reserves_never_overspend(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 1_000)
        outcomes = await asyncio.gather(
            *(ledger.reserve(reserve(t, 50)) for _ in range(64)), return_exceptions=True
        )
        granted = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, errors.BudgetExhausted)]
        assert (len(granted), len(refused)) == (20, 44)
        assert (await ledger.get_balance(AccountKey(t, "u"))).balance.held == 1_000

    run(body)


def test_an_ended_reservation_answers_its_repeat_and_refuses_another_ending(
    run: Callable[[Body], Any],
) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        rid = (await ledger.reserve(reserve(t, 10))).reservation.reservation_id
        commit = validation.commit(tenant_id=t, reservation_id=rid, usage=Usage(4))
        first = await ledger.commit(commit)
        before = await logged(store, t)
        assert await ledger.commit(commit) == first
        with pytest.raises(errors.ReservationEnded):
            await ledger.rollback(validation.rollback(tenant_id=t, reservation_id=rid, reason=""))
        assert await logged(store, t) == before
        assert (await ledger.get_reservation(t, rid)).state is State.COMMITTED

    run(body)


def test_overdue_holds_expire_exactly_once(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 100)
        rid = (await ledger.reserve(reserve(t, 100, ttl=10))).reservation.reservation_id
        assert t not in await store.overdue_tenants(clock.now, 1_000)
        clock.now += timedelta(seconds=11)
        assert t in await store.overdue_tenants(clock.now, 1_000)
        assert await ledger.expire_overdue() >= 1
        assert await ledger.expire_overdue() == 0
        assert (await ledger.get_reservation(t, rid)).state is State.EXPIRED
        assert (await ledger.get_balance(AccountKey(t, "u"))).balance.held == 0
        assert [e[0] for e in await logged(store, t)].count("ReservationExpired") == 1

    run(body)


def test_a_late_commit_is_recorded_as_usage(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        rid = (await ledger.reserve(reserve(t, 10, ttl=5))).reservation.reservation_id
        clock.now += timedelta(seconds=6)
        done = await ledger.commit(
            validation.commit(tenant_id=t, reservation_id=rid, usage=Usage(7))
        )
        assert done.late and done.committed == 7
        assert (await ledger.get_balance(AccountKey(t, "u"))).balance.used == 7

    run(body)


def test_the_log_is_a_hash_chain_per_stream(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 1_000)
        for _ in range(3):
            await ledger.reserve(reserve(t, 10))
        events = await logged(store, t)
        assert [v for _, v, _ in events] == [1, 2, 3, 4]  # all on the user's stream
        assert len({h for _, _, h in events}) == 4

    run(body)


def test_a_failed_transaction_leaves_nothing(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        key = AccountKey(t, "ghost")
        with pytest.raises(RuntimeError, match="abandoned"):
            async with store.transaction(t) as uow:
                heads = await uow.lock_accounts([AccountKey(t), key])
                row = codec.event_row(_granted(key), 1, heads[key].hash)
                await uow.write(Changes(events=[row], accounts=list(heads.values())))
                raise RuntimeError("abandoned")
        assert await logged(store, t) == []
        assert await store.accounts([AccountKey(t), key]) == {}

    run(body)


def test_rebuild_reproduces_the_live_projections(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 1_000)
        rids = [(await ledger.reserve(reserve(t, 100))).reservation.reservation_id for _ in "abc"]
        await ledger.commit(validation.commit(tenant_id=t, reservation_id=rids[0], usage=Usage(5)))
        await ledger.rollback(validation.rollback(tenant_id=t, reservation_id=rids[1], reason=""))
        keys = [AccountKey(t), AccountKey(t, "u")]
        live = await store.accounts(keys)
        live_rids = [await ledger.get_reservation(t, r) for r in rids]
        report = await ledger.rebuild(t)
        assert (report.events, report.accounts, report.reservations) == (6, 2, 3)
        assert await store.accounts(keys) == live
        assert [await ledger.get_reservation(t, r) for r in rids] == live_rids
        # the rebuilt heads continue the chains
        await ledger.reserve(reserve(t, 1))
        assert [v for _, v, _ in await logged(store, t)][-1] == 7

    run(body)


def test_held_total_counts_every_tenant_hold(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        before = await ledger.held_total()
        await ledger.reserve(reserve(t, 30))
        await ledger.reserve(reserve(t, 12, user="v"))
        assert await ledger.held_total() == before + 42

    run(body)


def _granted(key: AccountKey) -> TokensGranted:
    return TokensGranted(
        key=key, occurred_at=START, grant_id="g", amount=5, expires_at=None, reason="r"
    )


def test_a_refusal_is_the_keys_outcome(run: Callable[[Body], Any]) -> None:
    """A key refused for budget stays refused, with the same figures, after budget is freed."""

    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 100)
        filler = await ledger.reserve(reserve(t, 100))
        with pytest.raises(errors.BudgetExhausted) as first:
            await ledger.reserve(reserve(t, 10, key="k"))
        await ledger.rollback(
            validation.rollback(
                tenant_id=t, reservation_id=filler.reservation.reservation_id, reason=""
            )
        )
        with pytest.raises(errors.BudgetExhausted) as again:
            await ledger.reserve(reserve(t, 10, key="k"))
        assert (str(again.value), again.value.metadata()) == (
            str(first.value),
            first.value.metadata(),
        )
        assert (await ledger.reserve(reserve(t, 10))).reservation.amount == 10

    run(body)


def test_a_key_past_its_retention_is_a_new_request_and_is_pruned(
    run: Callable[[Body], Any],
) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        retention = timedelta(seconds=limits.idempotency_retention_s_default)
        first = await ledger.reserve(reserve(t, 10, key="k", ttl=60))
        clock.now += retention - timedelta(seconds=1)
        assert (await ledger.reserve(reserve(t, 10, key="k", ttl=60))).reservation == (
            first.reservation
        )
        with pytest.raises(errors.IdempotencyKeyReused):
            await ledger.reserve(reserve(t, 11, key="k", ttl=60))
        clock.now += timedelta(seconds=2)
        second = await ledger.reserve(reserve(t, 11, key="k", ttl=60))
        assert second.reservation.reservation_id != first.reservation.reservation_id
        stored = await store.outcome_count()
        clock.now += retention + timedelta(seconds=1)
        assert await ledger.prune_keys() >= 1  # this test's key, and any other test's
        assert await store.outcome_count() < stored
        assert await ledger.prune_keys() == 0

    run(body)


def _alerts(tenant: str, user: str, *thresholds: int) -> Any:
    return SetBudgetAlerts(new_id("a"), AccountKey(tenant, user), tuple(thresholds))


def test_each_budget_alert_is_logged_once_under_concurrent_usage(
    run: Callable[[Body], Any],
) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await set_limit(ledger, t, 1_000)
        await ledger.set_budget_alerts(_alerts(t, "u", 50, 80, 100))

        async def spend() -> None:
            rid = (await ledger.reserve(reserve(t, 20))).reservation.reservation_id
            await ledger.commit(validation.commit(tenant_id=t, reservation_id=rid, usage=Usage(20)))

        await asyncio.gather(*(spend() for _ in range(50)))  # 1,000 tokens: 100 %
        async with store.transaction(t) as uow:
            crossed = [
                (f.event.threshold_percent, f.event.used)
                async for f in uow.events_after(0)
                if isinstance(f.event, BudgetThresholdCrossed)
            ]
        assert [c[0] for c in crossed] == [50, 80, 100]
        assert all(used >= 10 * threshold for threshold, used in crossed)
        balance = (await ledger.get_balance(AccountKey(t, "u"))).balance
        assert balance.alerts_fired == (50, 80, 100)

    run(body)


def test_a_day_quotas_alerts_fire_again_the_next_day(run: Callable[[Body], Any]) -> None:
    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await ledger.set_quota(
            validation.set_quota(
                idempotency_key=new_id("q"), tenant_id=t, user_id="u", conversation_id="",
                limit=100, period=Period.DAY,
            )
        )  # fmt: skip
        await ledger.set_budget_alerts(_alerts(t, "u", 50))

        async def use(tokens: int) -> None:
            await ledger.record_usage(
                RecordUsage(new_id("r"), AccountKey(t, "u"), "m", Usage(tokens))
            )

        await use(60)
        await use(10)  # still the same day: no second alert
        clock.now += timedelta(days=1)
        await use(30)
        await use(30)
        kinds = [e[0] for e in await logged(store, t)]
        assert kinds.count("BudgetThresholdCrossed") == 2
        report = await ledger.rebuild(t)  # the alert state is a projection of the log too
        assert report.events == len(kinds)
        assert (await ledger.get_balance(AccountKey(t, "u"))).balance.alerts_fired == (50,)

    run(body)


def _prices(t: str, *entries: PriceEntry) -> SetPrices:
    return validation.set_prices(
        idempotency_key=new_id("p"), tenant_id=t, prices=list(entries), now=START
    )


def test_money_holds_costs_prices_and_their_rebuild(run: Callable[[Body], Any]) -> None:
    """Prices as events, a money quota bounding holds, the cost at the price in force at
    commit, a rise refused while a hold is live, and all of it rebuilt from the log."""

    async def body(ledger: Ledger, store: Store, clock: Clock, t: str) -> None:
        await ledger.set_prices(_prices(t, PriceEntry("m", "EUR", 2_000_000, 8_000_000, 0)))
        await ledger.set_quota(
            validation.set_quota(
                idempotency_key=new_id("q"),
                tenant_id=t,
                user_id="u",
                conversation_id="",
                limit=None,
                period=Period.DAY,
                money_limit=5_000,
            )
        )
        partial = validation.reserve(idempotency_key=new_id("k"), tenant_id=t, user_id="u",
                                     conversation_id="", model="m", amount=1_000,
                                     ttl_seconds=60, labels={}, min_amount=1)  # fmt: skip
        held = (await ledger.reserve(partial)).reservation
        assert (held.amount, held.money) == (625, 5_000)  # 8 µ a token at the dearest kind
        with pytest.raises(errors.PriceRefused):
            await ledger.set_prices(_prices(t, PriceEntry("m", "EUR", 3_000_000, 8_000_000, 0)))
        clock.now += timedelta(seconds=30)  # a cut applies at once, hold or not
        await ledger.set_prices(_prices(t, PriceEntry("m", "EUR", 1_000_000, 4_000_000, 0)))
        done = await ledger.commit(validation.commit(
            tenant_id=t, reservation_id=held.reservation_id, usage=Usage(500, 100)))  # fmt: skip
        assert done.reservation.cost == 900  # 500 * 1 + 100 * 4, at the cut price
        user = (await ledger.get_balance(AccountKey(t, "u"))).balance.money
        assert user is not None and (user.held, user.used, user.available) == (0, 900, 4_100)
        assert (await ledger.get_balance(AccountKey(t, "u"))).currency == "EUR"
        live = await store.accounts([AccountKey(t), AccountKey(t, "u")])
        prices = await store.prices(t)
        await ledger.rebuild(t)
        assert await store.accounts([AccountKey(t), AccountKey(t, "u")]) == live
        assert await store.prices(t) == prices and len(prices) == 2

    run(body)
