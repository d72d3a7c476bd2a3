"""Values of the ledger domain: accounts, reservations, usage, events, commands and results.

Everything here is a frozen dataclass; time is always an aware UTC datetime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

EPOCH_DAY = date(1970, 1, 1)


class Period(StrEnum):
    NONE = "none"
    DAY = "day"
    MONTH = "month"


class State(StrEnum):
    HELD = "held"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    EXPIRED = "expired"


@dataclass(frozen=True, order=True)
class AccountKey:
    """A tenant (user_id ""), a user of it (conversation_id ""), or a user's conversation."""

    tenant_id: str
    user_id: str = ""
    conversation_id: str = ""

    @property
    def scope(self) -> str:
        if self.conversation_id:
            return "conversation"
        return "user" if self.user_id else "tenant"

    def lineage(self) -> tuple[AccountKey, ...]:
        """This account and its ancestors, tenant first: the fixed lock order."""
        keys = [AccountKey(self.tenant_id)]
        if self.user_id:
            keys.append(AccountKey(self.tenant_id, self.user_id))
        if self.conversation_id:
            keys.append(self)
        return tuple(keys)

    def __str__(self) -> str:
        return "/".join(p for p in (self.tenant_id, self.user_id, self.conversation_id) if p)


@dataclass(frozen=True)
class Usage:
    """Tokens a model call consumed. The kinds are disjoint; all count against the budget."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens + self.cached_input_tokens


def day_of(at: datetime) -> date:
    return at.astimezone(UTC).date()


def month_of(at: datetime) -> date:
    return day_of(at).replace(day=1)


def _next_month(start: date) -> date:
    return date(start.year + start.month // 12, start.month % 12 + 1, 1)


@dataclass(frozen=True)
class Account:
    """The derived balance of one account. Usage is kept for every period kind at once, so
    changing a quota's period never loses what was already used in the new period."""

    key: AccountKey
    limit: int | None = None
    period: Period = Period.NONE
    held: int = 0
    used_total: int = 0
    used_day: int = 0
    day_start: date = EPOCH_DAY
    used_month: int = 0
    month_start: date = EPOCH_DAY

    def rolled(self, at: datetime) -> Account:
        """The account as of `at`: day and month counters reset when their period has passed."""
        day = day_of(at)
        if day <= self.day_start:
            return self
        month = day.replace(day=1)
        if month > self.month_start:
            return self.with_(used_day=0, day_start=day, used_month=0, month_start=month)
        return self.with_(used_day=0, day_start=day)

    def with_(self, **changes: Any) -> Account:
        """A copy with `changes`; dataclasses.replace does the same, several times slower,
        and audits evolve accounts millions of times."""
        return Account(**{**self.__dict__, **changes})

    @property
    def used(self) -> int:
        """Usage in the current period of the account's quota."""
        if self.period is Period.DAY:
            return self.used_day
        if self.period is Period.MONTH:
            return self.used_month
        return self.used_total

    @property
    def available(self) -> int | None:
        if self.limit is None:
            return None
        return max(0, self.limit - self.held - self.used)

    def period_bounds(self) -> tuple[datetime, datetime] | None:
        """[start, end) of the current period in UTC; None for Period.NONE."""
        if self.period is Period.DAY:
            start = self.day_start
            end = date.fromordinal(start.toordinal() + 1)
        elif self.period is Period.MONTH:
            start = self.month_start
            end = _next_month(start)
        else:
            return None
        return (
            datetime(start.year, start.month, start.day, tzinfo=UTC),
            datetime(end.year, end.month, end.day, tzinfo=UTC),
        )


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    key: AccountKey
    model: str
    amount: int
    state: State
    created_at: datetime
    expires_at: datetime
    labels: tuple[tuple[str, str], ...] = ()
    usage: Usage | None = None
    late: bool = False
    ended_at: datetime | None = None


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Event:
    """Fields every event carries. `key` is the account the event is addressed to; its stream
    holds the event. Charges roll up to every ancestor of `key`."""

    key: AccountKey
    occurred_at: datetime
    actor: str = ""
    trace_id: str = ""
    idempotency_key: str = ""
    model: str = ""


@dataclass(frozen=True, kw_only=True)
class QuotaSet(Event):
    limit: int | None
    period: Period


@dataclass(frozen=True, kw_only=True)
class TokensReserved(Event):
    reservation_id: str
    amount: int
    expires_at: datetime
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, kw_only=True)
class ReservationCommitted(Event):
    reservation_id: str
    amount: int
    usage: Usage
    reserved_at: datetime


@dataclass(frozen=True, kw_only=True)
class ReservationRolledBack(Event):
    reservation_id: str
    amount: int
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ReservationExpired(Event):
    reservation_id: str
    amount: int


@dataclass(frozen=True, kw_only=True)
class UsageRecorded(Event):
    """Usage without a live hold: plain usage, or the late commit of an expired reservation
    (then `reservation_id` and `reserved_at` are set, and the usage is charged to the period
    the hold was placed in)."""

    usage: Usage
    reservation_id: str = ""
    reserved_at: datetime | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        QuotaSet,
        TokensReserved,
        ReservationCommitted,
        ReservationRolledBack,
        ReservationExpired,
        UsageRecorded,
    )
}


# --- commands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    idempotency_key: str
    key: AccountKey
    model: str
    amount: int
    ttl_s: int
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Commit:
    tenant_id: str
    reservation_id: str
    usage: Usage


@dataclass(frozen=True)
class Rollback:
    tenant_id: str
    reservation_id: str
    reason: str = ""


@dataclass(frozen=True)
class SetQuota:
    idempotency_key: str
    key: AccountKey
    limit: int | None
    period: Period


@dataclass(frozen=True)
class RecordUsage:
    idempotency_key: str
    key: AccountKey
    model: str
    usage: Usage


@dataclass(frozen=True)
class Expire:
    """Internal: end an overdue hold. Issued by the sweeper and by any call on the tenant."""

    tenant_id: str
    reservation_id: str


@dataclass(frozen=True)
class Context:
    """What a decision needs from outside: the time, who asks, and a fresh id."""

    now: datetime
    new_id: str = ""
    actor: str = ""
    trace_id: str = ""


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReserveResult:
    reservation: Reservation
    balance: Account


@dataclass(frozen=True)
class CommitResult:
    reservation: Reservation
    committed: int
    released: int
    overage: int
    late: bool
    balance: Account


@dataclass(frozen=True)
class RollbackResult:
    reservation: Reservation
    released: int
    balance: Account


@dataclass(frozen=True)
class BalanceResult:
    balance: Account
    ancestors: tuple[Account, ...] = field(default_factory=tuple)

    @property
    def reservable(self) -> int | None:
        figures = [a.available for a in (*self.ancestors, self.balance) if a.limit is not None]
        return min((f for f in figures if f is not None), default=None)
