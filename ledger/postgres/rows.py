"""Table rows to ledger values: the column lists and mappers shared by the store and audits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any

from ledger.codec import account_from_json, grants_from_json
from ledger.model import (
    Account,
    AccountKey,
    GrantOrder,
    Period,
    RateLimit,
    RateLimitKey,
    Reservation,
    State,
    Usage,
)
from ledger.money import Price, PricePoint
from ledger.reads import LoggedEvent, Scope

ACCOUNT_COLUMNS = """tenant_id, user_id, conversation_id, quota_limit, period, window_hours,
    time_zone, soft_limit_percent, grant_order, held, used_total, used_day, day_start, used_month,
    month_start, recent, grants, alert_thresholds, alerts_fired, alerts_period, money,
    stream_version, head_hash"""
RATE_LIMIT_COLUMNS = """tenant_id, user_id, conversation_id, model, tokens_per_minute,
    requests_per_minute, tokens_tat, requests_tat"""
RESERVATION_COLUMNS = """tenant_id, reservation_id, user_id, conversation_id, model, amount,
    state, created_at, expires_at, labels, input_tokens, output_tokens, cached_input_tokens,
    late, ended_at, ended_balance, money, cost"""


_SELECT_ACCOUNTS = (
    f"SELECT {ACCOUNT_COLUMNS} FROM accounts "  # noqa: S608 (constant column list)
    "WHERE tenant_id = %s AND (user_id, conversation_id) IN "
    "(SELECT u, c FROM unnest(%s::text[], %s::text[]) AS k(u, c)) "
    "ORDER BY user_id, conversation_id"
)


def select_accounts_sql(keys: Sequence[AccountKey], *, lock: bool) -> tuple[str, tuple[Any, ...]]:
    """Accounts of one tenant by key; with `lock`, row-locked in key order (tenant first).
    One statement text whatever the number of keys (they go as two arrays), so that it is
    parsed and planned once per connection, not once per distinct count."""
    params = (keys[0].tenant_id, [k.user_id for k in keys], [k.conversation_id for k in keys])
    return (_SELECT_ACCOUNTS + " FOR UPDATE" if lock else _SELECT_ACCOUNTS), params


def account_key(row: dict[str, Any]) -> AccountKey:
    return AccountKey(row["tenant_id"], row["user_id"], row["conversation_id"])


def account_from_row(row: dict[str, Any]) -> Account:
    return Account(
        key=account_key(row),
        limit=row["quota_limit"],
        period=Period(row["period"]),
        held=row["held"],
        used_total=row["used_total"],
        used_day=row["used_day"],
        day_start=row["day_start"],
        used_month=row["used_month"],
        month_start=row["month_start"],
        window_hours=row["window_hours"],
        time_zone=row["time_zone"],
        soft_limit_percent=row["soft_limit_percent"],
        grant_order=GrantOrder(row["grant_order"]),
        recent=tuple((h, t) for h, t in row["recent"]),
        grants=grants_from_json(row["grants"]),
        alert_thresholds=tuple(row["alert_thresholds"]),
        alerts_fired=tuple(row["alerts_fired"]),
        alerts_period=row["alerts_period"],
        money=None if row["money"] is None else account_from_json(row["money"]),
    )


def rate_limit_from_row(row: dict[str, Any]) -> RateLimit:
    return RateLimit(
        key=RateLimitKey(account_key(row), row["model"]),
        tokens_per_minute=row["tokens_per_minute"],
        requests_per_minute=row["requests_per_minute"],
        tokens_tat=int(row["tokens_tat"]),
        requests_tat=int(row["requests_tat"]),
    )


def reservation_from_row(row: dict[str, Any]) -> Reservation:
    usage = (
        None
        if row["input_tokens"] is None
        else Usage(row["input_tokens"], row["output_tokens"], row["cached_input_tokens"])
    )
    return Reservation(
        reservation_id=row["reservation_id"],
        key=account_key(row),
        model=row["model"],
        amount=row["amount"],
        state=State(row["state"]),
        created_at=row["created_at"].astimezone(UTC),
        expires_at=row["expires_at"].astimezone(UTC),
        labels=tuple(sorted(row["labels"].items())),
        usage=usage,
        late=row["late"],
        ended_at=row["ended_at"].astimezone(UTC) if row["ended_at"] else None,
        money=row["money"],
        cost=row["cost"],
    )


def price_from_row(row: dict[str, Any]) -> PricePoint:
    return PricePoint(
        row["model"],
        row["effective_from"].astimezone(UTC),
        row["currency"],
        Price(row["input_per_mtok"], row["output_per_mtok"], row["cached_input_per_mtok"]),
    )


def scope_where(scope: Scope) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause (constant text, values as parameters) selecting the scope."""
    sql, params = "tenant_id = %s", [scope.tenant_id]
    if scope.user_id:
        sql, params = sql + " AND user_id = %s", [*params, scope.user_id]
    if scope.conversation_id:
        sql, params = sql + " AND conversation_id = %s", [*params, scope.conversation_id]
    return sql, tuple(params)


def logged_event(row: dict[str, Any]) -> LoggedEvent:
    return LoggedEvent(
        position=row["position"],
        key=AccountKey(row["tenant_id"], row["user_id"], row["conversation_id"]),
        version=row["version"],
        event_type=row["event_type"],
        occurred_at=row["occurred_at"],
        recorded_at=row["recorded_at"],
        model=row["model"],
        reservation_id=row["reservation_id"],
        amount=row["amount"],
        usage=Usage(row["input_tokens"], row["output_tokens"], row["cached_input_tokens"]),
        idempotency_key=row["idempotency_key"],
        actor=row["actor"],
        trace_id=row["trace_id"],
        data=row["data"],
        transaction_id=int(row["xid"]),
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
    )
