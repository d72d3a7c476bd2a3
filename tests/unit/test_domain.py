"""Unit tests of the pure ledger: model values, decide/evolve, commit figures and the codec.

No database and no clock: every time is a fixed aware UTC datetime passed in via Context.now.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import codec, errors
from ledger.domain import (
    Snapshot,
    affected,
    commit_outcome,
    decide,
    evolve_account,
    evolve_reservation,
)
from ledger.model import (
    Account,
    AccountKey,
    BalanceAdjusted,
    BudgetAlertsSet,
    BudgetThresholdCrossed,
    Commit,
    Context,
    Event,
    Expire,
    GrantOrder,
    Period,
    PriceSet,
    QuotaSet,
    RateLimitSet,
    RecordUsage,
    Reservation,
    ReservationCommitted,
    ReservationExpired,
    ReservationRolledBack,
    Reserve,
    Rollback,
    SetQuota,
    State,
    TokensGranted,
    TokensReserved,
    Usage,
    UsageRecorded,
)

T0 = datetime(2025, 3, 14, 12, 30, 15, 123456, tzinfo=UTC)
DAY0 = date(2025, 3, 14)
MONTH0 = date(2025, 3, 1)

TENANT = AccountKey("acme")
USER = AccountKey("acme", "alice")
CONV = AccountKey("acme", "alice", "c1")
LINEAGE = (TENANT, USER, CONV)


# --- helpers ---------------------------------------------------------------------------------


def accounts_for(key: AccountKey, *given_accounts: Account) -> dict[AccountKey, Account]:
    """The lineage of `key` as a snapshot needs it: given accounts, empty ones elsewhere."""
    by_key = {acc.key: acc for acc in given_accounts}
    return {k: by_key.get(k, Account(k)) for k in key.lineage()}


def reserve_cmd(amount: int, key: AccountKey = CONV, ttl_s: int = 60) -> Reserve:
    return Reserve("idem-r", key, "gpt-x", amount, ttl_s, labels=(("app", "chat"),))


def ctx(now: datetime = T0, new_id: str = "r-1") -> Context:
    return Context(now=now, new_id=new_id, actor="svc:api", trace_id="trace-1")


def held_reservation(
    amount: int = 100,
    state: State = State.HELD,
    usage: Usage | None = None,
    late: bool = False,
    created_at: datetime = T0,
    ttl: timedelta = timedelta(minutes=10),
) -> Reservation:
    return Reservation(
        reservation_id="r-1",
        key=CONV,
        model="gpt-x",
        amount=amount,
        state=state,
        created_at=created_at,
        expires_at=created_at + ttl,
        labels=(("app", "chat"),),
        usage=usage,
        late=late,
        ended_at=None if state is State.HELD else created_at + timedelta(minutes=1),
    )


def fold(accounts: dict[AccountKey, Account], events: list[Event]) -> dict[AccountKey, Account]:
    """Apply events to a copy of `accounts` exactly as the store does (affected levels only)."""
    out = dict(accounts)
    for event in events:
        for k in affected(event):
            out[k] = evolve_account(out.get(k, Account(k)), event)
    return out


def refusal(snap: Snapshot, cmd: Reserve, now: datetime = T0) -> errors.BudgetExhausted:
    with pytest.raises(errors.BudgetExhausted) as info:
        decide(snap, cmd, ctx(now))
    return info.value


# --- reserve: fitting and refusing ------------------------------------------------------------


def test_reserve_fits_when_every_limited_level_has_room() -> None:
    """A reservation that fits every limited level (exactly, here) yields one TokensReserved."""
    snap = Snapshot(
        accounts_for(
            CONV,
            Account(TENANT, limit=100, held=50),
            Account(USER, limit=40, used_total=10),
            Account(CONV, limit=1000, held=1),
        )
    )
    events = decide(snap, reserve_cmd(30), ctx())
    assert events == [
        TokensReserved(
            key=CONV,
            occurred_at=T0,
            actor="svc:api",
            trace_id="trace-1",
            idempotency_key="idem-r",
            model="gpt-x",
            reservation_id="r-1",
            amount=30,
            requested=30,
            expires_at=T0 + timedelta(seconds=60),
            labels=(("app", "chat"),),
        )
    ]


def test_reserve_refused_naming_tenant_before_user_when_both_overflow() -> None:
    """When tenant and user both overflow, the tenant is named; reservable is the minimum."""
    snap = Snapshot(
        accounts_for(
            CONV,
            Account(TENANT, limit=100, held=95),  # 5 available
            Account(USER, limit=10, used_total=7),  # 3 available
        )
    )
    err = refusal(snap, reserve_cmd(10))
    assert err.requested == 10
    assert err.level == errors.RefusingLevel(
        scope="tenant", account="acme", limit=100, held=95, used=0, available=5
    )
    assert err.reservable == 3
    assert err.metadata() == {
        "requested": "10",
        "available": "5",
        "limit": "100",
        "scope": "tenant",
        "account": "acme",
        "reservable": "3",
    }


def test_reserve_refused_naming_user_before_conversation_when_both_overflow() -> None:
    """With an unlimited tenant, the user is named before an overflowing conversation."""
    snap = Snapshot(
        accounts_for(
            CONV,
            Account(USER, limit=20, held=12),  # 8 available
            Account(CONV, limit=5, used_total=3),  # 2 available
        )
    )
    err = refusal(snap, reserve_cmd(9))
    assert (err.level.scope, err.level.account) == ("user", "acme/alice")
    assert (err.level.available, err.level.limit, err.level.held) == (8, 20, 12)
    assert err.reservable == 2


def test_reserve_refused_at_conversation_when_only_it_overflows() -> None:
    """A level that has room is skipped: the first *overflowing* level is named."""
    snap = Snapshot(
        accounts_for(
            CONV,
            Account(TENANT, limit=1000),
            Account(USER, limit=500),
            Account(CONV, limit=50, held=20, used_total=25),  # 5 available
        )
    )
    err = refusal(snap, reserve_cmd(6))
    assert err.level == errors.RefusingLevel(
        scope="conversation", account="acme/alice/c1", limit=50, held=20, used=25, available=5
    )
    assert err.requested == 6
    assert err.reservable == 5
    assert decide(snap, reserve_cmd(5), ctx())  # exactly the available amount fits


def test_reservable_is_smallest_available_across_limited_levels_only() -> None:
    """Unlimited levels take no part in `reservable`; a non-refusing level can set it."""
    snap = Snapshot(
        accounts_for(
            CONV,
            Account(TENANT, limit=100, held=99),  # 1 available
            Account(USER, limit=None, held=10**9),
            Account(CONV, limit=10),  # 10 available
        )
    )
    err = refusal(snap, reserve_cmd(2))
    assert err.level.scope == "tenant"
    assert err.reservable == 1

    snap = Snapshot(
        accounts_for(
            CONV,
            Account(TENANT, limit=100, held=40),  # 60 available, refuses 61
            Account(USER, limit=None),
            Account(CONV, limit=70, held=30),  # 40 available, refuses 61 too
        )
    )
    err = refusal(snap, reserve_cmd(61))
    assert err.level.scope == "tenant"
    assert err.level.available == 60
    assert err.reservable == 40


def test_levels_without_a_limit_never_refuse() -> None:
    """With no limit anywhere, any amount fits whatever is held or used."""
    snap = Snapshot(
        accounts_for(
            CONV,
            Account(TENANT, held=10**12, used_total=10**12),
            Account(USER, held=10**12, used_day=10**12, period=Period.DAY, day_start=DAY0),
            Account(CONV, used_month=10**12, period=Period.MONTH, month_start=MONTH0),
        )
    )
    events = decide(snap, reserve_cmd(100_000_000), ctx())
    assert [type(e) for e in events] == [TokensReserved]


def test_reserve_refused_with_zero_available_when_limit_lowered_below_usage() -> None:
    """A limit already exceeded by held + used reports 0 available (never negative)."""
    snap = Snapshot(accounts_for(USER, Account(USER, limit=10, held=8, used_total=7)))
    err = refusal(snap, reserve_cmd(1, key=USER))
    assert err.level.available == 0
    assert err.reservable == 0
    assert (err.level.held, err.level.used) == (8, 7)


def test_reserve_against_zero_limit_is_refused() -> None:
    """A zero limit refuses any positive amount."""
    snap = Snapshot(accounts_for(USER, Account(TENANT, limit=0)))
    err = refusal(snap, reserve_cmd(1, key=USER))
    assert (err.level.scope, err.level.limit, err.reservable) == ("tenant", 0, 0)


def test_reserve_uses_the_current_period_usage_when_checking() -> None:
    """Yesterday's day usage does not count: the check is on the account rolled to now."""
    acc = Account(USER, limit=100, period=Period.DAY, used_day=100, day_start=DAY0)
    snap = Snapshot(accounts_for(USER, acc))
    err = refusal(snap, reserve_cmd(1, key=USER))
    assert err.level.used == 100
    next_day = datetime(2025, 3, 15, 0, 0, tzinfo=UTC)
    events = decide(snap, reserve_cmd(100, key=USER), ctx(next_day))
    assert [type(e) for e in events] == [TokensReserved]


