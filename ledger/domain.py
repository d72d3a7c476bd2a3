"""The pure ledger: decide(snapshot, command, context) -> events; evolve(state, event) -> state.

No I/O, no clock, no ids: the store passes in what it locked, and the context carries the time
and a fresh id. The store's projections and an audit's rebuild both use these same functions,
so a balance rebuilt from the log equals the live one by construction.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any, TypedDict

from ledger import errors, limits
from ledger.model import (
    EPOCH,
    EPOCH_DAY,
    Account,
    AccountKey,
    AdjustBalance,
    BalanceAdjusted,
    BudgetAlertsSet,
    BudgetThresholdCrossed,
    Commit,
    CommitResult,
    Context,
    Event,
    Expire,
    Grant,
    GrantOrder,
    GrantTokens,
    Period,
    PriceEntry,
    PriceSet,
    QuotaSet,
    RateLimit,
    RateLimitKey,
    RateLimitSet,
    RecordUsage,
    Reservation,
    ReservationCommitted,
    ReservationExpired,
    ReservationRolledBack,
    Reserve,
    Rollback,
    SetBudgetAlerts,
    SetPrices,
    SetQuota,
    SetRateLimit,
    SoftLimitWarning,
    State,
    TokensGranted,
    TokensReserved,
    Usage,
    UsageRecorded,
    day_of,
    hour_of,
    rolling_window_hours_max,
)
from ledger.money import (
    HoldPricing,
    Price,
    PricePoint,
    point_of,
    price_at,
    prices_during,
    with_point,
)

MINUTE_US = 60_000_000


@dataclass(frozen=True)
class Snapshot:
    """What a decision may look at: the locked accounts of the command's lineage (tenant first)
    and, for commands on a reservation, that reservation."""

    accounts: dict[AccountKey, Account] = field(default_factory=dict)
    reservation: Reservation | None = None
    rate_limits: dict[RateLimitKey, RateLimit] = field(default_factory=dict)
    prices: dict[str, tuple[PricePoint, ...]] = field(default_factory=dict)
    """The price points of the command's models, oldest first."""
    currency: str = ""
    """The tenant's currency: that of its prices ("" while it has none)."""
    held_until: dict[str, datetime] = field(default_factory=dict)
    """For SetPrices: when the last live hold on each model expires (absent: none is live)."""


Decidable = (
    Reserve
    | Commit
    | Rollback
    | SetQuota
    | RecordUsage
    | Expire
    | GrantTokens
    | AdjustBalance
    | SetRateLimit
    | SetBudgetAlerts
    | SetPrices
)


class _Meta(TypedDict):
    occurred_at: datetime
    actor: str
    trace_id: str


def decide(snap: Snapshot, cmd: Decidable, ctx: Context) -> list[Event]:
    """The events that carry out `cmd`, or a LedgerError. An empty list means the command
    repeats one already applied: the caller returns the recorded outcome."""
    meta = _Meta(occurred_at=ctx.now, actor=ctx.actor, trace_id=ctx.trace_id)
    decider: Callable[[Snapshot, Any, Context, _Meta], list[Event]] = _DECIDERS[type(cmd)]
    return decider(snap, cmd, ctx, meta)


def _decide_reserve(snap: Snapshot, cmd: Reserve, ctx: Context, meta: _Meta) -> list[Event]:
    expires_at = ctx.now + timedelta(seconds=cmd.ttl_s)
    pricing = hold_pricing(snap.prices.get(cmd.model, ()), ctx.now, expires_at, cmd.prompt_tokens)
    amount = _grantable(snap, cmd, ctx.now, pricing)
    return [
        TokensReserved(
            key=cmd.key,
            model=cmd.model,
            idempotency_key=cmd.idempotency_key,
            reservation_id=ctx.new_id,
            amount=amount,
            requested=cmd.amount,
            expires_at=expires_at,
            labels=cmd.labels,
            money=None if pricing is None else pricing.bound(amount),
            **meta,
        )
    ]


def hold_pricing(
    points: tuple[PricePoint, ...], now: datetime, expires_at: datetime, prompt_tokens: int
) -> HoldPricing | None:
    """How a hold placed now is priced in money (None: the model has no price now)."""
    if price_at(points, now) is None:
        return None
    return HoldPricing.over(prices_during(points, now, expires_at), prompt_tokens)


def cost_at(points: tuple[PricePoint, ...], at: datetime, usage: Usage) -> int | None:
    """What `usage` costs at the price in force at `at` (None: no price then)."""
    point = price_at(points, at)
    return None if point is None else point.price.cost(usage)


def _decide_set_quota(snap: Snapshot, cmd: SetQuota, ctx: Context, meta: _Meta) -> list[Event]:
    return [
        QuotaSet(
            key=cmd.key,
            idempotency_key=cmd.idempotency_key,
            limit=cmd.limit,
            period=cmd.period,
            window_hours=cmd.window_hours,
            time_zone=cmd.time_zone,
            soft_limit_percent=cmd.soft_limit_percent,
            grant_order=cmd.grant_order,
            money_limit=cmd.money_limit,
            **meta,
        )
    ]


