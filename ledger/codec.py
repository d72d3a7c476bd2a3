"""Events to table rows and back, the canonical event hash, and JSON for stored outcomes.

The hash of an event is sha256(prev_hash || canonical JSON of its row), where the canonical JSON
has sorted keys, no spaces, UTC times with microseconds, and covers every column an auditor
reads except the ones the database assigns (position, xid, recorded_at).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, get_args, get_type_hints

import orjson

from ledger import errors
from ledger.model import (
    EVENT_TYPES,
    Account,
    AccountKey,
    Event,
    Grant,
    GrantOrder,
    Period,
    PriceSet,
    Reservation,
    State,
    Usage,
)
from ledger.money import Price, PricePoint

GENESIS_HASH = bytes(32)

# The events table's columns that an event fills, with their SQL types. The hash covers all of
# them; the database adds position, recorded_at and xid, and the chain prev_hash and hash.
EVENT_COLUMNS: dict[str, str] = {
    "tenant_id": "text",
    "user_id": "text",
    "conversation_id": "text",
    "version": "bigint",
    "event_type": "text",
    "occurred_at": "timestamptz",
    "model": "text",
    "reservation_id": "text",
    "amount": "bigint",
    "input_tokens": "bigint",
    "output_tokens": "bigint",
    "cached_input_tokens": "bigint",
    "idempotency_key": "text",
    "actor": "text",
    "trace_id": "text",
    "data": "jsonb",
}
HASHED_COLUMNS = tuple(EVENT_COLUMNS)
CHAIN_COLUMNS = {"prev_hash": "bytea", "hash": "bytea"}


def ts(at: datetime) -> str:
    if at.tzinfo is not UTC:
        at = at.astimezone(UTC)
    return at.isoformat(timespec="microseconds")


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, text as is (UTF-8), times as `ts` writes them: json.dumps's
    bytes, written by orjson (several times faster: every event appended is hashed) when
    the value holds only what both write alike — strings, integers within 64 bits, booleans,
    null, lists, tuples, objects with string keys, times and dates; json.dumps itself for
    anything else (a float, which they write differently; a larger integer, a non-string
    key, which orjson refuses)."""
    if _plain(value):
        try:
            return orjson.dumps(value, default=_encode, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_encode
    ).encode()


_STATE_OPTIONS = _ORJSON_OPTIONS | orjson.OPT_PASSTHROUGH_DATACLASS


def state_json(value: Any) -> bytes:
    """canonical_json of a value that holds no float: the JSON that the *_to_json functions
    write of the state (integers, texts, booleans, null, lists and objects), which a
    checkpoint's digests and rows hold, hundreds of thousands at a time. orjson writes it
    without _plain's walk (which cost more than the writing); what it refuses (an integer
    past 64 bits, a key not a string, a time, a dataclass) goes through canonical_json. A
    float it would write, though not always as json.dumps does: the state holds none."""
    try:
        return orjson.dumps(value, option=_STATE_OPTIONS)
    except orjson.JSONEncodeError:
        return canonical_json(value)


def _plain(value: Any) -> bool:
    """Whether `value` holds nothing that orjson and json.dumps would write differently."""
    kind = type(value)
    if kind is str or kind is int or value is None or kind is bool:
        return True
    if kind is dict:
        for k, v in value.items():  # noqa: SIM110 (loops: a third less than all() here)
            if type(k) is not str or not _plain(v):
                return False
        return True
    if kind is list or kind is tuple:
        for v in value:  # noqa: SIM110
            if not _plain(v):
                return False
        return True
    return kind in _TIMES


_TIMES = (datetime, date)


_LONG_NUMBER = re.compile(rb"\d{19}")
"""A run of 19 digits may be an integer past 64 bits, which orjson reads as a float."""