def test_other_commands_emit_one_event_without_checking_limits() -> None:
    """SetQuota and RecordUsage become QuotaSet and UsageRecorded, even over the limit."""
    snap = Snapshot(accounts_for(USER, Account(USER, limit=0)))
    quota = decide(snap, SetQuota("idem-q", USER, 5, Period.DAY), ctx())
    assert quota == [
        QuotaSet(
            key=USER,
            occurred_at=T0,
            actor="svc:api",
            trace_id="trace-1",
            idempotency_key="idem-q",
            limit=5,
            period=Period.DAY,
        )
    ]
    usage = decide(snap, RecordUsage("idem-u", USER, "gpt-x", Usage(1, 2, 3)), ctx())
    assert usage == [
        UsageRecorded(
            key=USER,
            occurred_at=T0,
            actor="svc:api",
            trace_id="trace-1",
            idempotency_key="idem-u",
            model="gpt-x",
            usage=Usage(1, 2, 3),
        )
    ]


# --- availability and periods -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "expected"),
    [(Period.NONE, 100 - 30 - 50), (Period.DAY, 100 - 30 - 10), (Period.MONTH, 100 - 30 - 20)],
)
def test_available_counts_held_plus_used_in_the_current_period(
    period: Period, expected: int
) -> None:
    """available = limit - held - used, where `used` is the counter of the quota's period."""
    acc = Account(
        USER,
        limit=100,
        period=period,
        held=30,
        used_total=50,
        used_day=10,
        day_start=DAY0,
        used_month=20,
        month_start=MONTH0,
    )
    assert acc.available == expected
    assert acc.used == {Period.NONE: 50, Period.DAY: 10, Period.MONTH: 20}[period]


def test_available_is_none_without_a_limit() -> None:
    """An account without a limit has no availability figure."""
    assert Account(USER, held=5, used_total=5).available is None


def test_day_counter_resets_when_the_day_has_passed() -> None:
    """Account.rolled zeroes used_day on a later UTC day only; held and totals are kept."""
    acc = Account(
        USER,
        limit=100,
        period=Period.DAY,
        held=7,
        used_total=90,
        used_day=40,
        day_start=DAY0,
        used_month=60,
        month_start=MONTH0,
    )
    same_day = acc.rolled(datetime(2025, 3, 14, 23, 59, 59, 999999, tzinfo=UTC))
    assert same_day == acc
    assert same_day.available == 100 - 7 - 40

    next_day = acc.rolled(datetime(2025, 3, 15, 0, 0, tzinfo=UTC))
    assert next_day == replace(acc, used_day=0, day_start=date(2025, 3, 15))
    assert next_day.available == 100 - 7


def test_rolled_uses_the_utc_day_of_an_aware_time() -> None:
    """A time with a positive offset that is still the old day in UTC does not reset."""
    acc = Account(USER, period=Period.DAY, used_day=40, day_start=DAY0, month_start=MONTH0)
    plus5 = timezone(timedelta(hours=5))
    assert acc.rolled(datetime(2025, 3, 15, 4, 59, tzinfo=plus5)) == acc  # 23:59 UTC on 14th
    assert acc.rolled(datetime(2025, 3, 15, 5, 0, tzinfo=plus5)).used_day == 0


