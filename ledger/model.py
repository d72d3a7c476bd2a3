"""Values of the ledger domain: accounts, reservations, usage, events, commands and results.

Everything here is a frozen dataclass; time is always an aware UTC datetime.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

EPOCH_DAY = date(1970, 1, 1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
HOUR_S = 3600
rolling_window_hours_max = 24 * 7
"""The longest rolling period; accounts keep hourly usage this far back, whatever their period,
so switching a quota to a rolling period counts what was already used in its window."""


class Period(StrEnum):
    NONE = "none"
    DAY = "day"
    MONTH = "month"
    ROLLING = "rolling"


class GrantOrder(StrEnum):
    """Whether usage draws on granted tokens before or after the period's quota."""

    QUOTA_FIRST = "quota_first"
    GRANTS_FIRST = "grants_first"


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


@cache
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def day_of(at: datetime, time_zone: str = "UTC") -> date:
    """The calendar day `at` falls on in `time_zone`."""
    return at.astimezone(UTC if time_zone == "UTC" else zone(time_zone)).date()


def hour_of(at: datetime) -> int:
    """Hours since the epoch: the index of the hourly usage bucket `at` falls in."""
    return int(at.timestamp()) // HOUR_S


def _next_month(start: date) -> date:
    return date(start.year + start.month // 12, start.month % 12 + 1, 1)


def _local_midnight(day: date, time_zone: str) -> datetime:
    tz = UTC if time_zone == "UTC" else zone(time_zone)
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True)
class Grant:
    """Tokens added to an account by GrantTokens, drawn by usage until spent or expired."""

    expires_at: datetime | None
    grant_id: str
    remaining: int

    def draw_order(self) -> tuple[bool, datetime, str]:
        """Soonest expiry first, grants that never expire last."""
        return (self.expires_at is None, self.expires_at or EPOCH, self.grant_id)


