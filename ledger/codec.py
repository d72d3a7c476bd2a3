"""Events to table rows and back, the canonical event hash, and JSON for stored outcomes.

The hash of an event is sha256(prev_hash || canonical JSON of its row), where the canonical JSON
has sorted keys, no spaces, UTC times with microseconds, and covers every column an auditor
reads except the ones the database assigns (position, xid, recorded_at).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime
from typing import Any

from ledger.model import (
    EVENT_TYPES,
    Account,
    AccountKey,
    BalanceAdjusted,
    Event,
    Grant,
    GrantOrder,
    Period,
    QuotaSet,
    RateLimitSet,
    Reservation,
    ReservationCommitted,
    ReservationExpired,
    ReservationRolledBack,
    State,
    TokensGranted,
    TokensReserved,
    Usage,
    UsageRecorded,
)

GENESIS_HASH = bytes(32)

# The columns the hash covers, in the events table.
HASHED_COLUMNS = (
    "tenant_id",
    "user_id",
    "conversation_id",
    "version",
    "event_type",
    "occurred_at",
    "model",
    "reservation_id",
    "amount",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "idempotency_key",
    "actor",
    "trace_id",
    "data",
)


def ts(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_encode
    ).encode()


def _encode(value: object) -> object:
    if isinstance(value, datetime):
        return ts(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def event_hash(row: dict[str, Any], prev_hash: bytes) -> bytes:
    """The chain hash of an event row; `row` may come from the table or from event_row()."""
    body = {name: row[name] for name in HASHED_COLUMNS}
    return hashlib.sha256(prev_hash + canonical_json(body)).digest()


def _usage(event: Event) -> Usage:
    if isinstance(event, ReservationCommitted | UsageRecorded):
        return event.usage
    return Usage()


def _data(event: Event) -> dict[str, Any]:
    match event:
        case QuotaSet():
            return {
                "limit": event.limit,
                "period": event.period.value,
                "window_hours": event.window_hours,
                "time_zone": event.time_zone,
                "soft_limit_percent": event.soft_limit_percent,
                "grant_order": event.grant_order.value,
            }
        case TokensReserved():
            return {
                "expires_at": ts(event.expires_at),
                "labels": dict(event.labels),
                "requested": event.requested,
            }
        case TokensGranted():
            expires = ts(event.expires_at) if event.expires_at else None
            return {"grant_id": event.grant_id, "expires_at": expires, "reason": event.reason}
        case BalanceAdjusted():
            return {"reason": event.reason}
        case RateLimitSet():
            return {
                "tokens_per_minute": event.tokens_per_minute,
                "requests_per_minute": event.requests_per_minute,
            }
        case ReservationCommitted():
            return {"reserved_at": ts(event.reserved_at)}
        case ReservationRolledBack():
            return {"reason": event.reason}
        case UsageRecorded() if event.reserved_at is not None:
            return {"reserved_at": ts(event.reserved_at)}
    return {}


def _amount(event: Event) -> int:
    """The amount column: tokens held, released, granted or (signed) adjusted."""
    if isinstance(event, BalanceAdjusted):
        return event.tokens
    amount: int = getattr(event, "amount", 0)
    return amount


def event_row(event: Event, version: int, prev_hash: bytes) -> dict[str, Any]:
    """The events-table row of `event` at `version` of its stream, hash included."""
    usage = _usage(event)
    row: dict[str, Any] = {
        "tenant_id": event.key.tenant_id,
        "user_id": event.key.user_id,
        "conversation_id": event.key.conversation_id,
        "version": version,
        "event_type": type(event).__name__,
        "occurred_at": ts(event.occurred_at),
        "model": event.model,
        "reservation_id": getattr(event, "reservation_id", ""),
        "amount": _amount(event),
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "idempotency_key": event.idempotency_key,
        "actor": event.actor,
        "trace_id": event.trace_id,
        "data": _data(event),
    }
    row["prev_hash"] = prev_hash
    row["hash"] = event_hash(row, prev_hash)
    return row


def event_from_row(row: dict[str, Any]) -> Event:
    """The event an events-table row (or event_row() output) records."""
    cls = EVENT_TYPES[row["event_type"]]
    data = row["data"]
    occurred_at = row["occurred_at"]
    common: dict[str, Any] = {
        "key": AccountKey(row["tenant_id"], row["user_id"], row["conversation_id"]),
        "occurred_at": (
            occurred_at.astimezone(UTC)
            if isinstance(occurred_at, datetime)
            else parse_ts(occurred_at)
        ),
        "actor": row["actor"],
        "trace_id": row["trace_id"],
        "idempotency_key": row["idempotency_key"],
        "model": row["model"],
    }
    usage = Usage(row["input_tokens"], row["output_tokens"], row["cached_input_tokens"])
    rid, amount = row["reservation_id"], row["amount"]
    if cls is QuotaSet:
        return QuotaSet(
            limit=data["limit"],
            period=Period(data["period"]),
            # Quotas set before migration 0003 carry only limit and period.
            window_hours=data.get("window_hours", 0),
            time_zone=data.get("time_zone", "UTC"),
            soft_limit_percent=data.get("soft_limit_percent", 0),
            grant_order=GrantOrder(data.get("grant_order", GrantOrder.QUOTA_FIRST)),
            **common,
        )
    if cls is TokensReserved:
        return TokensReserved(
            reservation_id=rid,
            amount=amount,
            expires_at=parse_ts(data["expires_at"]),
            labels=tuple(sorted(data["labels"].items())),
            requested=data.get("requested", amount),
            **common,
        )
    if cls is TokensGranted:
        expires = data["expires_at"]
        return TokensGranted(
            grant_id=data["grant_id"],
            amount=amount,
            expires_at=parse_ts(expires) if expires else None,
            reason=data["reason"],
            **common,
        )
    if cls is BalanceAdjusted:
        return BalanceAdjusted(tokens=amount, reason=data["reason"], **common)
    if cls is RateLimitSet:
        return RateLimitSet(
            tokens_per_minute=data["tokens_per_minute"],
            requests_per_minute=data["requests_per_minute"],
            **common,
        )
    if cls is ReservationCommitted:
        reserved_at = parse_ts(data["reserved_at"])
        return ReservationCommitted(
            reservation_id=rid, amount=amount, usage=usage, reserved_at=reserved_at, **common
        )
    if cls is ReservationRolledBack:
        return ReservationRolledBack(
            reservation_id=rid, amount=amount, reason=data["reason"], **common
        )
    if cls is ReservationExpired:
        return ReservationExpired(reservation_id=rid, amount=amount, **common)
    reserved = data.get("reserved_at")
    return UsageRecorded(
        usage=usage,
        reservation_id=rid,
        reserved_at=parse_ts(reserved) if reserved else None,
        **common,
    )


# --- stored outcomes (idempotent replies) ---------------------------------------------------


def account_to_json(acc: Account) -> dict[str, Any]:
    return {
        "key": [acc.key.tenant_id, acc.key.user_id, acc.key.conversation_id],
        "limit": acc.limit,
        "period": acc.period.value,
        "held": acc.held,
        "used_total": acc.used_total,
        "used_day": acc.used_day,
        "day_start": acc.day_start.isoformat(),
        "used_month": acc.used_month,
        "month_start": acc.month_start.isoformat(),
        **policy_to_json(acc),
        "window_start_hour": acc.window_start_hour,
        "recent": [list(b) for b in acc.recent],
        "grants": grants_to_json(acc.grants),
    }


def policy_to_json(acc: Account) -> dict[str, Any]:
    return {
        "window_hours": acc.window_hours,
        "time_zone": acc.time_zone,
        "soft_limit_percent": acc.soft_limit_percent,
        "grant_order": acc.grant_order.value,
    }


def grants_to_json(grants: tuple[Grant, ...]) -> list[dict[str, Any]]:
    return [
        {
            "grant_id": g.grant_id,
            "remaining": g.remaining,
            "expires_at": ts(g.expires_at) if g.expires_at else None,
        }
        for g in grants
    ]


def grants_from_json(items: list[dict[str, Any]]) -> tuple[Grant, ...]:
    return tuple(
        Grant(
            expires_at=parse_ts(g["expires_at"]) if g["expires_at"] else None,
            grant_id=g["grant_id"],
            remaining=g["remaining"],
        )
        for g in items
    )


def account_from_json(obj: dict[str, Any]) -> Account:
    return Account(
        key=AccountKey(*obj["key"]),
        limit=obj["limit"],
        period=Period(obj["period"]),
        held=obj["held"],
        used_total=obj["used_total"],
        used_day=obj["used_day"],
        day_start=date.fromisoformat(obj["day_start"]),
        used_month=obj["used_month"],
        month_start=date.fromisoformat(obj["month_start"]),
        # Balances stored before migration 0003 have none of these.
        window_hours=obj.get("window_hours", 0),
        time_zone=obj.get("time_zone", "UTC"),
        soft_limit_percent=obj.get("soft_limit_percent", 0),
        grant_order=GrantOrder(obj.get("grant_order", GrantOrder.QUOTA_FIRST)),
        recent=tuple((h, t) for h, t in obj.get("recent", ())),
        grants=grants_from_json(obj.get("grants", [])),
        window_start_hour=obj.get("window_start_hour", 0),
    )


def reservation_to_json(res: Reservation) -> dict[str, Any]:
    usage = res.usage
    return {
        "reservation_id": res.reservation_id,
        "key": [res.key.tenant_id, res.key.user_id, res.key.conversation_id],
        "model": res.model,
        "amount": res.amount,
        "state": res.state.value,
        "created_at": ts(res.created_at),
        "expires_at": ts(res.expires_at),
        "labels": dict(res.labels),
        "usage": None
        if usage is None
        else [usage.input_tokens, usage.output_tokens, usage.cached_input_tokens],
        "late": res.late,
        "ended_at": ts(res.ended_at) if res.ended_at else None,
    }


def reservation_from_json(obj: dict[str, Any]) -> Reservation:
    return Reservation(
        reservation_id=obj["reservation_id"],
        key=AccountKey(*obj["key"]),
        model=obj["model"],
        amount=obj["amount"],
        state=State(obj["state"]),
        created_at=parse_ts(obj["created_at"]),
        expires_at=parse_ts(obj["expires_at"]),
        labels=tuple(sorted(obj["labels"].items())),
        usage=None if obj["usage"] is None else Usage(*obj["usage"]),
        late=obj["late"],
        ended_at=parse_ts(obj["ended_at"]) if obj["ended_at"] else None,
    )