def test_month_counter_resets_when_the_month_has_passed() -> None:
    """used_month survives within the month and resets (with the day) on the 1st."""
    acc = Account(
        USER,
        limit=1000,
        period=Period.MONTH,
        used_total=500,
        used_day=5,
        day_start=date(2025, 3, 31),
        used_month=300,
        month_start=MONTH0,
    )
    late_march = acc.rolled(datetime(2025, 3, 31, 23, 0, tzinfo=UTC))
    assert late_march.used_month == 300
    assert late_march.available == 700

    april = acc.rolled(datetime(2025, 4, 1, 0, 0, tzinfo=UTC))
    assert april.used_month == 0
    assert april.month_start == date(2025, 4, 1)
    assert april.used_day == 0
    assert april.used_total == 500
    assert april.available == 1000


def test_month_counter_resets_from_december_to_january() -> None:
    """The month rolls over the year boundary."""
    acc = Account(USER, period=Period.MONTH, used_month=9, month_start=date(2024, 12, 1))
    rolled = acc.rolled(datetime(2025, 1, 1, 0, 0, tzinfo=UTC))
    assert (rolled.used_month, rolled.month_start) == (0, date(2025, 1, 1))


def test_period_none_never_resets() -> None:
    """Under Period.NONE the counted usage is used_total, which no amount of time resets."""
    acc = Account(USER, limit=100, period=Period.NONE, used_total=60, held=10)
    years_later = acc.rolled(datetime(2031, 7, 1, tzinfo=UTC))
    assert years_later.used_total == 60
    assert years_later.used == 60
    assert years_later.available == 30


@pytest.mark.parametrize(
    ("day", "start", "end"),
    [
        (date(2025, 3, 14), datetime(2025, 3, 14, tzinfo=UTC), datetime(2025, 3, 15, tzinfo=UTC)),
        (date(2024, 2, 28), datetime(2024, 2, 28, tzinfo=UTC), datetime(2024, 2, 29, tzinfo=UTC)),
        (date(2025, 2, 28), datetime(2025, 2, 28, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)),
        (date(2024, 12, 31), datetime(2024, 12, 31, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)),
    ],
)
def test_period_bounds_of_a_day(day: date, start: datetime, end: datetime) -> None:
    """A DAY period is [00:00 UTC of the day, 00:00 UTC of the next day)."""
    acc = Account(USER, period=Period.DAY).rolled(datetime.combine(day, T0.timetz()))
    assert acc.period_bounds() == (start, end)


@pytest.mark.parametrize(
    ("at", "start", "end"),
    [
        (T0, datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC)),
        (
            datetime(2025, 11, 30, 23, 59, tzinfo=UTC),
            datetime(2025, 11, 1, tzinfo=UTC),
            datetime(2025, 12, 1, tzinfo=UTC),
        ),
        (
            datetime(2024, 12, 31, 23, 59, tzinfo=UTC),
            datetime(2024, 12, 1, tzinfo=UTC),
            datetime(2025, 1, 1, tzinfo=UTC),
        ),
        (
            datetime(2025, 1, 1, tzinfo=UTC),
            datetime(2025, 1, 1, tzinfo=UTC),
            datetime(2025, 2, 1, tzinfo=UTC),
        ),
    ],
)
def test_period_bounds_of_a_month(at: datetime, start: datetime, end: datetime) -> None:
    """A MONTH period is [1st of the month, 1st of the next month), December → January."""
    acc = Account(USER, period=Period.MONTH).rolled(at)
    bounds = acc.period_bounds()
    assert bounds == (start, end)
    assert bounds[0] <= at < bounds[1]
    assert all(b.tzinfo is UTC for b in bounds)


def test_period_bounds_none_for_period_none() -> None:
    """Period.NONE has no bounds."""
    assert Account(USER, period=Period.NONE).rolled(T0).period_bounds() is None


# --- evolve --------------------------------------------------------------------------------


def _reserved(amount: int = 100, at: datetime = T0) -> TokensReserved:
    return TokensReserved(
        key=CONV,
        occurred_at=at,
        model="gpt-x",
        reservation_id="r-1",
        amount=amount,
        expires_at=at + timedelta(minutes=10),
    )


def _committed(
    usage: Usage, amount: int = 100, at: datetime = T0, reserved_at: datetime = T0
) -> ReservationCommitted:
    return ReservationCommitted(
        key=CONV,
        occurred_at=at,
        model="gpt-x",
        reservation_id="r-1",
        amount=amount,
        usage=usage,
        reserved_at=reserved_at,
    )


def test_affected_is_the_lineage_except_for_quota_set() -> None:
    """Holds and charges touch every level of the lineage; a quota only its own account."""
    assert affected(_reserved()) == LINEAGE
    assert affected(_committed(Usage(1))) == LINEAGE
    assert affected(QuotaSet(key=USER, occurred_at=T0, limit=1, period=Period.DAY)) == (USER,)


def test_tokens_reserved_adds_to_held_on_every_level() -> None:
    """TokensReserved adds its amount to `held` of tenant, user and conversation alike."""
    start = accounts_for(CONV, Account(TENANT, held=5), Account(USER, limit=1000, held=7))
    after = fold(start, [_reserved(100)])
    assert [after[k].held for k in LINEAGE] == [105, 107, 100]
    assert all(after[k].used_total == 0 for k in LINEAGE)
    assert after[USER].limit == 1000


def test_commit_releases_the_hold_and_charges_full_usage_including_overage() -> None:
    """ReservationCommitted removes the hold and charges usage.total, even above the hold."""
    usage = Usage(input_tokens=80, output_tokens=50, cached_input_tokens=20)  # 150 > 100
    after = fold(
        accounts_for(CONV), [_reserved(100), _committed(usage, at=T0 + timedelta(seconds=30))]
    )
    for k in LINEAGE:
        acc = after[k]
        assert acc.held == 0
        assert (acc.used_total, acc.used_day, acc.used_month) == (150, 150, 150)
        assert (acc.day_start, acc.month_start) == (DAY0, MONTH0)


