"""A verification's quick fold equals the reference fold, field by field (the derived
`window_start_hour` included), on random accounts and events: domain.quick_evolve_account
and evolve_account, quick_add_to_bucket and _add_to_bucket, usage.quick_add_usage and
add_usage, replay.QuickProjection and Projection. Accounts span time zones whose hours cross
two days, month ends, grants (the quick path hands those to the reference), money sides,
fired alerts, hourly buckets in and out of the window; events come out of order and charge
earlier hours."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.domain import (
    _add_to_bucket,
    evolve_account,
    evolve_reservation,
    quick_add_to_bucket,
    quick_evolve_account,
    quick_evolve_reservation,
    step_of,
)
from ledger.model import (
    Account,
    AccountKey,
    BalanceAdjusted,
    Event,
    Grant,
    GrantOrder,
    Period,
    QuotaSet,
    ReservationCommitted,
    ReservationExpired,
    ReservationRolledBack,
    TokensGranted,
    TokensReserved,
    Usage,
    UsageRecorded,
    hour_of,
)
from ledger.replay import Projection, QuickProjection
from ledger.usage import UsageCounters, UsageKey, add_usage, quick_add_usage

START = datetime(2026, 3, 28, 21, 40, tzinfo=UTC)  # a month's end, and a DST change near
START_HOUR = hour_of(START)
ZONES = ("UTC", "Asia/Kathmandu", "America/New_York", "Australia/Lord_Howe")
KEYS = (AccountKey("t"), AccountKey("t", "u1"), AccountKey("t", "u1", "c1"), AccountKey("t", "u2"))

_times = st.integers(-3 * 86_400, 10 * 86_400).map(lambda s: START + timedelta(seconds=s))
_days = st.integers(-40, 40).map(lambda d: START.date() + timedelta(days=d))
_money = st.none() | st.integers(-5_000, 20_000)
_recent = st.lists(st.tuples(st.integers(START_HOUR - 400, START_HOUR + 300),
                             st.integers(-500, 5_000)),
                   max_size=6, unique_by=lambda b: b[0]).map(sorted).map(tuple)  # fmt: skip
_grants = st.lists(
    st.builds(Grant, st.none() | _times, st.sampled_from(["g1", "g2"]), st.integers(0, 3_000)),
    max_size=2,
).map(tuple)


def _account(key: AccountKey, money: Account | None, grants: bool) -> st.SearchStrategy[Account]:
    return st.builds(
        Account,
        key=st.just(key),
        limit=st.none() | st.integers(0, 10**6),
        period=st.sampled_from(list(Period)),
        window_hours=st.integers(0, 200),
        time_zone=st.sampled_from(ZONES),
        soft_limit_percent=st.integers(0, 100),
        grant_order=st.sampled_from(list(GrantOrder)),
        held=st.integers(-1_000, 10**5),
        used_total=st.integers(0, 10**6),
        used_day=st.integers(0, 10**5),
        day_start=_days,
        used_month=st.integers(0, 10**5),
        month_start=_days.map(lambda d: d.replace(day=1)) | _days,
        recent=_recent,
        grants=_grants if grants else st.just(()),
        alert_thresholds=st.just((50, 90)),
        alerts_fired=st.sampled_from([(), (50,), (50, 90)]),
        alerts_period=st.sampled_from([date(1970, 1, 1)]) | _days,
        money=st.just(money),
        window_start_hour=st.integers(START_HOUR - 300, START_HOUR + 300),
    )


@st.composite
def accounts(draw: st.DrawFn, key: AccountKey = KEYS[2]) -> Account:
    grants = draw(st.integers(0, 9)) == 0
    money = draw(st.none() | _account(key, None, grants))
    return draw(_account(key, money, grants))


@st.composite
def events(draw: st.DrawFn, key: AccountKey = KEYS[2]) -> Event:
    at, earlier = draw(_times), draw(_times)
    money, cost = draw(_money), draw(_money)
    usage = Usage(*draw(st.tuples(*[st.integers(0, 900)] * 3)))
    amount, rid, model = draw(st.integers(0, 2_000)), draw(st.sampled_from(["r1", "r2"])), "m"
    common: dict[str, Any] = {"key": key, "occurred_at": at}
    choices: list[Event] = [
        TokensReserved(**common, model=model, reservation_id=rid, amount=amount,
                       expires_at=at + timedelta(minutes=5), money=money),
        ReservationCommitted(**common, model=model, reservation_id=rid, amount=amount,
                             usage=usage, reserved_at=earlier, money=money, cost=cost),
        ReservationRolledBack(**common, reservation_id=rid, amount=amount, money=money),
        ReservationExpired(**common, reservation_id=rid, amount=amount, money=money),
        UsageRecorded(**common, model=model, usage=usage, reservation_id=draw(
            st.sampled_from(["", rid])), reserved_at=draw(st.none() | st.just(earlier)),
            cost=cost),
        BalanceAdjusted(**common, tokens=draw(st.integers(-900, 900)), reason="", money=money),
        QuotaSet(**common, limit=draw(st.none() | st.integers(0, 10**5)),
                 period=draw(st.sampled_from(list(Period))), time_zone=draw(st.sampled_from(ZONES)),
                 money_limit=draw(st.none() | st.integers(0, 10**6))),
        TokensGranted(**common, grant_id=rid, amount=amount, expires_at=at + timedelta(hours=2),
                      reason="", money=money),
    ]  # fmt: skip
    return draw(st.sampled_from(choices))


def fields_of(acc: Account) -> dict[str, Any]:
    """Every field, those left out of == included, the money side's too."""
    out = dict(vars(acc))
    if acc.money is not None:
        out["money"] = fields_of(acc.money)
    return out


