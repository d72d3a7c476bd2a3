"""Reading the log: replay, balances as of a past instant, verification, usage queries and a
follower feed. Nothing here writes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ledger import codec, limits
from ledger.model import Account, AccountKey, BalanceResult, RateLimit, RateLimitKey
from ledger.replay import ChainBreak, ChainVerifier, Projection
from ledger.rows import (
    ACCOUNT_COLUMNS,
    RATE_LIMIT_COLUMNS,
    RESERVATION_COLUMNS,
    account_from_row,
    account_key,
    rate_limit_from_row,
    reservation_from_row,
)
from ledger.usage import COUNTER_NAMES, UsageCounters, UsageKey, add_usage

Conn = psycopg.AsyncConnection[dict[str, Any]]

_EVENT_COLUMNS = """position, tenant_id, user_id, conversation_id, version, event_type,
    occurred_at, recorded_at, model, reservation_id, amount, input_tokens, output_tokens,
    cached_input_tokens, idempotency_key, actor, trace_id, data, xid::text AS xid, prev_hash,
    hash"""
FETCH_ROWS = 2_000


@dataclass(frozen=True)
class Scope:
    """A tenant, one user of it, or one conversation of that user."""

    tenant_id: str
    user_id: str = ""
    conversation_id: str = ""

    def where(self) -> tuple[str, tuple[Any, ...]]:
        """A WHERE clause (constant text, values as parameters) selecting the scope."""
        sql, params = "tenant_id = %s", [self.tenant_id]
        if self.user_id:
            sql, params = sql + " AND user_id = %s", [*params, self.user_id]
        if self.conversation_id:
            sql, params = sql + " AND conversation_id = %s", [*params, self.conversation_id]
        return sql, tuple(params)


@dataclass(frozen=True)
class Difference:
    kind: str  # "account", "stream", "reservation" or "usage"
    key: str
    field: str
    live: str
    rebuilt: str


@dataclass
class VerifyReport:
    events_checked: int = 0
    streams_checked: int = 0
    breaks: list[ChainBreak] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)


@dataclass(frozen=True)
class UsageQuery:
    tenant_id: str
    from_time: datetime
    to_time: datetime
    group_by: tuple[str, ...] = ()  # of GROUPS
    user_id: str = ""
    conversation_id: str = ""
    model: str = ""


@dataclass(frozen=True)
class UsageRow:
    user_id: str
    conversation_id: str
    model: str
    period_start: datetime | None
    counters: UsageCounters


# group name -> the columns it selects and groups by
GROUPS: dict[str, tuple[str, ...]] = {
    "user": ("user_id",),
    "conversation": ("user_id", "conversation_id"),
    "model": ("model",),
    "day": ("date_trunc('day', hour, 'UTC') AS period_start",),
    "hour": ("hour AS period_start",),
}


class LedgerAudit:
    """Read-only access to the log and the projections for auditors, finance and followers."""

    def __init__(
        self, pool: AsyncConnectionPool[Conn], primary: AsyncConnectionPool[Conn] | None = None
    ) -> None:
        """Reads go to `pool`, which may be a read replica's; past balances and the follower
        feed read the `primary` (default: `pool`): a replica's lag would hide recent events,
        and the feed's cursor rule (transaction ids below the oldest running one) must not meet
        a replica's cancelled queries or a failover's other history."""
        self._pool = pool
        self._primary = primary or pool

    @asynccontextmanager
    async def _snapshot(self, primary: bool = False) -> AsyncIterator[Conn]:
        """A read-only transaction on one snapshot: every query in it sees the same log and
        the same projections, whatever commits meanwhile."""
        pool = self._primary if primary else self._pool
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    @staticmethod
    async def _stream(
        conn: Conn, sql: str, params: tuple[Any, ...]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Rows of a query through a server-side cursor, so a long log streams in chunks."""
        async with conn.cursor(name="ledger_read") as cur:
            await cur.execute(sql, params)
            while rows := await cur.fetchmany(FETCH_ROWS):
                for row in rows:
                    yield row

    async def _rows(
        self, sql: str, params: tuple[Any, ...], primary: bool = False
    ) -> AsyncGenerator[dict[str, Any], None]:
        async with self._snapshot(primary) as conn:
            async for row in self._stream(conn, sql, params):
                yield row

    def events(
        self,
        scope: Scope,
        from_position: int = 0,
        from_time: datetime | None = None,
        limit: int | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The event rows of `scope` in log order (at most `limit`)."""
        return self._rows(*_events_sql(scope, from_position, from_time, limit))

    async def balance_at(self, key: AccountKey, as_of: datetime) -> BalanceResult:
        """The balance of `key` and its ancestors as it stood at `as_of`, from the log (the
        primary's: on a replica, an instant within its lag would silently miss events)."""
        scope = Scope(key.tenant_id)
        where, params = scope.where()
        projection = Projection()
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} AND occurred_at <= %s "  # noqa: S608
        async for row in self._rows(sql + "ORDER BY position", (*params, as_of), primary=True):
            projection.feed(codec.event_from_row(row))
        accounts = [projection.accounts.get(k, Account(k)).rolled(as_of) for k in key.lineage()]
        return BalanceResult(balance=accounts[-1], ancestors=tuple(accounts[:-1]))

    async def verify(self, scope: Scope) -> VerifyReport:
        """Recompute every chain in scope and rebuild its projections from the log in one pass
        in log order, then compare with the live rows. A user scope covers its own accounts,
        reservations and usage (the tenant's account needs the whole tenant)."""
        chains, rebuilt = ChainVerifier(), Projection()
        usage: dict[UsageKey, UsageCounters] = {}
        unreadable: list[Difference] = []
        async with self._snapshot() as conn:
            async for row in self._stream(conn, *_events_sql(scope, 0, None, None)):
                chains.feed(row)
                try:  # a tampered row may not even decode; the chain check names it too
                    event = codec.event_from_row(row)
                except (KeyError, ValueError, TypeError) as exc:
                    unreadable.append(
                        Difference("event", str(row["position"]), "*", "unreadable", repr(exc))
                    )
                    continue
                rebuilt.feed(event)
                add_usage(usage, event)
            live = await self._live(conn, scope)
        report = VerifyReport(
            events_checked=chains.checked, streams_checked=len(chains.heads), breaks=chains.breaks
        )
        report.differences += unreadable
        report.differences += _compare_accounts(live.accounts, rebuilt.accounts, scope)
        report.differences += _compare_streams(live.streams, chains.heads)
        report.differences += _compare(
            "reservation", live.reservations, rebuilt.reservations, lambda r: r
        )
        report.differences += _compare("usage", live.usage, usage, _usage_key_text)
        report.differences += _compare(
            "rate_limit", live.rate_limits, rebuilt.rate_limits, _rate_limit_key_text
        )
        return report

    @staticmethod
    async def _live(conn: Conn, scope: Scope) -> _Live:
        where, params = scope.where()
        out = _Live()
        sql = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE {where}"  # noqa: S608
        cur = await conn.execute(sql, params)
        for row in await cur.fetchall():
            out.accounts[account_key(row)] = account_from_row(row)
            out.streams[account_key(row)] = (row["stream_version"], bytes(row["head_hash"]))
        sql = f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE {where}"  # noqa: S608
        cur = await conn.execute(sql, params)
        for row in await cur.fetchall():
            out.reservations[row["reservation_id"]] = reservation_from_row(row)
        sql = f"SELECT {RATE_LIMIT_COLUMNS} FROM rate_limits WHERE {where}"  # noqa: S608
        cur = await conn.execute(sql, params)
        for row in await cur.fetchall():
            rl = rate_limit_from_row(row)
            out.rate_limits[rl.key] = rl
        cur = await conn.execute(f"SELECT * FROM usage_hourly WHERE {where}", params)  # noqa: S608
        for row in await cur.fetchall():
            key = UsageKey(
                row["tenant_id"], row["hour"], row["user_id"], row["conversation_id"],
                row["model"],
            )  # fmt: skip
            out.usage[key] = UsageCounters(**{c: row[c] for c in COUNTER_NAMES})
        return out

    # --- usage ------------------------------------------------------------------------------

    def _usage_sql(self, q: UsageQuery) -> tuple[str, tuple[Any, ...]]:
        columns = [c for g in q.group_by for c in GROUPS[g]]
        columns = list(dict.fromkeys(columns))  # "user" and "conversation" share user_id
        keys = [c.split(" AS ")[-1] for c in columns]
        sums = ", ".join(f"sum({c})::bigint AS {c}" for c in COUNTER_NAMES)
        where = [
            "tenant_id = %s",
            "hour >= date_trunc('hour', %s::timestamptz, 'UTC')",
            "hour < %s",
        ]
        params: list[Any] = [q.tenant_id, q.from_time, q.to_time]
        for name in ("user_id", "conversation_id", "model"):
            if getattr(q, name):
                where.append(f"{name} = %s")
                params.append(getattr(q, name))
        sql = (
            f"SELECT {', '.join([*columns, sums])} FROM usage_hourly "  # noqa: S608
            f"WHERE {' AND '.join(where)}"
        )
        if keys:
            sql += f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
        else:
            sql += " HAVING count(*) > 0"
        return sql, tuple(params)

    async def query_usage(self, q: UsageQuery, offset: int, limit: int) -> list[UsageRow]:
        sql, params = self._usage_sql(q)
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql + " LIMIT %s OFFSET %s", (*params, limit, offset))
            return [_usage_row(row) for row in await cur.fetchall()]

    async def export_usage(self, q: UsageQuery) -> AsyncGenerator[UsageRow, None]:
        async for row in self._rows(*self._usage_sql(q)):
            yield _usage_row(row)

    # --- followers --------------------------------------------------------------------------

    async def follow(
        self,
        tenant_id: str,
        after: tuple[int, int],
        from_position: int,
        stop: asyncio.Event,
        poll_s: float = limits.follow_poll_s,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Committed events after the cursor (transaction id, position), in that order, then
        new ones as they commit, until `stop`. Only transactions below the snapshot's xmin are
        read: they are all finished, and any that commits later has a larger id, so ordering
        by it never skips a late commit (ordering by position would)."""
        xid, position = after
        tenant_sql = "AND tenant_id = %s " if tenant_id else ""
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events "  # noqa: S608 (constant parts only)
            "WHERE (xid, position) > (%s::text::xid8, %s) "
            "AND xid < pg_snapshot_xmin(pg_current_snapshot()) AND position >= %s "
            f"{tenant_sql}ORDER BY xid, position LIMIT %s"
        )
        while not stop.is_set():
            params: tuple[Any, ...] = (str(xid), position, from_position)
            params += (tenant_id,) if tenant_id else ()
            async with self._primary.connection() as conn:
                cur = await conn.execute(sql, (*params, FETCH_ROWS))
                rows = await cur.fetchall()
            for row in rows:
                xid, position = int(row["xid"]), row["position"]
                yield row
            if len(rows) < FETCH_ROWS:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), poll_s)


@dataclass
class _Live:
    accounts: dict[AccountKey, Account] = field(default_factory=dict)
    streams: dict[AccountKey, tuple[int, bytes]] = field(default_factory=dict)
    reservations: dict[str, Any] = field(default_factory=dict)
    usage: dict[UsageKey, UsageCounters] = field(default_factory=dict)
    rate_limits: dict[RateLimitKey, RateLimit] = field(default_factory=dict)


def _events_sql(
    scope: Scope, from_position: int, from_time: datetime | None, limit: int | None
) -> tuple[str, tuple[Any, ...]]:
    where, params = scope.where()
    sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} AND position >= %s"  # noqa: S608
    params += (from_position,)
    if from_time is not None:
        sql, params = sql + " AND occurred_at >= %s", (*params, from_time)
    sql += " ORDER BY position"
    if limit is not None:
        sql, params = sql + " LIMIT %s", (*params, limit)
    return sql, params


def _usage_row(row: dict[str, Any]) -> UsageRow:
    return UsageRow(
        user_id=row.get("user_id", ""),
        conversation_id=row.get("conversation_id", ""),
        model=row.get("model", ""),
        period_start=row.get("period_start"),
        counters=UsageCounters(**{c: row[c] for c in COUNTER_NAMES}),
    )


def _usage_key_text(key: UsageKey) -> str:
    return f"{key.tenant_id}/{key.user_id}/{key.conversation_id}@{key.hour.isoformat()}:{key.model}"


def _rate_limit_key_text(key: RateLimitKey) -> str:
    return f"{key.account}:{key.model or '*'}"


def _compare_accounts(
    live: dict[AccountKey, Account], rebuilt: dict[AccountKey, Account], scope: Scope
) -> list[Difference]:
    if scope.user_id:  # the tenant's own account needs the whole tenant's log
        live = {k: v for k, v in live.items() if k.user_id}
        rebuilt = {k: v for k, v in rebuilt.items() if k.user_id}
    # An account row exists once anything was written for it; one with no events (a refused
    # first reservation never makes a row: its transaction commits nothing) equals a new one.
    return _compare("account", live, rebuilt, str, default=Account)


def _compare_streams(
    live: dict[AccountKey, tuple[int, bytes]], heads: dict[AccountKey, tuple[int, bytes]]
) -> list[Difference]:
    out = []
    for key in sorted(live.keys() | heads.keys()):
        a, b = live.get(key, (0, codec.GENESIS_HASH)), heads.get(key, (0, codec.GENESIS_HASH))
        if a != b:
            out.append(
                Difference(
                    "stream", str(key), "head", f"{a[0]}:{a[1].hex()}", f"{b[0]}:{b[1].hex()}"
                )
            )
    return out


def _compare(
    kind: str,
    live: dict[Any, Any],
    rebuilt: dict[Any, Any],
    name: Callable[[Any], str],
    default: Callable[[Any], Any] | None = None,
) -> list[Difference]:
    """Field by field differences between two maps of dataclasses."""
    out = []
    for key in sorted(live.keys() | rebuilt.keys()):
        a = live.get(key) or (default(key) if default else None)
        b = rebuilt.get(key) or (default(key) if default else None)
        if a == b:
            continue
        if a is None or b is None:
            out.append(Difference(kind, name(key), "*", _text(a), _text(b)))
            continue
        for f in fields(a):
            if not f.compare:  # derived from the time of reading, not state
                continue
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                out.append(Difference(kind, name(key), f.name, _text(va), _text(vb)))
    return out


def _text(value: Any) -> str:
    return "(missing)" if value is None else str(value)