def test_commit_with_less_usage_charges_only_the_usage() -> None:
    """An under-used hold is released entirely; only the usage is charged."""
    after = fold(accounts_for(CONV), [_reserved(100), _committed(Usage(10, 20, 0))])
    assert all((after[k].held, after[k].used_total) == (0, 30) for k in LINEAGE)


@pytest.mark.parametrize(
    "ending",
    [
        ReservationRolledBack(
            key=CONV, occurred_at=T0, reservation_id="r-1", amount=100, reason="user cancelled"
        ),
        ReservationExpired(key=CONV, occurred_at=T0, reservation_id="r-1", amount=100),
    ],
    ids=["rolled_back", "expired"],
)
def test_rollback_and_expiry_release_the_hold_without_charging(ending: Event) -> None:
    """RolledBack and Expired give the hold back on every level and charge nothing."""
    start = accounts_for(CONV, Account(TENANT, held=3))
    after = fold(start, [_reserved(100), ending])
    assert [after[k].held for k in LINEAGE] == [3, 0, 0]
    assert all(
        (after[k].used_total, after[k].used_day, after[k].used_month) == (0, 0, 0) for k in LINEAGE
    )


def test_quota_set_changes_only_its_own_account() -> None:
    """QuotaSet on the user sets its limit and period and leaves the others untouched."""
    start = fold(accounts_for(CONV), [_reserved(40), _committed(Usage(30), amount=40)])
    after = fold(start, [QuotaSet(key=USER, occurred_at=T0, limit=500, period=Period.MONTH)])
    assert after[TENANT] == start[TENANT]
    assert after[CONV] == start[CONV]
    assert after[USER] == replace(start[USER], limit=500, period=Period.MONTH)
    assert after[USER].available == 500 - 30

    cleared = fold(after, [QuotaSet(key=USER, occurred_at=T0, limit=None, period=Period.NONE)])
    assert (cleared[USER].limit, cleared[USER].period, cleared[USER].available) == (
        None,
        Period.NONE,
        None,
    )


def test_commit_of_a_hold_from_an_earlier_day_is_not_charged_to_the_new_day() -> None:
    """A hold reserved yesterday and committed today counts in total and month, not today."""
    reserved_at = datetime(2025, 3, 14, 23, 59, tzinfo=UTC)
    committed_at = datetime(2025, 3, 15, 0, 1, tzinfo=UTC)
    start = accounts_for(CONV, Account(USER, limit=100, period=Period.DAY))
    after = fold(
        start,
        [_reserved(50, at=reserved_at), _committed(Usage(40), 50, committed_at, reserved_at)],
    )
    for k in LINEAGE:
        acc = after[k]
        assert acc.held == 0
        assert acc.used_total == 40
        assert acc.used_month == 40
        assert acc.used_day == 0
        assert acc.day_start == date(2025, 3, 15)
    assert after[USER].available == 100


def test_commit_of_a_hold_from_an_earlier_month_is_charged_to_neither_period() -> None:
    """A hold reserved last month and committed this month counts only in used_total."""
    reserved_at = datetime(2025, 3, 31, 23, 59, tzinfo=UTC)
    committed_at = datetime(2025, 4, 1, 0, 1, tzinfo=UTC)
    after = fold(
        accounts_for(CONV),
        [_reserved(50, at=reserved_at), _committed(Usage(40), 50, committed_at, reserved_at)],
    )
    for k in LINEAGE:
        acc = after[k]
        assert (acc.held, acc.used_total, acc.used_day, acc.used_month) == (0, 40, 0, 0)
        assert (acc.day_start, acc.month_start) == (date(2025, 4, 1), date(2025, 4, 1))


def test_usage_recorded_charges_now_or_the_period_of_a_late_hold() -> None:
    """Plain usage is charged to now; late usage to the day/month the hold was placed in."""
    plain = UsageRecorded(key=USER, occurred_at=T0, usage=Usage(5, 5, 0))
    after = fold(accounts_for(USER), [plain])
    assert all(
        (a.held, a.used_total, a.used_day, a.used_month) == (0, 10, 10, 10) for a in after.values()
    )

    yesterday = T0 - timedelta(days=1)
    late = UsageRecorded(
        key=USER, occurred_at=T0, usage=Usage(7), reservation_id="r-1", reserved_at=yesterday
    )
    after = fold(after, [late])
    assert all((a.used_total, a.used_day, a.used_month) == (17, 10, 17) for a in after.values())


def test_evolve_reservation_follows_the_lifecycle() -> None:
    """TokensReserved creates a HELD reservation; endings set state, usage and ended_at."""
    res = evolve_reservation(None, replace(_reserved(100), labels=(("app", "chat"),)))
    assert res == Reservation(
        reservation_id="r-1",
        key=CONV,
        model="gpt-x",
        amount=100,
        state=State.HELD,
        created_at=T0,
        expires_at=T0 + timedelta(minutes=10),
        labels=(("app", "chat"),),
    )
    later = T0 + timedelta(seconds=30)
    committed = evolve_reservation(res, _committed(Usage(1, 2, 3), at=later))
    assert committed == replace(res, state=State.COMMITTED, usage=Usage(1, 2, 3), ended_at=later)

    rolled_back = evolve_reservation(
        res, ReservationRolledBack(key=CONV, occurred_at=later, reservation_id="r-1", amount=100)
    )
    assert rolled_back == replace(res, state=State.ROLLED_BACK, ended_at=later)

    expired = evolve_reservation(
        res, ReservationExpired(key=CONV, occurred_at=later, reservation_id="r-1", amount=100)
    )
    assert expired == replace(res, state=State.EXPIRED, ended_at=later)

    late = evolve_reservation(
        expired,
        UsageRecorded(
            key=CONV,
            occurred_at=later + timedelta(hours=1),
            usage=Usage(9),
            reservation_id="r-1",
            reserved_at=T0,
        ),
    )
    assert late == replace(expired, usage=Usage(9), late=True)