def _decide_set_prices(snap: Snapshot, cmd: SetPrices, ctx: Context, meta: _Meta) -> list[Event]:
    """All the prices, or a refusal of the first that cannot be set (then none is)."""
    book, currency = dict(snap.prices), snap.currency
    events: list[Event] = []
    for i, entry in enumerate(cmd.prices):
        points = book.get(entry.model, ())
        at = _price_start(points, currency, snap.held_until.get(entry.model), entry, i, ctx.now)
        event = PriceSet(
            key=AccountKey(cmd.tenant_id),
            idempotency_key=cmd.idempotency_key,
            model=entry.model,
            currency=entry.currency,
            effective_from=at,
            input_per_mtok=entry.input_per_mtok,
            output_per_mtok=entry.output_per_mtok,
            cached_input_per_mtok=entry.cached_input_per_mtok,
            **meta,
        )
        events.append(event)
        currency = entry.currency
        book[entry.model] = with_point(points, point_of(event))
    return events


def _price_of(entry: PriceEntry) -> Price:
    return Price(entry.input_per_mtok, entry.output_per_mtok, entry.cached_input_per_mtok)


def _price_start(
    points: tuple[PricePoint, ...],
    currency: str,
    held_until: datetime | None,
    entry: PriceEntry,
    index: int,
    now: datetime,
) -> datetime:
    """When the price `entry` takes effect, or why it cannot be set. A price takes effect
    now or later, never earlier (costs already charged stay as they were). A rise takes
    effect no sooner than the last live hold on the model expires: those holds were priced
    without it, and their bound must hold until they end."""
    at = entry.effective_from or now
    if at < now:
        past = f"is {at.isoformat()}, in the past; a price takes effect now or later"
        field_name = f"prices[{index}].effective_from"
        raise errors.InvalidArgument([errors.FieldViolation(field_name, past)])
    if currency and entry.currency != currency:
        raise errors.PriceRefused(
            f"prices[{index}]: the tenant is billed in {currency}; its prices are all in one "
            f"currency, so a price in {entry.currency} cannot be set",
            currency=currency,
        )
    rises = any(_price_of(entry).rises_from(p) for p in prices_during(points, now, at))
    if held_until is not None and at < held_until and rises:
        raise errors.PriceRefused(
            f"prices[{index}] raises the price of {entry.model!r} from {at.isoformat()}, while "
            f"holds priced without the rise are live until {held_until.isoformat()}; set "
            f"effective_from to that time or later (a lower price may apply at once)",
            earliest=held_until.isoformat(),
        )
    return at


def _decide_grant(snap: Snapshot, cmd: GrantTokens, ctx: Context, meta: _Meta) -> list[Event]:
    if cmd.expires_at is not None and cmd.expires_at <= ctx.now:
        future = f"is {cmd.expires_at.isoformat()}; must be in the future"
        raise errors.InvalidArgument([errors.FieldViolation("expires_at", future)])
    return [
        TokensGranted(
            key=cmd.key,
            idempotency_key=cmd.idempotency_key,
            grant_id=ctx.new_id,
            amount=cmd.amount,
            expires_at=cmd.expires_at,
            reason=cmd.reason,
            money=cmd.money,
            **meta,
        )
    ]


def _decide_adjust(snap: Snapshot, cmd: AdjustBalance, ctx: Context, meta: _Meta) -> list[Event]:
    return [
        BalanceAdjusted(
            key=cmd.key,
            idempotency_key=cmd.idempotency_key,
            tokens=cmd.tokens,
            reason=cmd.reason,
            money=cmd.money,
            **meta,
        )
    ]


def _decide_rate_limit(snap: Snapshot, cmd: SetRateLimit, ctx: Context, meta: _Meta) -> list[Event]:
    return [
        RateLimitSet(
            key=cmd.key,
            model=cmd.model,
            idempotency_key=cmd.idempotency_key,
            tokens_per_minute=cmd.tokens_per_minute,
            requests_per_minute=cmd.requests_per_minute,
            **meta,
        )
    ]


def _decide_alerts(snap: Snapshot, cmd: SetBudgetAlerts, ctx: Context, meta: _Meta) -> list[Event]:
    return [
        BudgetAlertsSet(
            key=cmd.key,
            idempotency_key=cmd.idempotency_key,
            thresholds_percent=cmd.thresholds_percent,
            **meta,
        )
    ]


