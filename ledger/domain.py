"""The pure ledger: decide(snapshot, command, context) -> events; evolve(state, event) -> state.

No I/O, no clock, no ids: the store passes in what it locked, and the context carries the time
and a fresh id. The store's projections and an audit's rebuild both use these same functions,
so a balance rebuilt from the log equals the live one by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TypedDict

from ledger import errors
from ledger.model import (
    Account,
    AccountKey,
    Commit,
    CommitResult,
    Context,
    Event,
    Expire,
    QuotaSet,
    RecordUsage,
    Reservation,
    ReservationCommitted,
    ReservationExpired,
    ReservationRolledBack,
    Reserve,
    Rollback,
    SetQuota,
    State,
    TokensReserved,
    Usage,
    UsageRecorded,
    day_of,
    month_of,
)


@dataclass(frozen=True)
class Snapshot:
    """What a decision may look at: the locked accounts of the command's lineage (tenant first)
    and, for commands on a reservation, that reservation."""

    accounts: dict[AccountKey, Account] = field(default_factory=dict)
    reservation: Reservation | None = None


Decidable = Reserve | Commit | Rollback | SetQuota | RecordUsage | Expire


class _Meta(TypedDict):
    occurred_at: datetime
    actor: str
    trace_id: str


def decide(snap: Snapshot, cmd: Decidable, ctx: Context) -> list[Event]:
    """The events that carry out `cmd`, or a LedgerError. An empty list means the command
    repeats one already applied: the caller returns the recorded outcome."""
    meta = _Meta(occurred_at=ctx.now, actor=ctx.actor, trace_id=ctx.trace_id)
    match cmd:
        case Reserve():
            _check_fits(snap, cmd.key, cmd.amount, ctx.now)
            return [
                TokensReserved(
                    key=cmd.key,
                    model=cmd.model,
                    idempotency_key=cmd.idempotency_key,
                    reservation_id=ctx.new_id,
                    amount=cmd.amount,
                    expires_at=ctx.now + timedelta(seconds=cmd.ttl_s),
                    labels=cmd.labels,
                    **meta,
                )
            ]
        case SetQuota():
            return [
                QuotaSet(
                    key=cmd.key,
                    idempotency_key=cmd.idempotency_key,
                    limit=cmd.limit,
                    period=cmd.period,
                    **meta,
                )
            ]
        case RecordUsage():
            return [
                UsageRecorded(
                    key=cmd.key,
                    model=cmd.model,
                    idempotency_key=cmd.idempotency_key,
                    usage=cmd.usage,
                    **meta,
                )
            ]
        case Commit():
            return _decide_commit(_reservation(snap, cmd.tenant_id, cmd.reservation_id), cmd, meta)
        case Rollback():
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
                    **meta,
                )
            ]
        case Expire():
            res = _reservation(snap, cmd.tenant_id, cmd.reservation_id)
            if res.state is not State.HELD or ctx.now < res.expires_at:
                return []
            return [
                ReservationExpired(
                    key=res.key,
                    model=res.model,
                    reservation_id=res.reservation_id,
                    amount=res.amount,
                    **meta,
                )
            ]


def _reservation(snap: Snapshot, tenant_id: str, reservation_id: str) -> Reservation:
    if snap.reservation is None:
        raise errors.ReservationNotFound(tenant_id, reservation_id)
    return snap.reservation


def _decide_commit(res: Reservation, cmd: Commit, meta: _Meta) -> list[Event]:
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
            **meta,
        )
    ]


def _first_difference(a: Usage, b: Usage) -> str:
    for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
        if getattr(a, name) != getattr(b, name):
            return name
    return "usage"


def _check_fits(snap: Snapshot, key: AccountKey, amount: int, now: datetime) -> None:
    """Raise BudgetExhausted naming the first level (tenant first) that `amount` overflows."""
    levels = [snap.accounts[k].rolled(now) for k in key.lineage()]
    limited = [(acc, acc.available) for acc in levels if acc.available is not None]
    reservable = min((avail for _, avail in limited), default=None)
    for acc, avail in limited:
        if amount > avail:
            assert acc.limit is not None and reservable is not None
            raise errors.BudgetExhausted(
                amount,
                errors.RefusingLevel(
                    scope=acc.key.scope,
                    account=str(acc.key),
                    limit=acc.limit,
                    held=acc.held,
                    used=acc.used,
                    available=avail,
                ),
                reservable,
            )


def affected(event: Event) -> tuple[AccountKey, ...]:
    """The accounts an event changes: a quota only its own, a charge or hold every level."""
    return (event.key,) if isinstance(event, QuotaSet) else event.key.lineage()


def evolve_account(acc: Account, event: Event) -> Account:
    """The account after `event` (one of affected(event))."""
    acc = acc.rolled(event.occurred_at)
    match event:
        case QuotaSet():
            return acc.with_(limit=event.limit, period=event.period)
        case TokensReserved():
            return acc.with_(held=acc.held + event.amount)
        case ReservationCommitted():
            return _charge(acc, event.usage.total, event.reserved_at, released=event.amount)
        case ReservationRolledBack() | ReservationExpired():
            return acc.with_(held=acc.held - event.amount)
        case UsageRecorded():
            return _charge(acc, event.usage.total, event.reserved_at or event.occurred_at)
    raise TypeError(f"unknown event {type(event).__name__}")


def _charge(acc: Account, tokens: int, charged_at: datetime, released: int = 0) -> Account:
    """Add usage to every period counter (and release `released` held tokens); a hold placed
    in an earlier (closed) day or month is charged to that period, so it does not count
    against the current one."""
    return acc.with_(
        held=acc.held - released,
        used_total=acc.used_total + tokens,
        used_day=acc.used_day + (tokens if day_of(charged_at) >= acc.day_start else 0),
        used_month=acc.used_month + (tokens if month_of(charged_at) >= acc.month_start else 0),
    )


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
            )
        case ReservationCommitted():
            assert res is not None
            return replace(
                res, state=State.COMMITTED, usage=event.usage, ended_at=event.occurred_at
            )
        case ReservationRolledBack():
            assert res is not None
            return replace(res, state=State.ROLLED_BACK, ended_at=event.occurred_at)
        case ReservationExpired():
            assert res is not None
            return replace(res, state=State.EXPIRED, ended_at=event.occurred_at)
        case UsageRecorded() if event.reservation_id:
            assert res is not None
            return replace(res, usage=event.usage, late=True)
    return res


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