def test_evolve_reservation_ignores_events_about_no_reservation() -> None:
    """Plain usage and quota changes leave a reservation (or its absence) as it is."""
    res = held_reservation()
    plain = UsageRecorded(key=CONV, occurred_at=T0, usage=Usage(3))
    quota = QuotaSet(key=CONV, occurred_at=T0, limit=1, period=Period.NONE)
    assert evolve_reservation(res, plain) is res
    assert evolve_reservation(res, quota) is res
    assert evolve_reservation(None, plain) is None


# --- commit decisions ------------------------------------------------------------------------


def test_commit_of_a_held_reservation_yields_reservation_committed() -> None:
    """Committing a HELD reservation records the usage against its amount and creation time."""
    res = held_reservation(100)
    now = T0 + timedelta(seconds=20)
    events = decide(Snapshot(reservation=res), Commit("acme", "r-1", Usage(60, 30, 5)), ctx(now))
    assert events == [
        ReservationCommitted(
            key=CONV,
            occurred_at=now,
            actor="svc:api",
            trace_id="trace-1",
            model="gpt-x",
            reservation_id="r-1",
            amount=100,
            usage=Usage(60, 30, 5),
            reserved_at=T0,
        )
    ]


def test_repeated_commit_with_identical_usage_yields_no_events() -> None:
    """A retried commit with the same usage is a no-op (the caller replays the outcome)."""
    res = held_reservation(100, State.COMMITTED, usage=Usage(60, 30, 5))
    assert decide(Snapshot(reservation=res), Commit("acme", "r-1", Usage(60, 30, 5)), ctx()) == []


@pytest.mark.parametrize(
    ("usage", "field_name", "first", "now"),
    [
        (Usage(61, 30, 5), "input_tokens", 60, 61),
        (Usage(60, 31, 5), "output_tokens", 30, 31),
        (Usage(60, 30, 4), "cached_input_tokens", 5, 4),
        (Usage(0, 0, 0), "input_tokens", 60, 0),
    ],
)
def test_repeated_commit_with_different_usage_is_refused_naming_the_field(
    usage: Usage, field_name: str, first: int, now: int
) -> None:
    """A second commit with other usage raises ReservationEnded naming the first differing
    field with both values."""
    res = held_reservation(100, State.COMMITTED, usage=Usage(60, 30, 5))
    with pytest.raises(errors.ReservationEnded) as info:
        decide(Snapshot(reservation=res), Commit("acme", "r-1", usage), ctx())
    err = info.value
    assert err.state == "committed"
    assert err.reservation_id == "r-1"
    assert err.metadata() == {"state": "committed"}
    assert f"{field_name}={first}" in str(err)
    assert f"{field_name}={now}" in str(err)


def test_commit_of_a_rolled_back_reservation_is_refused() -> None:
    """A rolled-back reservation cannot be committed."""
    res = held_reservation(100, State.ROLLED_BACK)
    with pytest.raises(errors.ReservationEnded) as info:
        decide(Snapshot(reservation=res), Commit("acme", "r-1", Usage(1)), ctx())
    assert info.value.state == "rolled_back"
    assert "RecordUsage" in str(info.value)


def test_commit_of_an_expired_reservation_records_late_usage() -> None:
    """Committing an EXPIRED reservation without usage yields UsageRecorded tied to it."""
    res = held_reservation(100, State.EXPIRED)
    now = T0 + timedelta(hours=2)
    events = decide(Snapshot(reservation=res), Commit("acme", "r-1", Usage(40, 2, 0)), ctx(now))
    assert events == [
        UsageRecorded(
            key=CONV,
            occurred_at=now,
            actor="svc:api",
            trace_id="trace-1",
            model="gpt-x",
            usage=Usage(40, 2, 0),
            reservation_id="r-1",
            reserved_at=T0,
        )
    ]
    after = evolve_reservation(res, events[0])
    assert after is not None
    assert (after.state, after.usage, after.late) == (State.EXPIRED, Usage(40, 2, 0), True)


def test_repeated_late_commit_with_same_usage_yields_no_events() -> None:
    """A retried late commit with the same usage is a no-op; other usage is refused."""
    res = held_reservation(100, State.EXPIRED, usage=Usage(40, 2, 0), late=True)
    snap = Snapshot(reservation=res)
    assert decide(snap, Commit("acme", "r-1", Usage(40, 2, 0)), ctx()) == []
    with pytest.raises(errors.ReservationEnded) as info:
        decide(snap, Commit("acme", "r-1", Usage(40, 3, 0)), ctx())
    assert info.value.state == "expired"
    assert "output_tokens=2" in str(info.value)


@pytest.mark.parametrize(
    "cmd",
    [Commit("acme", "r-9", Usage(1)), Rollback("acme", "r-9"), Expire("acme", "r-9")],
    ids=["commit", "rollback", "expire"],
)
def test_commands_on_a_missing_reservation_raise_not_found(cmd: Commit | Rollback | Expire) -> None:
    """Without a reservation in the snapshot, a reservation command is ReservationNotFound."""
    with pytest.raises(errors.ReservationNotFound) as info:
        decide(Snapshot(), cmd, ctx())
    assert info.value.reservation_id == "r-9"


# --- rollback and expiry decisions ------------------------------------------------------------


def test_rollback_of_a_held_reservation_yields_rolled_back() -> None:
    """Rolling back a HELD reservation releases its whole amount, with the reason."""
    res = held_reservation(100)
    events = decide(Snapshot(reservation=res), Rollback("acme", "r-1", "client gone"), ctx())
    assert events == [
        ReservationRolledBack(
            key=CONV,
            occurred_at=T0,
            actor="svc:api",
            trace_id="trace-1",
            model="gpt-x",
            reservation_id="r-1",
            amount=100,
            reason="client gone",
        )
    ]


def test_repeated_rollback_yields_no_events() -> None:
    """Rolling back an already rolled-back reservation is a no-op."""
    res = held_reservation(100, State.ROLLED_BACK)
    assert decide(Snapshot(reservation=res), Rollback("acme", "r-1"), ctx()) == []