def threshold_crossings(acc: Account, ctx: Context, currency: str = "") -> list[Event]:
    """The budget alerts `acc` has reached and not yet logged in its period, lowest first: of
    its tokens, then of its money budget (in `currency`, the tenant's), each by the account's
    thresholds."""
    if not acc.alert_thresholds:
        return []
    meta = _Meta(occurred_at=ctx.now, actor=ctx.actor, trace_id=ctx.trace_id)
    budgets = [(acc, None)] if acc.money is None else [(acc, None), (acc.money, currency)]
    return [
        BudgetThresholdCrossed(
            key=acc.key,
            threshold_percent=t,
            used=budget.used,
            capacity=(budget.limit or 0) + budget.granted,
            currency=unit,
            **meta,
        )
        for budget, unit in budgets
        if (spent := budget.percent_spent) is not None
        for t in acc.alert_thresholds
        if t <= spent and t not in budget.alerts_fired
    ]


def _decide_usage(snap: Snapshot, cmd: RecordUsage, ctx: Context, meta: _Meta) -> list[Event]:
    return [
        UsageRecorded(
            key=cmd.key,
            model=cmd.model,
            idempotency_key=cmd.idempotency_key,
            usage=cmd.usage,
            cost=cost_at(snap.prices.get(cmd.model, ()), ctx.now, cmd.usage),
            **meta,
        )
    ]


def _decide_rollback(snap: Snapshot, cmd: Rollback, ctx: Context, meta: _Meta) -> list[Event]:
    res = _reservation(snap, cmd.tenant_id, cmd.reservation_id)
    if res.state is State.ROLLED_BACK:
        return []
    if res.state is not State.HELD:
        raise errors.ReservationEnded(
            res.reservation_id, res.state.value, "only a held reservation can roll back"
        )
    return [
        ReservationRolledBack(
            key=res.key,
            model=res.model,
            reservation_id=res.reservation_id,
            amount=res.amount,
            reason=cmd.reason,
            money=res.money or None,
            **meta,
        )
    ]


def _decide_expire(snap: Snapshot, cmd: Expire, ctx: Context, meta: _Meta) -> list[Event]:
    res = _reservation(snap, cmd.tenant_id, cmd.reservation_id)
    if res.state is not State.HELD or ctx.now < res.expires_at:
        return []
    return [
        ReservationExpired(
            key=res.key,
            model=res.model,
            reservation_id=res.reservation_id,
            amount=res.amount,
            money=res.money or None,
            **meta,
        )
    ]


def _decide_commit_cmd(snap: Snapshot, cmd: Commit, ctx: Context, meta: _Meta) -> list[Event]:
    res = _reservation(snap, cmd.tenant_id, cmd.reservation_id)
    cost = cost_at(snap.prices.get(res.model, ()), ctx.now, cmd.usage)
    return _decide_commit(res, cmd, cost, meta)


def _reservation(snap: Snapshot, tenant_id: str, reservation_id: str) -> Reservation:
    if snap.reservation is None:
        raise errors.ReservationNotFound(tenant_id, reservation_id)
    return snap.reservation


def _decide_commit(res: Reservation, cmd: Commit, cost: int | None, meta: _Meta) -> list[Event]:
    if res.state is State.ROLLED_BACK:
        raise errors.ReservationEnded(
            res.reservation_id,
            res.state.value,
            "a rolled-back reservation cannot be committed; record the usage with RecordUsage",
        )
    if res.usage is not None:
        if res.usage == cmd.usage:
            return []
        field_name = _first_difference(res.usage, cmd.usage)
        raise errors.ReservationEnded(
            res.reservation_id,
            res.state.value,
            f"it was committed with {field_name}={getattr(res.usage, field_name)}, "
            f"this commit has {field_name}={getattr(cmd.usage, field_name)}",
        )
    if res.state is State.EXPIRED:
        return [
            UsageRecorded(
                key=res.key,
                model=res.model,
                reservation_id=res.reservation_id,
                usage=cmd.usage,
                reserved_at=res.created_at,
                cost=cost,
                **meta,
            )
        ]
    return [
        ReservationCommitted(
            key=res.key,
            model=res.model,
            reservation_id=res.reservation_id,
            amount=res.amount,
            usage=cmd.usage,
            reserved_at=res.created_at,
            money=res.money or None,
            cost=cost,
            **meta,
        )
    ]


def _first_difference(a: Usage, b: Usage) -> str:
    for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
        if getattr(a, name) != getattr(b, name):
            return name
    return "usage"