@settings(max_examples=300, deadline=None)
@given(accounts(), events())
def test_an_account_evolves_by_the_quick_path_as_by_evolve_account(
    acc: Account, event: Event
) -> None:
    assert fields_of(quick_evolve_account(acc, event, step_of(event))) == fields_of(
        evolve_account(acc, event)
    )


@settings(deadline=None)
@given(_recent, st.integers(START_HOUR - 400, START_HOUR + 400), st.integers(-500, 500))
def test_a_bucket_is_added_by_the_quick_path_as_by_the_reference(
    recent: tuple[tuple[int, int], ...], hour: int, tokens: int
) -> None:
    assert quick_add_to_bucket(recent, hour, tokens) == _add_to_bucket(recent, hour, tokens)


@settings(deadline=None)
@given(st.lists(events(), max_size=12))
def test_usage_adds_up_by_the_quick_path_as_by_add_usage(log: list[Event]) -> None:
    quick: dict[UsageKey, UsageCounters] = {}
    reference: dict[UsageKey, UsageCounters] = {}
    for event in log:
        quick_add_usage(quick, event)
        add_usage(reference, event)
    assert quick == reference


@st.composite
def logs(draw: st.DrawFn) -> list[Event]:
    return [draw(events(draw(st.sampled_from(KEYS)))) for _ in range(draw(st.integers(0, 25)))]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from(KEYS[1:]), unique=True, max_size=3).flatmap(
        lambda keys: st.tuples(*[accounts(k) for k in keys])
    ),
    logs(),
    st.booleans(),
)
def test_a_quick_projection_folds_a_log_as_a_projection(
    seeds: tuple[Account, ...], log: list[Event], users_only: bool
) -> None:
    """From seeded accounts (some with buckets out of hour order, as a tampered checkpoint
    row could give), with or without the tenant's account kept."""
    keep = (lambda k: bool(k.user_id)) if users_only else (lambda k: True)
    quick, reference = QuickProjection(keep=keep), Projection(keep=keep)
    for acc in seeds:
        if acc.key.user_id == "u2" and len(acc.recent) > 1:  # out of order
            acc = acc.with_(recent=acc.recent[::-1])
        quick.seed(acc)
        reference.seed(acc)
    for event in log:
        quick.feed(event)
        reference.feed(event)
    assert {k: fields_of(a) for k, a in quick.accounts.items()} == {
        k: fields_of(a) for k, a in reference.accounts.items()
    }
    assert quick.reservations == reference.reservations
    assert quick.rate_limits == reference.rate_limits


_holds = st.builds(
    TokensReserved,
    key=st.just(KEYS[2]),
    occurred_at=_times,
    model=st.just("m"),
    reservation_id=st.sampled_from(["r1", "r2"]),
    amount=st.integers(0, 2_000),
    expires_at=_times,
    labels=st.just((("k", "v"),)) | st.just(()),
    money=_money,
)


@settings(deadline=None)
@given(_holds, events())
def test_a_reservation_evolves_by_the_quick_path_as_by_evolve_reservation(
    hold: TokensReserved, event: Event
) -> None:
    assert quick_evolve_reservation(None, hold) == evolve_reservation(None, hold)
    res = evolve_reservation(None, hold)
    assert quick_evolve_reservation(res, event) == evolve_reservation(res, event)