@pytest.mark.parametrize(
    "res",
    [
        held_reservation(100, State.COMMITTED, usage=Usage(5)),
        held_reservation(100, State.EXPIRED),
        held_reservation(100, State.EXPIRED, usage=Usage(5), late=True),
    ],
    ids=["committed", "expired", "expired_late"],
)
def test_rollback_of_a_committed_or_expired_reservation_is_refused(res: Reservation) -> None:
    """Only a held reservation can roll back: others raise ReservationEnded with their state."""
    with pytest.raises(errors.ReservationEnded) as info:
        decide(Snapshot(reservation=res), Rollback("acme", "r-1"), ctx())
    assert info.value.state == res.state.value


@pytest.mark.parametrize("overdue", [timedelta(0), timedelta(microseconds=1), timedelta(days=3)])
def test_expire_of_a_held_reservation_at_or_after_its_deadline(overdue: timedelta) -> None:
    """A HELD reservation expires once now >= expires_at (the deadline itself included)."""
    res = held_reservation(100)
    now = res.expires_at + overdue
    events = decide(Snapshot(reservation=res), Expire("acme", "r-1"), ctx(now))
    assert events == [
        ReservationExpired(
            key=CONV,
            occurred_at=now,
            actor="svc:api",
            trace_id="trace-1",
            model="gpt-x",
            reservation_id="r-1",
            amount=100,
        )
    ]


def test_expire_before_the_deadline_yields_no_events() -> None:
    """A HELD reservation not yet due is left alone."""
    res = held_reservation(100)
    now = res.expires_at - timedelta(microseconds=1)
    assert decide(Snapshot(reservation=res), Expire("acme", "r-1"), ctx(now)) == []


@pytest.mark.parametrize("state", [State.COMMITTED, State.ROLLED_BACK, State.EXPIRED])
def test_expire_of_an_ended_reservation_yields_no_events(state: State) -> None:
    """Expire only ever ends HELD reservations; any ended one is left alone, however late."""
    res = held_reservation(100, state, usage=Usage(1) if state is State.COMMITTED else None)
    now = res.expires_at + timedelta(days=1)
    assert decide(Snapshot(reservation=res), Expire("acme", "r-1"), ctx(now)) == []


# --- commit_outcome ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "usage", "late", "committed", "released", "overage"),
    [
        (100, Usage(40, 20, 0), False, 60, 40, 0),
        (100, Usage(50, 30, 20), False, 100, 0, 0),
        (100, Usage(100, 40, 10), False, 100, 0, 50),
        (100, Usage(), False, 0, 100, 0),
        (100, Usage(40, 20, 0), True, 60, 0, 0),
        (100, Usage(100, 40, 10), True, 100, 0, 50),
    ],
    ids=["under", "exact", "overage", "zero", "late_under", "late_overage"],
)
def test_commit_outcome_figures(
    amount: int, usage: Usage, late: bool, committed: int, released: int, overage: int
) -> None:
    """committed=min(total, amount); released=amount-committed (0 when late);
    overage=max(0, total-amount)."""
    state = State.EXPIRED if late else State.COMMITTED
    res = held_reservation(amount, state, usage=usage, late=late)
    balance = Account(USER, limit=1000, used_total=usage.total)
    out = commit_outcome(res, balance)
    assert (out.committed, out.released, out.overage) == (committed, released, overage)
    assert out.late is late
    assert out.reservation is res
    assert out.balance is balance


# --- codec ------------------------------------------------------------------------------------

NOW = datetime(2025, 3, 14, 12, 30, 15, 654321, tzinfo=UTC)
COMMON: dict[str, Any] = {
    "key": CONV,
    "occurred_at": NOW,
    "actor": "svc:api",
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "idempotency_key": "idem-ü-1",
    "model": "gpt-x",
}

EVENTS: list[Event] = [
    QuotaSet(**{**COMMON, "key": USER}, limit=1_000_000, period=Period.MONTH),
    QuotaSet(**{**COMMON, "key": TENANT}, limit=None, period=Period.NONE),
    QuotaSet(**COMMON, limit=0, period=Period.DAY),
    TokensReserved(
        **COMMON,
        reservation_id="r-1",
        amount=500,
        expires_at=NOW + timedelta(seconds=600),
        labels=(("app", "chat"), ("team", "search")),
        requested=800,
    ),
    TokensReserved(
        **{**COMMON, "key": USER}, reservation_id="r-2", amount=1, expires_at=NOW, labels=()
    ),
    ReservationCommitted(
        **COMMON,
        reservation_id="r-1",
        amount=500,
        usage=Usage(300, 250, 40),
        reserved_at=NOW - timedelta(seconds=3, microseconds=7),
    ),
    ReservationRolledBack(**COMMON, reservation_id="r-1", amount=500, reason="client gone"),
    ReservationRolledBack(**COMMON, reservation_id="r-1", amount=500),
    ReservationExpired(**COMMON, reservation_id="r-1", amount=500),
    UsageRecorded(**COMMON, usage=Usage(1, 2, 3)),
    UsageRecorded(
        **COMMON,
        usage=Usage(10, 0, 5),
        reservation_id="r-1",
        reserved_at=NOW - timedelta(days=1),
    ),
    QuotaSet(
        **COMMON,
        limit=5_000,
        period=Period.ROLLING,
        window_hours=5,
        time_zone="Asia/Tokyo",
        soft_limit_percent=80,
        grant_order=GrantOrder.GRANTS_FIRST,
    ),
    TokensGranted(
        **COMMON, grant_id="g-1", amount=900, expires_at=NOW + timedelta(days=30), reason="promo"
    ),
    TokensGranted(**COMMON, grant_id="g-2", amount=1, expires_at=None, reason=""),
    BalanceAdjusted(**COMMON, tokens=-250, reason="refund for a failed call"),
    BalanceAdjusted(**COMMON, tokens=40, reason="unrecorded usage"),
    RateLimitSet(**COMMON, tokens_per_minute=90_000, requests_per_minute=0),
    BudgetAlertsSet(**COMMON, thresholds_percent=(50, 80, 100)),
    BudgetThresholdCrossed(**COMMON, threshold_percent=80, used=812, capacity=1_000),
    PriceSet(
        **COMMON,
        currency="EUR",
        effective_from=NOW + timedelta(hours=2),
        input_per_mtok=2_500_000,
        output_per_mtok=10_000_000,
        cached_input_per_mtok=1_250_000,
    ),
    TokensReserved(**COMMON, reservation_id="r-3", amount=10, expires_at=NOW, labels=(), money=125),
    ReservationCommitted(
        **COMMON,
        reservation_id="r-3",
        amount=10,
        usage=Usage(4, 5, 0),
        reserved_at=NOW,
        money=125,
        cost=61,
    ),
    ReservationCommitted(
        **COMMON, reservation_id="r-4", amount=10, usage=Usage(4, 5, 0), reserved_at=NOW, cost=0
    ),
    ReservationRolledBack(**COMMON, reservation_id="r-3", amount=10, money=125),
    ReservationExpired(**COMMON, reservation_id="r-3", amount=10, money=125),
    UsageRecorded(**COMMON, usage=Usage(1, 2, 3), cost=9),
    QuotaSet(**COMMON, limit=None, period=Period.MONTH, money_limit=50_000_000),
    TokensGranted(**COMMON, grant_id="g-3", amount=0, expires_at=None, reason="", money=7),
    BalanceAdjusted(**COMMON, tokens=0, reason="refund", money=-3_000),
    BudgetThresholdCrossed(
        **COMMON, threshold_percent=50, used=600, capacity=1_000, currency="USD"
    ),
]