def _grantable(snap: Snapshot, cmd: Reserve, now: datetime, pricing: HoldPricing | None) -> int:
    """What a Reserve gets: all of `amount` when every level's budget (in tokens and in
    money) and every rate limit allow it, else the most they allow if that is at least
    `min_amount`; otherwise the refusal of the budget (checked first: it does not come back
    within a minute) or of the rate limit that binds."""
    minimum = cmd.min_amount or cmd.amount
    levels = [snap.accounts[k].rolled(now) for k in cmd.key.lineage()]
    budget = min((a.available for a in levels if a.available is not None), default=None)
    if budget is not None and budget < minimum:
        acc = next(a for a in levels if a.available is not None and a.available < minimum)
        raise _budget_refusal(acc, cmd.amount, budget)
    by_money = _money_room(levels, cmd, pricing, snap.currency, minimum, budget)
    limiters = list(applicable_limits(snap.rate_limits, cmd.key, cmd.model))
    for rl in limiters:
        if rl.requests_per_minute and gcra_room(rl.requests_tat, rl.requests_per_minute, now) < 1:
            raise _rate_refusal(rl, "requests", 1, now)
    rooms = [
        (gcra_room(rl.tokens_tat, rl.tokens_per_minute, now), rl)
        for rl in limiters
        if rl.tokens_per_minute
    ]
    for room, rl in rooms:
        if room < minimum:
            raise _rate_refusal(rl, "tokens", minimum, now)
    caps = [budget, by_money]
    return min([cmd.amount, *(r for r, _ in rooms), *(c for c in caps if c is not None)])


def _money_room(
    levels: list[Account],
    cmd: Reserve,
    pricing: HoldPricing | None,
    currency: str,
    minimum: int,
    token_budget: int | None,
) -> int | None:
    """The most tokens the levels' money budgets allow (None: no level has one); refuses
    when that is below `minimum`, or when the model has no price to bound the hold with."""
    bounded = [a.money for a in levels if a.money is not None and a.money.limit is not None]
    if not bounded:
        return None
    if pricing is None:
        raise errors.PriceMissing(cmd.model, str(bounded[0].key))
    rooms = [(pricing.affordable(m.available or 0, cmd.amount), m) for m in bounded]
    room, binding = min(rooms, key=lambda r: r[0])
    if room < minimum:
        reservable = room if token_budget is None else min(room, token_budget)
        raise _budget_refusal(binding, cmd.amount, reservable, currency)
    return room


def _budget_refusal(
    acc: Account, requested: int, reservable: int, currency: str = ""
) -> errors.LedgerError:
    assert acc.limit is not None and acc.available is not None
    bounds = acc.period_bounds()
    return errors.BudgetExhausted(
        requested,
        errors.RefusingLevel(
            scope=acc.key.scope,
            account=str(acc.key),
            limit=acc.limit,
            held=acc.held,
            used=acc.used,
            available=acc.available,
            currency=currency,
        ),
        reservable,
        resets_at=bounds[1] if bounds else None,
    )


def _rate_refusal(rl: RateLimit, kind: str, needed: int, now: datetime) -> errors.LedgerError:
    tat, per_minute = (
        (rl.tokens_tat, rl.tokens_per_minute)
        if kind == "tokens"
        else (rl.requests_tat, rl.requests_per_minute)
    )
    room = gcra_room(tat, per_minute, now)
    retry: float | None = None
    if needed <= per_minute:  # fits once the bucket has refilled enough
        now_ticks = _us(now) * per_minute
        wait_ticks = max(tat, now_ticks) + needed * MINUTE_US - MINUTE_US * per_minute - now_ticks
        retry = max(wait_ticks, 0) / per_minute / 1e6
    return errors.RateLimited(
        kind, str(rl.key.account), rl.key.model, per_minute, needed, room, retry
    )


def applicable_limits(
    limits: dict[RateLimitKey, RateLimit], key: AccountKey, model: str
) -> Iterator[RateLimit]:
    """The rate limits a reservation on `key` for `model` must fit: every level's, both the
    model's own and the all-models one."""
    for k in key.lineage():
        for m in dict.fromkeys((model, "")):
            rl = limits.get(RateLimitKey(k, m))
            if rl is not None:
                yield rl


def _us(at: datetime) -> int:
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# GCRA time is counted in ticks of 1/per_minute microsecond, so one unit takes exactly
# MINUTE_US ticks and a minute holds exactly per_minute units: no rounding, at any rate.