def json_loads(data: str | bytes) -> Any:
    """The values json.loads reads, read by orjson where that gives the same (several times
    faster: a write reads the JSON columns of every account, reservation and key it loads, and
    a verification those of every projection row): a text that may hold an integer past 64
    bits, and one orjson refuses (a number past a double's range, deep nesting), go through
    json."""
    text = data.encode() if isinstance(data, str) else data
    if not _LONG_NUMBER.search(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def _encode(value: object) -> object:
    if isinstance(value, datetime):
        return ts(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def event_hash(row: dict[str, Any], prev_hash: bytes) -> bytes:
    """The chain hash of an event row; `row` may come from the table or from event_row()."""
    body = {name: row[name] for name in HASHED_COLUMNS}
    if type(at := body["occurred_at"]) is datetime:
        body["occurred_at"] = ts(at)  # once here, not through orjson's call back
    return hashlib.sha256(prev_hash + canonical_json(body)).digest()


def copied_event_hash(row: dict[str, Any], prev_hash: bytes) -> bytes:
    """event_hash of a row as a binary COPY gives it (verify._event_rows: text columns as
    str, bigint as int, occurred_at as a datetime, data as what json_loads read), without
    asking of each column whether orjson writes it as json.dumps does: only `data` can hold
    anything else (a float, an integer past 64 bits). tests/unit/test_canonical_json.py
    holds it equal to event_hash."""
    body = {name: row[name] for name in HASHED_COLUMNS}
    if type(at := body["occurred_at"]) is datetime and _plain(body["data"]):
        body["occurred_at"] = ts(at)
        try:
            text = orjson.dumps(body, default=_encode, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            return event_hash(row, prev_hash)
        return hashlib.sha256(prev_hash + text).digest()
    return event_hash(row, prev_hash)


# --- the layout of each event type, derived from its declaration in ledger/model.py ----------

_COMMON = frozenset(f.name for f in fields(Event))
_OWN_COLUMNS = frozenset({"reservation_id", "amount"})


@dataclass(frozen=True)
class _Field:
    name: str
    column: str  # "" for a field kept in `data`
    required: bool
    omit_none: bool
    absent_is: str
    encode: Callable[[Any], Any]
    """To its JSON in `data` (None stays None)."""
    decode: Callable[[Any], Any]
    """From its JSON in `data` (None stays None)."""


def _layout(cls: type[Event]) -> tuple[_Field, ...]:
    """The fields of an event type beyond the common ones, with where each is stored."""
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.name in _COMMON:
            continue
        column = f.metadata.get("column") or (f.name if f.name in _OWN_COLUMNS else "")
        out.append(
            _Field(
                name=f.name,
                column="usage" if f.name == "usage" else column,
                required=f.default is MISSING,
                omit_none=f.metadata.get("omit_none", False),
                absent_is=f.metadata.get("absent_is", ""),
                encode=_encoder(hints[f.name]),
                decode=_decoder(hints[f.name]),
            )
        )
    return tuple(out)


_LABELS = tuple[tuple[str, str], ...]
_INTS = tuple[int, ...]


def _base(kind: Any) -> Any:
    """X of a declared `X | None`, else `kind`."""
    return next((a for a in get_args(kind) if a is not type(None)), kind)


def _encoder(kind: Any) -> Callable[[Any], Any]:
    """How a value of the declared type `kind` is written into `data`."""
    base = _base(kind)
    if kind == _LABELS:
        return dict
    if kind == _INTS:
        return list
    if base is datetime:
        return ts
    if isinstance(base, type) and issubclass(base, StrEnum):
        return lambda v: v.value
    return lambda v: v


def _decoder(kind: Any) -> Callable[[Any], Any]:
    """How a `data` value of the declared type `kind` is read back."""
    base = _base(kind)
    if kind == _LABELS:
        return lambda v: tuple(sorted(v.items()))
    if kind == _INTS:
        return tuple
    if base is datetime:
        return parse_ts
    if isinstance(base, type) and issubclass(base, StrEnum):
        return base
    return lambda v: v


_LAYOUTS = {cls: _layout(cls) for cls in EVENT_TYPES.values()}


def _defaults(cls: type[Event]) -> dict[str, Any]:
    """The fields of an event type that have a default, with it (what __init__ fills in)."""
    assert all(f.default_factory is MISSING for f in fields(cls)), cls
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


_DEFAULTS = {cls: _defaults(cls) for cls in EVENT_TYPES.values()}


def event_row(event: Event, version: int, prev_hash: bytes) -> dict[str, Any]:
    """The events-table row of `event` at `version` of its stream, hash included."""
    row: dict[str, Any] = {
        "tenant_id": event.key.tenant_id,
        "user_id": event.key.user_id,
        "conversation_id": event.key.conversation_id,
        "version": version,
        "event_type": type(event).__name__,
        "occurred_at": ts(event.occurred_at),
        "model": event.model,
        "reservation_id": "",
        "amount": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_input_tokens": 0,
        "idempotency_key": event.idempotency_key,
        "actor": event.actor,
        "trace_id": event.trace_id,
        "data": {},
    }
    for f in _LAYOUTS[type(event)]:
        value = getattr(event, f.name)
        if f.column == "usage":
            row |= vars(value)
        elif f.column:
            row[f.column] = value
        elif not (f.omit_none and value is None):
            row["data"][f.name] = None if value is None else f.encode(value)
    row["prev_hash"] = prev_hash
    row["hash"] = event_hash(row, prev_hash)
    return row


def event_from_row(row: dict[str, Any]) -> Event:
    """The event an events-table row (or event_row() output) records."""
    cls = EVENT_TYPES[row["event_type"]]
    occurred_at = row["occurred_at"]
    values: dict[str, Any] = {
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
    data = row["data"]
    for f in _LAYOUTS[cls]:
        if f.column == "usage":
            values[f.name] = Usage(
                row["input_tokens"], row["output_tokens"], row["cached_input_tokens"]
            )
        elif f.column:
            values[f.name] = row[f.column]
        elif f.name in data:
            value = data[f.name]
            values[f.name] = None if value is None else f.decode(value)
        elif f.absent_is:  # logged before the field existed
            values[f.name] = values.get(f.absent_is, row.get(f.absent_is))
        elif f.required:
            raise KeyError(f"{cls.__name__} row has no {f.name!r} in its data")
    # cls(**values) without calling __init__, which sets a frozen dataclass's fields one call
    # at a time (a third of a decode): every field is in `values` or has its default (a
    # required one missing was refused above), and events validate nothing in __init__.
    event = object.__new__(cls)
    event.__dict__.update(_DEFAULTS[cls], **values)
    return event


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
        **alerts_to_json(acc),
        "money": None if acc.money is None else account_to_json(acc.money),
    }


def alerts_to_json(acc: Account) -> dict[str, Any]:
    return {
        "alert_thresholds": list(acc.alert_thresholds),
        "alerts_fired": list(acc.alerts_fired),
        "alerts_period": acc.alerts_period.isoformat(),
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
        # Balances stored before budget alerts have none.
        alert_thresholds=tuple(obj.get("alert_thresholds", ())),
        alerts_fired=tuple(obj.get("alerts_fired", ())),
        alerts_period=date.fromisoformat(obj.get("alerts_period", "1970-01-01")),
        # Balances stored before money have none.
        money=account_from_json(obj["money"]) if obj.get("money") else None,
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
        "money": res.money,
        "cost": res.cost,
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
        money=obj.get("money", 0),
        cost=obj.get("cost"),
    )


# --- stored refusals (one key, one outcome) -------------------------------------------------


def refusal_to_json(exc: errors.Refusal) -> dict[str, Any]:
    """A budget or rate refusal as its key's stored outcome: every figure it was made of."""
    if isinstance(exc, errors.BudgetExhausted):
        return {
            "reason": exc.reason,
            "requested": exc.requested,
            "level": asdict(exc.level),
            "reservable": exc.reservable,
            "resets_at": ts(exc.resets_at) if exc.resets_at else None,
        }
    if isinstance(exc, errors.RateLimited):
        return {
            "reason": exc.reason,
            "kind": exc.kind,
            "account": exc.account,
            "model": exc.model,
            "per_minute": exc.per_minute,
            "requested": exc.requested,
            "room": exc.room,
            "retry_after_s": exc.retry_after_s,
        }
    raise TypeError(f"no stored form for {type(exc).__name__}")


def refusal_from_json(obj: dict[str, Any]) -> errors.Refusal:
    """The refusal a key's first call got, as it was."""
    fields = {k: v for k, v in obj.items() if k != "reason"}
    if obj["reason"] == errors.BudgetExhausted.reason:
        resets_at = fields.pop("resets_at")
        return errors.BudgetExhausted(
            level=errors.RefusingLevel(**fields.pop("level")),
            resets_at=parse_ts(resets_at) if resets_at else None,
            **fields,
        )
    return errors.RateLimited(**fields)


# --- prices ---------------------------------------------------------------------------------


def price_to_json(event: PriceSet) -> dict[str, Any]:
    return {
        "model": event.model,
        "effective_from": ts(event.effective_from),
        "currency": event.currency,
        "per_mtok": [event.input_per_mtok, event.output_per_mtok, event.cached_input_per_mtok],
    }


def price_from_json(obj: dict[str, Any]) -> PricePoint:
    return PricePoint(
        obj["model"], parse_ts(obj["effective_from"]), obj["currency"], Price(*obj["per_mtok"])
    )