@dataclass(frozen=True)
class Account:
    """The derived balance of one account. Usage is kept for every period kind at once (a
    total, the current day and month in the account's time zone, and hourly buckets for
    rolling periods), so changing a quota's period never loses what was already used in it.

    `window_start_hour` is where the rolling window began when the account was last rolled
    forward; it is derived from the time, not stored."""

    key: AccountKey
    limit: int | None = None
    period: Period = Period.NONE
    window_hours: int = 0
    time_zone: str = "UTC"
    soft_limit_percent: int = 0
    grant_order: GrantOrder = GrantOrder.QUOTA_FIRST
    held: int = 0
    used_total: int = 0
    used_day: int = 0
    day_start: date = EPOCH_DAY
    used_month: int = 0
    month_start: date = EPOCH_DAY
    recent: tuple[tuple[int, int], ...] = ()
    grants: tuple[Grant, ...] = ()
    alert_thresholds: tuple[int, ...] = ()
    """Budget alerts: percentages of the limit (plus grants) whose crossing is logged."""
    alerts_fired: tuple[int, ...] = ()
    """The thresholds already crossed in the period starting `alerts_period`."""
    alerts_period: date = EPOCH_DAY
    money: Account | None = None
    """The account's budget in money (micro-units of the tenant's currency): the same
    figures, kept by the same rules, for costs instead of tokens; its `limit` is the money
    quota. Its policy (period, zone, soft limit, grant order) is the account's. None until
    a money quota, a cost, a priced hold or money granted concerns the account."""
    window_start_hour: int = field(default=0, compare=False)

    def rolled(self, at: datetime) -> Account:
        """The account as of `at`: day and month counters reset when their period has
        passed, hourly buckets and grants that have aged out are dropped."""
        changes: dict[str, Any] = {}
        day = day_of(at, self.time_zone)
        if day > self.day_start:
            changes |= {"used_day": 0, "day_start": day}
            month = day.replace(day=1)
            if month > self.month_start:
                changes |= {"used_month": 0, "month_start": month}
        hour = hour_of(at)
        oldest = hour - rolling_window_hours_max + 1
        if self.recent and self.recent[0][0] < oldest:
            changes["recent"] = tuple(b for b in self.recent if b[0] >= oldest)
        if self.grants and any(
            g.expires_at is not None and g.expires_at <= at for g in self.grants
        ):
            changes["grants"] = tuple(
                g for g in self.grants if g.expires_at is None or g.expires_at > at
            )
        window_start = hour - self.window_hours + 1
        if window_start != self.window_start_hour:
            changes["window_start_hour"] = window_start
        if self.money is not None:
            money = self.money.rolled(at)
            if money is not self.money:
                changes["money"] = money
        out = self.with_(**changes) if changes else self
        if out.alerts_fired and out.alert_period() != out.alerts_period:
            out = out.with_(alerts_fired=(), alerts_period=out.alert_period())
        return out

    def money_side(self) -> Account:
        """The money budget, made with the account's policy when it has none yet."""
        return self.money if self.money is not None else Account(self.key).with_policy_of(self)

    def with_policy_of(self, acc: Account) -> Account:
        """This account under `acc`'s period, zone, soft limit and grant order, with the
        same current day, month and window."""
        return self.with_(
            period=acc.period,
            window_hours=acc.window_hours,
            time_zone=acc.time_zone,
            soft_limit_percent=acc.soft_limit_percent,
            grant_order=acc.grant_order,
            day_start=acc.day_start,
            month_start=acc.month_start,
            window_start_hour=acc.window_start_hour,
        )

    def alert_period(self) -> date:
        """The period budget alerts fire once in: the quota's day or month; for other
        periods one that never ends (they fire once, until the thresholds are set again)."""
        if self.period is Period.DAY:
            return self.day_start
        if self.period is Period.MONTH:
            return self.month_start
        return EPOCH_DAY

    def with_(self, **changes: Any) -> Account:
        """A copy with `changes`; dataclasses.replace does the same, several times slower,
        and audits evolve accounts millions of times. The copy's fields are set without
        calling __init__ (Account validates nothing there), which is faster still."""
        if not changes.keys() <= _ACCOUNT_FIELDS:
            raise TypeError(f"Account has no field {sorted(changes.keys() - _ACCOUNT_FIELDS)}")
        out = object.__new__(Account)
        out.__dict__.update(self.__dict__, **changes)
        return out

    @property
    def used(self) -> int:
        """Usage in the current period of the account's quota (what grants did not cover)."""
        if self.period is Period.DAY:
            return self.used_day
        if self.period is Period.MONTH:
            return self.used_month
        if self.period is Period.ROLLING:
            return sum(t for h, t in self.recent if h >= self.window_start_hour)
        return self.used_total

    @property
    def granted(self) -> int:
        """Granted tokens not yet drawn (expired grants are dropped when rolled)."""
        return sum(g.remaining for g in self.grants)

    @property
    def available(self) -> int | None:
        """What a new hold may take: the quota's room plus grants, less what is held."""
        if self.limit is None:
            return None
        return max(0, max(0, self.limit - self.used) + self.granted - self.held)

    @property
    def percent_spent(self) -> int | None:
        """Usage (not holds) as a share of the limit and grants, in whole percent (rounded
        down); None without a limit. What budget alerts watch: a hold may yet be released."""
        capacity = (self.limit or 0) + self.granted
        if self.limit is None:
            return None
        return self.used * 100 // capacity if capacity else (100 if self.used else 0)

    @property
    def percent_used(self) -> int:
        """Held plus used as a share of the limit and grants, in whole percent (rounded down)."""
        capacity = (self.limit or 0) + self.granted
        if self.limit is None or capacity == 0:
            return 0 if self.limit is None else 100
        return (self.used + self.held) * 100 // capacity

    def period_bounds(self) -> tuple[datetime, datetime] | None:
        """[start, end) of the current period; None for Period.NONE. A day or month starts at
        midnight in the account's time zone. A rolling period ends when its oldest usage
        leaves the window (with none, when usage charged now would leave it)."""
        if self.period is Period.ROLLING:
            start = EPOCH + timedelta(hours=self.window_start_hour)
            inside = [h for h, t in self.recent if h >= self.window_start_hour and t]
            oldest = inside[0] if inside else self.window_start_hour + self.window_hours - 1
            return start, EPOCH + timedelta(hours=oldest + self.window_hours)
        if self.period is Period.DAY:
            first, after = self.day_start, date.fromordinal(self.day_start.toordinal() + 1)
        elif self.period is Period.MONTH:
            first, after = self.month_start, _next_month(self.month_start)
        else:
            return None
        return _local_midnight(first, self.time_zone), _local_midnight(after, self.time_zone)


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
    money: int = 0
    """Micro-units held (the upper bound of the tokens' cost); 0 for an unpriced model."""
    cost: int | None = None
    """What the usage cost at commit, in micro-units; None: unpriced or not committed."""