def gcra_room(tat: int, per_minute: int, now: datetime) -> int:
    """The most units that fit now: a full minute's worth when idle, less what the
    theoretical arrival time (in ticks) is already ahead of now."""
    ahead = max(tat - _us(now) * per_minute, 0)
    return max(0, (MINUTE_US * per_minute - ahead) // MINUTE_US)


def _gcra_take(tat: int, per_minute: int, now: datetime, units: int) -> int:
    return max(tat, _us(now) * per_minute) + units * MINUTE_US


def _rescale(tat: int, old: int, new: int) -> int:
    """A theoretical arrival time kept across a change of rate (rounded up: never looser);
    a limiter that had no rate starts full."""
    return -(-tat * new // old) if old and new else 0


def headroom(
    accounts: list[Account], pricing: HoldPricing | None = None
) -> tuple[int | None, datetime | None]:
    """The most tokens a reservation could get across these levels (their money budgets
    too, priced by `pricing`), and when the level that bounds it resets its period."""
    rooms = [(a.available, a) for a in accounts if a.available is not None]
    if pricing is not None:
        rooms += [
            (pricing.affordable(m.available, limits.amount_tokens_max), m)
            for a in accounts
            if (m := a.money) is not None and m.available is not None
        ]
    if not rooms:
        return None, None
    room, binding = min(rooms, key=lambda r: r[0] or 0)
    bounds = binding.period_bounds()
    return room, bounds[1] if bounds else None


def soft_limit_warnings(
    accounts: list[Account], currency: str = ""
) -> tuple[SoftLimitWarning, ...]:
    """The levels at or past their soft threshold, in tokens or in money."""
    sides = [(a, "") for a in accounts] + [(a.money, currency) for a in accounts if a.money]
    return tuple(
        SoftLimitWarning(a.key.scope, str(a.key), a.percent_used, a.soft_limit_percent, unit)
        for a, unit in sides
        if a.soft_limit_percent and a.limit is not None and a.percent_used >= a.soft_limit_percent
    )


def affected(event: Event) -> tuple[AccountKey, ...]:
    """The accounts an event changes: quotas and grants only their own, a rate limit or a
    price none (its stream is the account's), a charge or hold every level."""
    if isinstance(event, QuotaSet | TokensGranted | BudgetAlertsSet | BudgetThresholdCrossed):
        return (event.key,)
    if isinstance(event, RateLimitSet | PriceSet):
        return ()
    return event.key.lineage()


def evolve_account(acc: Account, event: Event) -> Account:
    """The account after `event` (one of affected(event)), in tokens and in money."""
    acc = _evolve_tokens(acc.rolled(event.occurred_at), event)
    money = _evolve_money(acc, event)
    return acc if money is acc.money else acc.with_(money=money)


def _evolve_money(acc: Account, event: Event) -> Account | None:
    """The account's money side after `event` (acc is the account after it, in tokens)."""
    match event:
        case QuotaSet() if event.money_limit is not None or acc.money is not None:
            return acc.money_side().with_policy_of(acc).with_(limit=event.money_limit)
        case TokensReserved() if event.money:
            m = acc.money_side()
            return m.with_(held=m.held + event.money)
        case ReservationCommitted() if event.money or event.cost:
            cost, released = event.cost or 0, event.money or 0
            return _charge(acc.money_side(), cost, event.reserved_at, event.occurred_at, released)
        case ReservationRolledBack() | ReservationExpired() if event.money:
            m = acc.money_side()
            return m.with_(held=m.held - event.money)
        case UsageRecorded() if event.cost:
            at = event.occurred_at
            return _charge(acc.money_side(), event.cost, event.reserved_at or at, at)
        case TokensGranted() if event.money:
            m = acc.money_side()
            grant = Grant(event.expires_at, event.grant_id, event.money)
            return m.with_(grants=tuple(sorted((*m.grants, grant), key=Grant.draw_order)))
        case BalanceAdjusted() if event.money:
            at = event.occurred_at
            return _charge(acc.money_side(), event.money, at, at, draw=False)
        case BudgetAlertsSet() if acc.money is not None:
            fired = tuple(t for t in acc.money.alerts_fired if t in acc.alert_thresholds)
            return acc.money.with_(alerts_fired=fired)
        case BudgetThresholdCrossed() if event.currency is not None:
            return _fired(acc.money_side(), event.threshold_percent)
    return acc.money


def _evolve_tokens(acc: Account, event: Event) -> Account:
    match event:
        case QuotaSet():
            changes: dict[str, object] = {}
            if event.time_zone != acc.time_zone:
                # The current day and month become the new zone's; their counters carry on.
                day = day_of(event.occurred_at, event.time_zone)
                changes = {"day_start": day, "month_start": day.replace(day=1)}
            acc = acc.with_(
                limit=event.limit,
                period=event.period,
                window_hours=event.window_hours,
                time_zone=event.time_zone,
                soft_limit_percent=event.soft_limit_percent,
                grant_order=event.grant_order,
                **changes,
            )
            return acc.rolled(event.occurred_at)  # the window and days of the new settings
        case TokensReserved():
            return acc.with_(held=acc.held + event.amount)
        case ReservationCommitted():
            return _charge(
                acc, event.usage.total, event.reserved_at, event.occurred_at, event.amount
            )
        case ReservationRolledBack() | ReservationExpired():
            return acc.with_(held=acc.held - event.amount)
        case UsageRecorded():
            return _charge(
                acc, event.usage.total, event.reserved_at or event.occurred_at, event.occurred_at
            )
        case TokensGranted() if event.amount:
            grant = Grant(event.expires_at, event.grant_id, event.amount)
            return acc.with_(grants=tuple(sorted((*acc.grants, grant), key=Grant.draw_order)))
        case TokensGranted():
            return acc
        case BalanceAdjusted():
            return _charge(acc, event.tokens, event.occurred_at, event.occurred_at, draw=False)
        case BudgetAlertsSet():
            thresholds = tuple(sorted(event.thresholds_percent))
            fired = tuple(t for t in acc.alerts_fired if t in thresholds)
            return acc.with_(alert_thresholds=thresholds, alerts_fired=fired)
        case BudgetThresholdCrossed() if event.currency is not None:
            return acc  # the money budget's (_evolve_money)
        case BudgetThresholdCrossed():
            return _fired(acc, event.threshold_percent)
    raise TypeError(f"unknown event {type(event).__name__}")


def _fired(acc: Account, threshold: int) -> Account:
    fired = tuple(sorted((*acc.alerts_fired, threshold)))
    return acc.with_(alerts_fired=fired, alerts_period=acc.alert_period())


def _charge(
    acc: Account,
    tokens: int,
    charged_at: datetime,
    now: datetime,
    released: int = 0,
    *,
    draw: bool = True,
) -> Account:
    """Add usage (and release `released` held tokens). Grants pay their share first or after
    the quota, by the account's grant order; the rest counts in every period counter. A hold
    placed in an earlier (closed) day, month or hour is charged to that period, so it does not
    count against the current one."""
    quota_tokens, grants = _draw_grants(acc, tokens) if draw else (tokens, acc.grants)
    hour = hour_of(charged_at)
    recent = acc.recent
    if quota_tokens and hour > hour_of(now) - rolling_window_hours_max:
        recent = _add_to_bucket(recent, hour, quota_tokens)
    day = day_of(charged_at, acc.time_zone)
    return acc.with_(
        held=acc.held - released,
        used_total=acc.used_total + tokens,
        used_day=acc.used_day + (quota_tokens if day >= acc.day_start else 0),
        used_month=acc.used_month + (quota_tokens if day >= acc.month_start else 0),
        recent=recent,
        grants=grants,
    )


def _draw_grants(acc: Account, tokens: int) -> tuple[int, tuple[Grant, ...]]:
    """Split a charge into what the quota pays and what grants pay (soonest expiry first);
    returns the quota's part and the grants left."""
    if tokens <= 0 or not acc.grants or acc.limit is None:
        return tokens, acc.grants
    if acc.grant_order is GrantOrder.GRANTS_FIRST:
        from_grants = tokens
    else:
        from_grants = tokens - max(0, min(tokens, acc.limit - acc.used))
    left: list[Grant] = []
    paid = 0
    for g in acc.grants:
        take = min(g.remaining, from_grants - paid)
        paid += take
        if g.remaining > take:
            left.append(replace(g, remaining=g.remaining - take))
    return tokens - paid, tuple(left)


def _add_to_bucket(
    recent: tuple[tuple[int, int], ...], hour: int, tokens: int
) -> tuple[tuple[int, int], ...]:
    buckets = dict(recent)
    buckets[hour] = buckets.get(hour, 0) + tokens
    return tuple(sorted(buckets.items()))


def evolve_rate_limit(rl: RateLimit | None, key: RateLimitKey, event: Event) -> RateLimit | None:
    """The limiter `key` after `event`: set by RateLimitSet, advanced by each hold it applies
    to (the hold's granted amount and one request)."""
    if isinstance(event, RateLimitSet):
        rl = rl or RateLimit(key)
        tpm, rpm = event.tokens_per_minute, event.requests_per_minute
        return replace(
            rl,
            tokens_per_minute=tpm,
            requests_per_minute=rpm,
            tokens_tat=_rescale(rl.tokens_tat, rl.tokens_per_minute, tpm),
            requests_tat=_rescale(rl.requests_tat, rl.requests_per_minute, rpm),
        )
    if rl is None or not isinstance(event, TokensReserved):
        return rl
    at = event.occurred_at
    tokens_tat, requests_tat = rl.tokens_tat, rl.requests_tat
    if rl.tokens_per_minute:
        tokens_tat = _gcra_take(tokens_tat, rl.tokens_per_minute, at, event.amount)
    if rl.requests_per_minute:
        requests_tat = _gcra_take(requests_tat, rl.requests_per_minute, at, 1)
    return replace(rl, tokens_tat=tokens_tat, requests_tat=requests_tat)


def rate_limit_keys(event: Event) -> tuple[RateLimitKey, ...]:
    """The limiters an event may change."""
    if isinstance(event, RateLimitSet):
        return (RateLimitKey(event.key, event.model),)
    if isinstance(event, TokensReserved):
        models = tuple(dict.fromkeys((event.model, "")))
        return tuple(RateLimitKey(k, m) for k in event.key.lineage() for m in models)
    return ()


def evolve_reservation(res: Reservation | None, event: Event) -> Reservation | None:
    """The reservation after `event`; events that concern no reservation leave it as is."""
    match event:
        case TokensReserved():
            return Reservation(
                reservation_id=event.reservation_id,
                key=event.key,
                model=event.model,
                amount=event.amount,
                state=State.HELD,
                created_at=event.occurred_at,
                expires_at=event.expires_at,
                labels=event.labels,
                money=event.money or 0,
            )
        case ReservationCommitted():
            assert res is not None
            return replace(
                res,
                state=State.COMMITTED,
                usage=event.usage,
                ended_at=event.occurred_at,
                cost=event.cost,
            )
        case ReservationRolledBack():
            assert res is not None
            return replace(res, state=State.ROLLED_BACK, ended_at=event.occurred_at)
        case ReservationExpired():
            assert res is not None
            return replace(res, state=State.EXPIRED, ended_at=event.occurred_at)
        case UsageRecorded() if event.reservation_id:
            assert res is not None
            return replace(res, usage=event.usage, late=True, cost=event.cost)
    return res


# --- the quick path of a verification's fold ---------------------------------------------------
# A verification evolves two or three accounts for nearly every event it folds. For the events
# it folds most (holds, their ends, usage, adjustments) on accounts without grants, the same
# result as evolve_account's is made here with one copy of each account, from figures worked
# out once per event for its whole lineage (Step). tests/unit/test_quick_fold.py holds both
# equal, field by field, on random accounts and events.


class Step:
    """What one event does to each account of its lineage, in tokens and in money: its time
    (`at`, and its `hour`), a change of what is held, and a charge (`tokens`, at `charged_at`,
    with `charged_hour`; None: no charge); `money_held` and `money_charge` likewise for the
    money side (None: the event leaves a missing money side missing)."""

    __slots__ = ("_days", "at", "charged_at", "charged_hour", "held", "hour", "money_charge",
                 "money_held", "tokens")  # fmt: skip

    def __init__(
        self,
        at: datetime,
        held: int,
        tokens: int | None,
        charged_at: datetime,
        money_held: int | None,
        money_charge: int | None,
    ) -> None:
        self.at, self.hour, self.held, self.tokens = at, hour_of(at), held, tokens
        self.charged_at, self.charged_hour = charged_at, hour_of(charged_at)
        self.money_held, self.money_charge = money_held, money_charge
        self._days: dict[str, tuple[date, date]] = {}

    def days(self, time_zone: str) -> tuple[date, date]:
        """The days of `at` and of `charged_at` in `time_zone`."""
        days = self._days.get(time_zone)
        if days is None:
            days = self._days[time_zone] = (
                day_of(self.at, time_zone), day_of(self.charged_at, time_zone))  # fmt: skip
        return days


def step_of(event: Event) -> Step | None:
    """The Step of `event`, if it is of a kind the quick path folds."""
    at = event.occurred_at
    match event:
        case TokensReserved():
            money = event.money or None
            return Step(at, event.amount, None, at, money, None)
        case ReservationCommitted():
            tokens, reserved = event.usage.total, event.reserved_at
            if event.money or event.cost:
                return Step(at, -event.amount, tokens, reserved, -(event.money or 0),
                            event.cost or 0)  # fmt: skip
            return Step(at, -event.amount, tokens, reserved, None, None)
        case ReservationRolledBack() | ReservationExpired():
            return Step(at, -event.amount, None, at, -event.money if event.money else None, None)
        case UsageRecorded():
            return Step(at, 0, event.usage.total, event.reserved_at or at, None, event.cost or None)
        case BalanceAdjusted():
            return Step(at, 0, event.tokens, at, None, event.money or None)
    return None


def quick_evolve_account(acc: Account, event: Event, step: Step | None) -> Account:
    """evolve_account(acc, event), with `step` = step_of(event): one copy of the account
    (and of its money side) where neither has grants, else evolve_account itself. For an
    account whose hourly buckets are in strictly increasing hour order, as every fold makes
    them (QuickProjection.seed sees to those it did not make)."""
    money = acc.money
    if step is None or acc.grants or (money is not None and money.grants):
        return evolve_account(acc, event)
    fields = _quick_step(acc.__dict__, step, step.held, step.tokens)
    if money is not None:
        fields["money"] = _quick_account(
            _quick_step(money.__dict__, step, step.money_held or 0, step.money_charge)
        )
    elif step.money_held is not None or step.money_charge is not None:
        side = _quick_account(fields).money_side()  # new, with the account's period and days
        fields["money"] = _quick_account(
            _quick_step(side.__dict__, step, step.money_held or 0, step.money_charge)
        )
    return _quick_account(fields)


def _quick_account(fields: dict[str, Any]) -> Account:
    out = object.__new__(Account)
    out.__dict__.update(fields)
    return out


def _quick_step(acc: dict[str, Any], step: Step, held: int, tokens: int | None) -> dict[str, Any]:
    """The fields of an account without grants (`acc`: its fields) rolled to `step.at`, as
    Account.rolled does, then with `held` added to what it holds and `tokens` charged, as
    _charge does (None: no charge)."""
    out = dict(acc)
    day, charged_day = step.days(out["time_zone"])
    if day > out["day_start"]:
        out["used_day"], out["day_start"] = 0, day
        month = day.replace(day=1)
        if month > out["month_start"]:
            out["used_month"], out["month_start"] = 0, month
    hour = step.hour
    recent = out["recent"]
    if recent and recent[0][0] < hour - rolling_window_hours_max + 1:
        # In hour order (QuickProjection.seed): the buckets kept are those from the first new
        # enough, which (oldest,) sorts before.
        recent = recent[bisect_left(recent, (hour - rolling_window_hours_max + 1,)) :]
    out["window_start_hour"] = hour - out["window_hours"] + 1
    if out["alerts_fired"]:
        period = out["period"]
        alerts_period = (
            out["day_start"] if period is Period.DAY
            else out["month_start"] if period is Period.MONTH else EPOCH_DAY
        )  # fmt: skip
        if alerts_period != out["alerts_period"]:
            out["alerts_fired"], out["alerts_period"] = (), alerts_period
    out["held"] += held
    if tokens is not None:
        charged_hour = step.charged_hour
        if tokens and charged_hour > hour - rolling_window_hours_max:
            recent = quick_add_to_bucket(recent, charged_hour, tokens)
        out["used_total"] += tokens
        if charged_day >= out["day_start"]:
            out["used_day"] += tokens
        if charged_day >= out["month_start"]:
            out["used_month"] += tokens
    out["recent"] = recent
    return out


def quick_evolve_reservation(res: Reservation | None, event: Event) -> Reservation | None:
    """evolve_reservation(res, event), each new value made without dataclasses.replace and
    Reservation.__init__ (which validates nothing), several times faster."""
    match event:
        case TokensReserved():
            return _quick_reservation(
                {"reservation_id": event.reservation_id, "key": event.key, "model": event.model,
                 "amount": event.amount, "state": State.HELD, "created_at": event.occurred_at,
                 "expires_at": event.expires_at, "labels": event.labels, "usage": None,
                 "late": False, "ended_at": None, "money": event.money or 0, "cost": None}
            )  # fmt: skip
        case ReservationCommitted() if res is not None:
            return _quick_reservation(res.__dict__, state=State.COMMITTED, usage=event.usage,
                                      ended_at=event.occurred_at, cost=event.cost)  # fmt: skip
        case ReservationRolledBack() if res is not None:
            return _quick_reservation(
                res.__dict__, state=State.ROLLED_BACK, ended_at=event.occurred_at
            )
        case ReservationExpired() if res is not None:
            return _quick_reservation(res.__dict__, state=State.EXPIRED, ended_at=event.occurred_at)
        case UsageRecorded() if event.reservation_id and res is not None:
            return _quick_reservation(res.__dict__, usage=event.usage, late=True, cost=event.cost)
    return evolve_reservation(res, event)


def _quick_reservation(fields: dict[str, Any], **changes: Any) -> Reservation:
    out = object.__new__(Reservation)
    out.__dict__.update(fields, **changes)
    return out


def quick_add_to_bucket(
    recent: tuple[tuple[int, int], ...], hour: int, tokens: int
) -> tuple[tuple[int, int], ...]:
    """_add_to_bucket(recent, hour, tokens) without a dict and a sort where `hour` is the
    last bucket's or after it (usage comes in time order, nearly always)."""
    if not recent:
        return ((hour, tokens),)
    last, used = recent[-1]
    if hour == last:
        return (*recent[:-1], (hour, used + tokens))
    if hour > last:
        return (*recent, (hour, tokens))
    return _add_to_bucket(recent, hour, tokens)


def commit_outcome(res: Reservation, balance: Account) -> CommitResult:
    """The figures of a commit, derived from the committed reservation."""
    assert res.usage is not None
    total = res.usage.total
    committed = min(total, res.amount)
    return CommitResult(
        reservation=res,
        committed=committed,
        # A late commit releases nothing: the hold was released when it expired.
        released=0 if res.late else res.amount - committed,
        overage=max(0, total - res.amount),
        late=res.late,
        balance=balance,
    )


_DECIDERS: dict[type, Callable[[Snapshot, Any, Context, _Meta], list[Event]]] = {
    Reserve: _decide_reserve,
    SetQuota: _decide_set_quota,
    GrantTokens: _decide_grant,
    AdjustBalance: _decide_adjust,
    SetRateLimit: _decide_rate_limit,
    SetBudgetAlerts: _decide_alerts,
    SetPrices: _decide_set_prices,
    RecordUsage: _decide_usage,
    Commit: _decide_commit_cmd,
    Rollback: _decide_rollback,
    Expire: _decide_expire,
}
"""One decider per command type."""
