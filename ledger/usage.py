"""The usage projection: what each event adds to its (tenant, hour, user, conversation, model)
row. The store applies it in the event's transaction; an audit folds the whole log with it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from ledger.model import (
    BalanceAdjusted,
    Event,
    ReservationCommitted,
    ReservationExpired,
    ReservationRolledBack,
    TokensReserved,
    Usage,
    UsageRecorded,
)


@dataclass(frozen=True, order=True)
class UsageKey:
    tenant_id: str
    hour: datetime
    user_id: str
    conversation_id: str
    model: str


@dataclass
class UsageCounters:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reservations: int = 0
    commits: int = 0
    rollbacks: int = 0
    expiries: int = 0
    late_commits: int = 0
    usage_records: int = 0
    overage_tokens: int = 0
    adjusted_tokens: int = 0
    """Signed: what operators' corrections (BalanceAdjusted) added to usage."""
    adjustments: int = 0
    cost_micros: int = 0
    """What the usage cost, in micro-units of the tenant's currency (priced usage only)."""
    unpriced_tokens: int = 0
    """Tokens used on a model that had no price: they have no cost (never a guess)."""
    adjusted_micros: int = 0
    """Signed: what operators' corrections added to spending, in micro-units."""

    def add(self, other: UsageCounters) -> None:
        mine = self.__dict__
        for name, value in other.__dict__.items():
            mine[name] += value


COUNTER_NAMES = tuple(f.name for f in fields(UsageCounters))


def hour_of(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def usage_delta(event: Event) -> UsageCounters | None:
    """What `event` adds to its usage row; None for events that are not usage (quotas,
    grants, rate limits). Overage is counted at commit; a late commit's tokens count, its
    overage is in its reservation's figures. A correction counts apart from the tokens used
    (migration 0006 counts the same from the log)."""
    match event:
        case TokensReserved():
            return UsageCounters(reservations=1)
        case ReservationCommitted():
            u = event.usage
            return UsageCounters(
                input_tokens=u.input_tokens,
                output_tokens=u.output_tokens,
                cached_input_tokens=u.cached_input_tokens,
                commits=1,
                overage_tokens=max(0, u.total - event.amount),
                **_cost(u, event.cost),
            )
        case ReservationRolledBack():
            return UsageCounters(rollbacks=1)
        case ReservationExpired():
            return UsageCounters(expiries=1)
        case UsageRecorded():
            u = event.usage
            late = bool(event.reservation_id)
            return UsageCounters(
                input_tokens=u.input_tokens,
                output_tokens=u.output_tokens,
                cached_input_tokens=u.cached_input_tokens,
                late_commits=int(late),
                usage_records=int(not late),
                **_cost(u, event.cost),
            )
        case BalanceAdjusted():
            return UsageCounters(
                adjusted_tokens=event.tokens, adjustments=1, adjusted_micros=event.money or 0
            )
    return None


def _cost(usage: Usage, cost: int | None) -> dict[str, int]:
    if cost is None:
        return {"unpriced_tokens": usage.total}
    return {"cost_micros": cost}


def usage_key(event: Event) -> UsageKey:
    k = event.key
    return UsageKey(
        k.tenant_id, hour_of(event.occurred_at), k.user_id, k.conversation_id, event.model
    )


def add_usage(rows: dict[UsageKey, UsageCounters], event: Event) -> None:
    """Add what `event` counts to `rows`."""
    delta = usage_delta(event)
    if delta is not None:
        rows.setdefault(usage_key(event), UsageCounters()).add(delta)


def quick_add_usage(rows: dict[UsageKey, UsageCounters], event: Event) -> None:
    """add_usage(rows, event), adding in place the counters of the events a verification
    folds most (holds and their ends) instead of making them for each event first;
    tests/unit/test_quick_fold.py holds both equal."""
    kind = type(event)
    if kind is ReservationCommitted:
        assert isinstance(event, ReservationCommitted)
        c, u = _counters(rows, event), event.usage
        total = u.input_tokens + u.output_tokens + u.cached_input_tokens
        c.input_tokens += u.input_tokens
        c.output_tokens += u.output_tokens
        c.cached_input_tokens += u.cached_input_tokens
        c.commits += 1
        c.overage_tokens += max(0, total - event.amount)
        if event.cost is None:
            c.unpriced_tokens += total
        else:
            c.cost_micros += event.cost
    elif kind is TokensReserved:
        _counters(rows, event).reservations += 1
    elif kind is ReservationRolledBack:
        _counters(rows, event).rollbacks += 1
    elif kind is ReservationExpired:
        _counters(rows, event).expiries += 1
    else:
        add_usage(rows, event)


def _counters(rows: dict[UsageKey, UsageCounters], event: Event) -> UsageCounters:
    key = usage_key(event)
    counters = rows.get(key)
    if counters is None:
        counters = rows[key] = UsageCounters()
    return counters


def fold_usage(events: Iterable[Event]) -> dict[UsageKey, UsageCounters]:
    """The usage rows that `events` add up to."""
    rows: dict[UsageKey, UsageCounters] = {}
    for event in events:
        add_usage(rows, event)
    return rows