# --- events --------------------------------------------------------------------------------
# Each event type is declared once, here: its fields and their types. ledger/codec.py derives
# the log's row from the declaration: the fields every event carries, `reservation_id`,
# `amount` and `usage` have columns of their own; every other field goes in the `data` JSON.
# Field metadata says where a field differs from that rule (see `stored`).


def stored(*, column: str = "", omit_none: bool = False, absent_is: str = "") -> dict[str, Any]:
    """Metadata of a field stored unlike the rule: in `column`; left out of `data` when None
    (`omit_none`); or, in rows logged before it existed, equal to the field `absent_is`."""
    return {"column": column, "omit_none": omit_none, "absent_is": absent_is}


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
    window_hours: int = 0
    time_zone: str = "UTC"
    soft_limit_percent: int = 0
    grant_order: GrantOrder = GrantOrder.QUOTA_FIRST
    money_limit: int | None = field(default=None, metadata=stored(omit_none=True))
    """Micro-units of the tenant's currency per period; None: no money quota."""


_MONEY = stored(omit_none=True)
"""Money fields are left out of rows while None, so events without money keep their form."""


@dataclass(frozen=True, kw_only=True)
class TokensReserved(Event):
    """A hold of `amount` tokens; `requested` is what was asked (more, for a partial grant);
    `money` the micro-units held for them (None: the model has no price)."""

    reservation_id: str
    amount: int
    expires_at: datetime
    labels: tuple[tuple[str, str], ...] = ()
    requested: int = field(default=0, metadata=stored(absent_is="amount"))
    money: int | None = field(default=None, metadata=_MONEY)


@dataclass(frozen=True, kw_only=True)
class ReservationCommitted(Event):
    """`money` is the hold's money released; `cost` what the usage cost at the price in force
    at commit (None: the model had no price)."""

    reservation_id: str
    amount: int
    usage: Usage
    reserved_at: datetime
    money: int | None = field(default=None, metadata=_MONEY)
    cost: int | None = field(default=None, metadata=_MONEY)


@dataclass(frozen=True, kw_only=True)
class ReservationRolledBack(Event):
    reservation_id: str
    amount: int
    reason: str = ""
    money: int | None = field(default=None, metadata=_MONEY)


@dataclass(frozen=True, kw_only=True)
class ReservationExpired(Event):
    reservation_id: str
    amount: int
    money: int | None = field(default=None, metadata=_MONEY)


@dataclass(frozen=True, kw_only=True)
class UsageRecorded(Event):
    """Usage without a live hold: plain usage, or the late commit of an expired reservation
    (then `reservation_id` and `reserved_at` are set, and the usage is charged to the period
    the hold was placed in). `cost` at the price in force when recorded (None: no price)."""

    usage: Usage
    reservation_id: str = ""
    reserved_at: datetime | None = field(default=None, metadata=stored(omit_none=True))
    cost: int | None = field(default=None, metadata=_MONEY)


@dataclass(frozen=True, kw_only=True)
class TokensGranted(Event):
    """Tokens (and, with `money`, micro-units) added to the account itself (not its
    ancestors), until `expires_at`."""

    grant_id: str
    amount: int
    expires_at: datetime | None
    reason: str
    money: int | None = field(default=None, metadata=_MONEY)


@dataclass(frozen=True, kw_only=True)
class BalanceAdjusted(Event):
    """An operator's correction of usage: `tokens` (and `money`, micro-units) > 0 charges,
    < 0 credits. It rolls up to every ancestor, as usage does, and counts in the current
    period."""

    tokens: int = field(metadata=stored(column="amount"))
    reason: str
    money: int | None = field(default=None, metadata=_MONEY)


@dataclass(frozen=True, kw_only=True)
class PriceSet(Event):
    """The price of `model` from `effective_from`, in micro-units of `currency` per million
    tokens of each kind. Logged on the tenant's stream; it changes no balance."""

    currency: str
    effective_from: datetime
    input_per_mtok: int
    output_per_mtok: int
    cached_input_per_mtok: int


@dataclass(frozen=True, kw_only=True)
class RateLimitSet(Event):
    """Tokens and requests per minute for Reserve calls on the account and its descendants,
    for one model (`model`) or all of them (model ""). Zero means no limit."""

    tokens_per_minute: int
    requests_per_minute: int