def test_every_event_type_has_a_round_trip_case() -> None:
    """The round-trip cases below include every registered event type."""
    assert {type(e).__name__ for e in EVENTS} == set(codec.EVENT_TYPES)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_event_round_trips_through_its_row(event: Event) -> None:
    """event_from_row(event_row(e)) == e, field by field, for every event type."""
    row = codec.event_row(event, 7, codec.GENESIS_HASH)
    back = codec.event_from_row(row)
    assert type(back) is type(event)
    assert back == event
    assert row["version"] == 7
    assert row["prev_hash"] == codec.GENESIS_HASH
    assert row["hash"] == codec.event_hash(row, codec.GENESIS_HASH)
    assert len(row["hash"]) == 32


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_event_round_trips_through_a_stored_row(event: Event) -> None:
    """A row as read back from the table (datetime occurred_at, JSON data) gives the same event
    and the same hash."""
    row = codec.event_row(event, 1, codec.GENESIS_HASH)
    stored = {
        **row,
        "occurred_at": event.occurred_at.astimezone(timezone(timedelta(hours=-7))),
        "data": json.loads(json.dumps(row["data"])),
        "position": 12345,
    }
    assert codec.event_from_row(stored) == event
    assert codec.event_hash(stored, codec.GENESIS_HASH) == row["hash"]


def _other(column: str, value: Any) -> Any:
    """A different value of the same kind for a hashed column."""
    if column == "occurred_at":
        return codec.ts(codec.parse_ts(value) + timedelta(microseconds=1))
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "extra": 1}
    raise AssertionError(f"no mutation for {column}={value!r}")


HASH_ROW_EVENT = ReservationCommitted(
    **COMMON,
    reservation_id="r-1",
    amount=500,
    usage=Usage(300, 250, 40),
    reserved_at=NOW - timedelta(seconds=3),
)


@pytest.mark.parametrize("column", codec.HASHED_COLUMNS)
def test_event_hash_changes_when_any_hashed_column_changes(column: str) -> None:
    """Changing any one hashed column changes the hash."""
    row = codec.event_row(HASH_ROW_EVENT, 3, codec.GENESIS_HASH)
    changed = {**row, column: _other(column, row[column])}
    assert changed[column] != row[column]
    assert codec.event_hash(changed, codec.GENESIS_HASH) != row["hash"]


@pytest.mark.parametrize(
    ("index", "changes"),
    [
        (0, {"limit": 1_000_001}),
        (0, {"limit": None}),
        (0, {"period": Period.DAY}),
        (3, {"expires_at": NOW + timedelta(seconds=601)}),
        (3, {"labels": (("app", "chat"),)}),
        (3, {"labels": (("app", "chat"), ("team", "ads"))}),
        (5, {"reserved_at": NOW}),
        (5, {"usage": Usage(300, 250, 41)}),
        (6, {"reason": "other"}),
        (10, {"reserved_at": None}),
        (10, {"reservation_id": ""}),
        (9, {"key": AccountKey("acme", "alice", "c2")}),
        (9, {"key": AccountKey("acme", "alicec1")}),
        (9, {"actor": "svc:other"}),
    ],
    ids=lambda v: str(v) if isinstance(v, int) else "-".join(v),
)
def test_event_hash_changes_when_an_event_field_changes(
    index: int, changes: dict[str, Any]
) -> None:
    """Every event field reaches the hash, including the ones kept in `data`."""
    original = EVENTS[index]
    changed = replace(original, **changes)
    assert changed != original
    before = codec.event_row(original, 1, codec.GENESIS_HASH)["hash"]
    after = codec.event_row(changed, 1, codec.GENESIS_HASH)["hash"]
    assert before != after


def test_event_hash_depends_on_prev_hash_and_chains() -> None:
    """The same row hashes differently after a different predecessor; rows chain by hash."""
    first = codec.event_row(EVENTS[3], 1, codec.GENESIS_HASH)
    second = codec.event_row(EVENTS[5], 2, first["hash"])
    assert second["prev_hash"] == first["hash"]
    assert second["hash"] == codec.event_hash(second, first["hash"])
    other_prev = bytes(31) + b"\x01"
    assert codec.event_hash(second, other_prev) != second["hash"]
    assert codec.event_row(EVENTS[5], 2, other_prev)["hash"] != second["hash"]
    assert codec.event_row(EVENTS[5], 3, first["hash"])["hash"] != second["hash"]


def test_event_hash_ignores_columns_the_database_assigns() -> None:
    """position, xid, recorded_at and the stored hashes themselves are not hashed."""
    row = codec.event_row(EVENTS[5], 2, codec.GENESIS_HASH)
    extra = {**row, "position": 99, "xid": 123, "recorded_at": "x", "hash": b"", "prev_hash": b""}
    assert codec.event_hash(extra, codec.GENESIS_HASH) == row["hash"]


@pytest.mark.parametrize(
    "acc",
    [
        Account(TENANT),
        Account(USER, limit=1000, period=Period.DAY, held=5, used_total=9, used_day=3),
        Account(
            CONV,
            limit=10**15,
            period=Period.MONTH,
            held=1,
            used_total=700,
            used_day=20,
            day_start=date(2024, 12, 31),
            used_month=300,
            month_start=date(2024, 12, 1),
        ),
    ],
    ids=["tenant_empty", "user_day", "conversation_month"],
)
def test_account_json_round_trips(acc: Account) -> None:
    """account_from_json(account_to_json(a)) == a, also through real JSON text."""
    obj = codec.account_to_json(acc)
    assert codec.account_from_json(obj) == acc
    assert codec.account_from_json(json.loads(json.dumps(obj))) == acc


@pytest.mark.parametrize(
    "res",
    [
        held_reservation(100),
        held_reservation(100, State.COMMITTED, usage=Usage(1, 2, 3)),
        held_reservation(100, State.ROLLED_BACK),
        held_reservation(100, State.EXPIRED, usage=Usage(0, 0, 9), late=True),
        replace(
            held_reservation(5, created_at=NOW),
            key=TENANT,
            labels=(("a", "1"), ("b", "")),
        ),
    ],
    ids=["held", "committed", "rolled_back", "expired_late", "tenant_labels"],
)
def test_reservation_json_round_trips(res: Reservation) -> None:
    """reservation_from_json(reservation_to_json(r)) == r, also through real JSON text."""
    obj = codec.reservation_to_json(res)
    assert codec.reservation_from_json(obj) == res
    assert codec.reservation_from_json(json.loads(json.dumps(obj))) == res


# --- property: folding commands never overdraws -----------------------------------------------

CONV_B = AccountKey("acme", "alice", "c2")
PROP_KEYS = (USER, CONV, CONV_B)

step = st.one_of(
    st.tuples(st.just("reserve"), st.sampled_from(PROP_KEYS), st.integers(0, 120)),
    st.tuples(st.just("commit"), st.integers(0, 30), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("rollback"), st.integers(0, 30)),
    st.tuples(st.just("wait"), st.integers(0, 60 * 60 * 30)),
)


@settings(max_examples=300, deadline=None)
@given(
    user_limit=st.integers(0, 300),
    tenant_limit=st.none() | st.integers(0, 400),
    period=st.sampled_from(list(Period)),
    steps=st.lists(step, max_size=40),
)
def test_folding_commands_never_exceeds_the_limit_or_goes_negative(
    user_limit: int, tenant_limit: int | None, period: Period, steps: list[tuple[Any, ...]]
) -> None:
    """With usage never above its hold, held + used stays within every limit and held >= 0."""
    now = datetime(2025, 3, 31, 20, 0, tzinfo=UTC)  # near a day and a month boundary
    accounts: dict[AccountKey, Account] = {}
    for k in {k for key in PROP_KEYS for k in key.lineage()}:
        accounts[k] = Account(k)
    setup = [
        QuotaSet(key=USER, occurred_at=now, limit=user_limit, period=period),
        QuotaSet(key=TENANT, occurred_at=now, limit=tenant_limit, period=period),
    ]
    accounts = fold(accounts, setup)
    reservations: list[Reservation] = []

    for n, op in enumerate(steps):
        kind = op[0]
        if kind == "wait":
            now += timedelta(seconds=op[1])
            continue
        if kind == "reserve":
            cmd: Reserve | Commit | Rollback = Reserve(f"i{n}", op[1], "m", op[2], 86_400)
            snap = Snapshot(accounts={k: accounts[k] for k in op[1].lineage()})
        else:
            if not reservations:
                continue
            res = reservations[op[1] % len(reservations)]
            if kind == "commit":
                total = int(op[2] * res.amount)
                input_tokens = int(op[3] * total)
                usage = Usage(input_tokens, total - input_tokens, 0)
                cmd = Commit("acme", res.reservation_id, usage)
            else:
                cmd = Rollback("acme", res.reservation_id)
            snap = Snapshot(accounts={k: accounts[k] for k in res.key.lineage()}, reservation=res)
        try:
            events = decide(snap, cmd, Context(now=now, new_id=f"r{n}"))
        except (errors.BudgetExhausted, errors.ReservationEnded):
            continue
        accounts = fold(accounts, events)
        for event in events:
            rid = getattr(event, "reservation_id", "")
            found = [i for i, r in enumerate(reservations) if r.reservation_id == rid]
            current = reservations[found[0]] if found else None
            after = evolve_reservation(current, event)
            assert after is not None
            if found:
                reservations[found[0]] = after
            else:
                reservations.append(after)

        for k, acc in accounts.items():
            acc = acc.rolled(now)
            assert acc.held >= 0, (k, acc)
            if acc.limit is not None:
                assert acc.held + acc.used <= acc.limit, (k, acc)
        live = [r for r in reservations if r.state is State.HELD]
        assert accounts[TENANT].held == sum(r.amount for r in live)
        assert accounts[USER].held == sum(r.amount for r in live)
        charged = sum(r.usage.total for r in reservations if r.usage is not None)
        assert accounts[TENANT].used_total == charged


def test_money_and_tokens_keep_their_own_crossed_thresholds_and_a_new_set_prunes_both() -> None:
    key = AccountKey("acme", "u")
    acc = Account(key, limit=1_000, period=Period.DAY, day_start=DAY0, month_start=MONTH0)
    acc = acc.with_(money=acc.money_side().with_(limit=1_000))
    common = {"key": key, "occurred_at": T0}
    for event in (
        BudgetThresholdCrossed(**common, threshold_percent=50, used=6, capacity=10, currency="EUR"),
        BudgetThresholdCrossed(**common, threshold_percent=80, used=9, capacity=10, currency="EUR"),
        BudgetThresholdCrossed(**common, threshold_percent=50, used=500, capacity=1_000),
    ):
        acc = evolve_account(acc, event)
    assert acc.alerts_fired == (50,)
    assert acc.money is not None and acc.money.alerts_fired == (50, 80)
    acc = evolve_account(acc, BudgetAlertsSet(**common, thresholds_percent=(80, 100)))
    assert acc.alerts_fired == ()
    assert acc.money is not None and acc.money.alerts_fired == (80,)