@dataclass(frozen=True, kw_only=True)
class BudgetAlertsSet(Event):
    """The percentages of the account's limit whose crossing is logged (none: no alerts)."""

    thresholds_percent: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class BudgetThresholdCrossed(Event):
    """The account's usage reached `threshold_percent` of its limit and grants in the current
    period: logged once per threshold and period (a day or month quota's period; for other
    periods, once until the thresholds are set again). With `currency`, of its money budget:
    `used` and `capacity` in micro-units of that currency ("" while the tenant has no prices);
    without, of its tokens. Each budget crosses each threshold once."""

    threshold_percent: int
    used: int
    capacity: int
    currency: str | None = field(default=None, metadata=_MONEY)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        QuotaSet,
        TokensGranted,
        BalanceAdjusted,
        RateLimitSet,
        TokensReserved,
        ReservationCommitted,
        ReservationRolledBack,
        ReservationExpired,
        UsageRecorded,
        BudgetAlertsSet,
        BudgetThresholdCrossed,
        PriceSet,
    )
}


@dataclass(frozen=True, order=True)
class RateLimitKey:
    account: AccountKey
    model: str


@dataclass(frozen=True)
class RateLimit:
    """A GCRA limiter: each `*_tat` is the theoretical arrival time of the next unit, in ticks
    of 1/per_minute microsecond since the epoch; a request fits when it does not push it more
    than a minute ahead of now (a bucket of one minute's worth, refilled continuously, so no
    window boundary lets twice the rate through)."""

    key: RateLimitKey
    tokens_per_minute: int = 0
    requests_per_minute: int = 0
    tokens_tat: int = 0
    requests_tat: int = 0


# --- commands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    idempotency_key: str
    key: AccountKey
    model: str
    amount: int
    ttl_s: int
    labels: tuple[tuple[str, str], ...] = ()
    min_amount: int = 0
    """Grant less than `amount`, down to this, when only that fits; 0: all or nothing."""
    prompt_tokens: int = 0
    """How much of `amount` is prompt: priced at the prompt price for the money hold."""


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
    window_hours: int = 0
    time_zone: str = "UTC"
    soft_limit_percent: int = 0
    grant_order: GrantOrder = GrantOrder.QUOTA_FIRST
    money_limit: int | None = None


@dataclass(frozen=True)
class GrantTokens:
    idempotency_key: str
    key: AccountKey
    amount: int
    expires_at: datetime | None
    reason: str
    money: int | None = None


@dataclass(frozen=True)
class AdjustBalance:
    idempotency_key: str
    key: AccountKey
    tokens: int
    reason: str
    money: int | None = None


@dataclass(frozen=True)
class PriceEntry:
    """`model`'s price from `effective_from` (None: now), micro-units per million tokens."""

    model: str
    currency: str
    input_per_mtok: int
    output_per_mtok: int
    cached_input_per_mtok: int
    effective_from: datetime | None = None


@dataclass(frozen=True)
class SetPrices:
    """Set prices for the tenant: all of them, or none when one cannot be set."""

    idempotency_key: str
    tenant_id: str
    prices: tuple[PriceEntry, ...]


@dataclass(frozen=True)
class SetBudgetAlerts:
    idempotency_key: str
    key: AccountKey
    thresholds_percent: tuple[int, ...]


@dataclass(frozen=True)
class SetRateLimit:
    idempotency_key: str
    key: AccountKey
    model: str
    tokens_per_minute: int
    requests_per_minute: int


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
class SoftLimitWarning:
    """A level past its soft threshold after this reservation."""

    scope: str
    account: str
    percent_used: int
    threshold_percent: int
    currency: str = ""
    """Set when the money budget is past its threshold (its currency)."""


@dataclass(frozen=True)
class ReserveResult:
    reservation: Reservation
    balance: Account
    requested: int = 0
    warnings: tuple[SoftLimitWarning, ...] = ()
    reservable: int | None = None
    """The most a further Reserve on the account could get now (None: no limit)."""
    resets_at: datetime | None = None
    """When the level that bounds `reservable` resets its period (None: it never does)."""

    @property
    def partial(self) -> bool:
        return self.reservation.amount < self.requested


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
    currency: str = ""
    """The tenant's currency, for the money figures ("" while it has no prices)."""

    @property
    def reservable(self) -> int | None:
        figures = [a.available for a in (*self.ancestors, self.balance) if a.limit is not None]
        return min((f for f in figures if f is not None), default=None)


_ACCOUNT_FIELDS = frozenset(f.name for f in fields(Account))
