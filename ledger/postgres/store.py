"""The ledger's store in PostgreSQL: a unit of work per tenant transaction (ledger/ports.py), and
the reads the application needs. Every write statement of the ledger is here.

Locks: account rows are locked with SELECT ... FOR UPDATE in key order, the tenant row first;
limiter and reservation rows after them. The (stream, version) primary key of the events
table is the backstop should two writers ever race on one stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import date, datetime
from typing import Any

import orjson
import psycopg
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from ledger import codec
from ledger.errors import CheckpointRefused
from ledger.model import Account, AccountKey, RateLimit, Reservation
from ledger.money import PricePoint
from ledger.ports import (
    Changes,
    FoldedEvent,
    Locked,
    Outcome,
    StoredReservation,
    StreamHead,
)
from ledger.postgres import notify
from ledger.postgres.errors import translated
from ledger.postgres.rows import (
    ACCOUNT_COLUMNS,
    RATE_LIMIT_COLUMNS,
    RESERVATION_COLUMNS,
    account_from_row,
    account_key,
    price_from_row,
    rate_limit_from_row,
    reservation_from_row,
    select_accounts_sql,
)
from ledger.usage import COUNTER_NAMES

Conn = psycopg.AsyncConnection[dict[str, Any]]

_log = logging.getLogger("tokenledger.follow")

# The hot tables are written one statement each, whatever the number of rows: the rows go as
# one jsonb array (serialized by orjson) that jsonb_to_recordset spreads into typed columns.
# Row by row (executemany) each row was a statement of its own: its parameters adapted in
# Python, a message to the server and a socket write, about as much CPU again as the call
# that made the row. bytea travels as '\x' hex text, timestamps as ISO 8601 with offset.
_EVENT_TYPES = {**codec.EVENT_COLUMNS, **codec.CHAIN_COLUMNS}


def _recordset(table: str, rows: str) -> str:
    """The records of the jsonb array parameter `rows` (its placeholder) as rows of `table`
    (its column types; keys absent are NULL), numbered in the array's order
    (`r.ordinality`)."""
    return (
        f"ROWS FROM (jsonb_populate_recordset(NULL::{table}, {rows}::jsonb)) WITH ORDINALITY AS r"
    )


def _insert_events(rows: str = "%(rows)s") -> str:  # in the order decided: versions follow it
    return (
        f"INSERT INTO events ({', '.join(_EVENT_TYPES)}) "  # noqa: S608 (constant names)
        f"SELECT {', '.join(_EVENT_TYPES)} FROM {_recordset('events', rows)} ORDER BY r.ordinality"
    )


_ACCOUNT_TYPES = {
    "tenant_id": "text", "user_id": "text", "conversation_id": "text", "quota_limit": "bigint",
    "period": "text", "window_hours": "integer", "time_zone": "text",
    "soft_limit_percent": "integer", "grant_order": "text", "held": "bigint",
    "used_total": "bigint", "used_day": "bigint", "day_start": "date", "used_month": "bigint",
    "month_start": "date", "recent": "jsonb", "grants": "jsonb", "alert_thresholds": "jsonb",
    "alerts_fired": "jsonb", "alerts_period": "date", "money": "jsonb",
    "stream_version": "bigint", "head_hash": "bytea",
}  # fmt: skip
_ACCOUNT_KEY = ("tenant_id", "user_id", "conversation_id")


def _update_accounts(rows: str = "%(rows)s") -> str:
    return (
        "UPDATE accounts AS a SET "  # noqa: S608 (constant names)
        + ", ".join(f"{c} = r.{c}" for c in _ACCOUNT_TYPES if c not in _ACCOUNT_KEY)
        + f", updated_at = now() FROM {_recordset('accounts', rows)} WHERE "
        + " AND ".join(f"a.{c} = r.{c}" for c in _ACCOUNT_KEY)
    )


_UPSERT_RATE_LIMITS = (
    f"INSERT INTO rate_limits ({RATE_LIMIT_COLUMNS}) VALUES "  # noqa: S608 (constant)
    "(%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT "
    "(tenant_id, user_id, conversation_id, model) DO UPDATE SET "
    "tokens_per_minute = EXCLUDED.tokens_per_minute, "
    "requests_per_minute = EXCLUDED.requests_per_minute, "
    "tokens_tat = EXCLUDED.tokens_tat, requests_tat = EXCLUDED.requests_tat"
)
_RESERVATION_TYPES = {
    "tenant_id": "text", "reservation_id": "text", "user_id": "text", "conversation_id": "text",
    "model": "text", "amount": "bigint", "state": "text", "created_at": "timestamptz",
    "expires_at": "timestamptz", "labels": "jsonb", "input_tokens": "bigint",
    "output_tokens": "bigint", "cached_input_tokens": "bigint", "late": "boolean",
    "ended_at": "timestamptz", "ended_balance": "jsonb", "money": "bigint", "cost": "bigint",
}  # fmt: skip
assert list(_RESERVATION_TYPES) == [c.strip() for c in RESERVATION_COLUMNS.split(",")]


def _insert_reservations(rows: str = "%(rows)s") -> str:
    return (
        f"INSERT INTO reservations ({RESERVATION_COLUMNS}) "  # noqa: S608 (constant)
        f"SELECT {RESERVATION_COLUMNS} FROM {_recordset('reservations', rows)}"
    )


_RESERVATION_CHANGES = ("state", "input_tokens", "output_tokens", "cached_input_tokens",
                        "late", "ended_at", "ended_balance", "cost")  # fmt: skip


def _update_reservations(rows: str = "%(rows)s") -> str:
    return (
        "UPDATE reservations AS t SET "  # noqa: S608 (constant names)
        + ", ".join(f"{c} = r.{c}" for c in _RESERVATION_CHANGES)
        + f" FROM {_recordset('reservations', rows)} "
        "WHERE t.tenant_id = r.tenant_id AND t.reservation_id = r.reservation_id"
    )


_USAGE_TYPES = {
    "tenant_id": "text", "hour": "timestamptz", "user_id": "text", "conversation_id": "text",
    "model": "text", **{c: "bigint" for c in COUNTER_NAMES},
}  # fmt: skip


def _upsert_usage(rows: str = "%(rows)s") -> str:
    return (
        f"INSERT INTO usage_hourly ({', '.join(_USAGE_TYPES)}) "  # noqa: S608 (constant names)
        f"SELECT {', '.join(_USAGE_TYPES)} FROM {_recordset('usage_hourly', rows)} "
        "ON CONFLICT (tenant_id, hour, user_id, conversation_id, model) DO UPDATE SET "
        + ", ".join(f"{c} = usage_hourly.{c} + EXCLUDED.{c}" for c in COUNTER_NAMES)
    )


# A key written again has expired (a live one is answered, not decided): the row is replaced.
_OUTCOME_TYPES = {
    "tenant_id": "text", "idempotency_key": "text", "operation": "text", "request": "jsonb",
    "response": "jsonb", "created_at": "timestamptz",
}  # fmt: skip


def _insert_outcomes(rows: str = "%(rows)s") -> str:
    return (
        f"INSERT INTO idempotency_keys ({', '.join(_OUTCOME_TYPES)}) "  # noqa: S608 (constant)
        f"SELECT {', '.join(_OUTCOME_TYPES)} FROM {_recordset('idempotency_keys', rows)} "
        "ON CONFLICT (tenant_id, idempotency_key) DO UPDATE SET "
        "operation = EXCLUDED.operation, request = EXCLUDED.request, "
        "response = EXCLUDED.response, created_at = EXCLUDED.created_at"
    )


_WRITES = {
    "events": _insert_events,
    "accounts": _update_accounts,
    "new_reservations": _insert_reservations,
    "changed_reservations": _update_reservations,
    "usage": _upsert_usage,
    "outcomes": _insert_outcomes,
}
"""The hot tables' writes, by the name of the records each takes."""
_WRITE_ALL = (
    "WITH "
    + ", ".join(
        f"{name}_written AS ({statement(f'${n}')})"
        for n, (name, statement) in enumerate(_WRITES.items(), 1)
    )
    + " SELECT 1"
)
"""All of them as one statement (data-modifying CTEs: each runs once, to completion; they
touch different rows, so none needs to see another's effect). PostgreSQL's own $n
placeholders, through a raw cursor: the text is longer than psycopg caches its conversions
for, and would be parsed again on every call."""
_PRUNE_OUTCOMES = "SELECT prune_idempotency_keys(%s, %s) AS pruned"  # migration 0007
_PROJECTION_TABLES = ("accounts", "reservations", "usage_hourly", "rate_limits", "prices")
_UPSERT_PRICES = """INSERT INTO prices (tenant_id, model, effective_from, currency,
       input_per_mtok, output_per_mtok, cached_input_per_mtok)
   VALUES (%s, %s, %s, %s, %s, %s, %s)
   ON CONFLICT (tenant_id, model, effective_from) DO UPDATE SET currency = EXCLUDED.currency,
       input_per_mtok = EXCLUDED.input_per_mtok, output_per_mtok = EXCLUDED.output_per_mtok,
       cached_input_per_mtok = EXCLUDED.cached_input_per_mtok"""
# The prices of the models a batch names, and of the models of the reservations it ends.
_LOCKED_PRICES = """SELECT model, effective_from, currency, input_per_mtok, output_per_mtok,
       cached_input_per_mtok FROM prices
   WHERE tenant_id = %(tenant)s AND (model = ANY(%(models)s) OR model IN (
       SELECT model FROM reservations
        WHERE tenant_id = %(tenant)s AND reservation_id = ANY(%(reservations)s)))
   ORDER BY model, effective_from"""
_TENANT_PRICES = """SELECT model, effective_from, currency, input_per_mtok, output_per_mtok,
       cached_input_per_mtok FROM prices
   WHERE tenant_id = %(tenant)s AND (%(model)s = '' OR model = %(model)s)
   ORDER BY model, effective_from"""


def _dumps(obj: Any) -> bytes | str:
    """JSON for jsonb parameters through orjson (a jsonb column keeps no text, so only the
    value matters); what orjson refuses (integers past 64 bits) goes through json. Dates and
    times (in records) as ISO 8601, with their offset, either way."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, default=_iso)


def _iso(value: Any) -> str:
    if isinstance(value, date):  # datetime too
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _jsonb(obj: Any) -> Jsonb:
    return Jsonb(obj, dumps=_dumps)


def _heads(rows: Sequence[dict[str, Any]]) -> dict[AccountKey, StreamHead]:
    return {
        account_key(row): StreamHead(
            account_from_row(row), row["stream_version"], bytes(row["head_hash"])
        )
        for row in rows
    }


class PostgresStore:
    """The `Store` of ledger/ports.py over a PostgreSQL connection pool."""

    def __init__(self, pool: AsyncConnectionPool[Conn]) -> None:
        self._pool = pool
        self._known_accounts: set[AccountKey] = set()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        """A pooled connection; database errors leave the block as ledger errors."""
        with translated():
            async with self._pool.connection() as conn:
                yield conn

    @asynccontextmanager
    async def transaction(self, tenant_id: str) -> AsyncIterator[_Unit]:
        async with self._connection() as conn:
            unit = _Unit(conn, tenant_id, self._known_accounts)
            try:
                await unit.begin()
                yield unit
                await unit.commit()
            finally:
                await unit.end()

    async def overdue_tenants(self, at: datetime, limit: int) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute(
                """SELECT DISTINCT tenant_id FROM reservations
                   WHERE state = 'held' AND expires_at <= %s LIMIT %s""",
                (at, limit),
            )
            return [row["tenant_id"] for row in await cur.fetchall()]

    async def reservation(self, tenant_id: str, reservation_id: str) -> Reservation | None:
        async with self._connection() as conn:
            cur = await conn.execute(
                f"SELECT {RESERVATION_COLUMNS} FROM reservations "  # noqa: S608 (constant)
                "WHERE tenant_id = %s AND reservation_id = %s",
                (tenant_id, reservation_id),
            )
            row = await cur.fetchone()
        return None if row is None else reservation_from_row(row)

    async def accounts(self, keys: Sequence[AccountKey]) -> dict[AccountKey, Account]:
        async with self._connection() as conn:
            cur = await conn.execute(*select_accounts_sql(keys, lock=False))
            return {account_key(row): account_from_row(row) for row in await cur.fetchall()}

    async def prune_outcomes(self, before: datetime, limit: int) -> int:
        async with self._connection() as conn:
            cur = await conn.execute(_PRUNE_OUTCOMES, (before, limit))
            row = await cur.fetchone()
        return int(row["pruned"]) if row else 0

    async def outcome_count(self) -> int:
        async with self._connection() as conn:
            cur = await conn.execute("SELECT count(*) AS n FROM idempotency_keys")
            row = await cur.fetchone()
        return int(row["n"]) if row else 0

    async def prices(self, tenant_id: str, model: str = "") -> list[PricePoint]:
        async with self._connection() as conn:
            cur = await conn.execute(_TENANT_PRICES, {"tenant": tenant_id, "model": model})
            return [price_from_row(row) for row in await cur.fetchall()]

    async def currency(self, tenant_id: str) -> str:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT currency FROM prices WHERE tenant_id = %s LIMIT 1", (tenant_id,)
            )
            row = await cur.fetchone()
        return row["currency"] if row else ""

    async def held_total(self) -> int:
        """Every hold counts in its tenant's row: this reads every tenant row."""
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT coalesce(sum(held), 0) AS held FROM accounts WHERE user_id = ''"
            )
            row = await cur.fetchone()
        return int(row["held"]) if row else 0


class _Unit:
    """A unit of work in one PostgreSQL transaction, sent as one pipeline: BEGIN travels with
    the first statements and COMMIT with the last, so that a transaction costs as many round
    trips as it has reads to wait for, plus one (psycopg's own transaction() waits for BEGIN
    and for COMMIT apart: two more). BEGIN and COMMIT are explicit statements, which needs an
    autocommit connection: it is switched for the transaction and back before it returns to
    the pool. A server-side cursor (events_after) cannot run in a pipeline: the pipeline ends
    there and the transaction goes on without it."""

    def __init__(self, conn: Conn, tenant_id: str, known_accounts: set[AccountKey]) -> None:
        self._conn = conn
        self._tenant_id = tenant_id
        self._known_accounts = known_accounts
        self.appended = False
        self._pipeline: AsyncExitStack | None = None

    async def begin(self) -> None:
        await self._conn.set_autocommit(True)
        self._pipeline = AsyncExitStack()
        await self._pipeline.enter_async_context(self._conn.pipeline())
        await self._conn.execute("BEGIN")

    async def commit(self) -> None:
        """COMMIT; then, when events were appended, the NOTIFY that wakes the tenant's
        followers, as a statement of its own after COMMIT in the same pipeline (notify.py):
        no round trip, no connection of its own. Its failure is not the transaction's,
        which has committed by then: it is logged, and followers poll."""
        committed = await self._conn.execute("COMMIT")
        try:
            if self.appended:
                await self._conn.execute(notify.NOTIFY_SQL, ([self._tenant_id],))
            await self._leave_pipeline()  # its sync answers for COMMIT (and raises its error)
        except psycopg.Error as exc:
            result = committed.pgresult
            if result is None or result.status != ExecStatus.COMMAND_OK:
                raise
            _log.warning("could not notify followers: %s", exc)

    async def _leave_pipeline(self) -> None:
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            await pipeline.aclose()

    async def end(self) -> None:
        """After commit, or after a failure anywhere: roll back what is still open and hand
        the connection back as it came (autocommit off), or closed when it cannot be."""
        conn = self._conn
        try:
            with contextlib.suppress(psycopg.Error):  # the failure is already on its way
                await self._leave_pipeline()
            if conn.pgconn.transaction_status in (TransactionStatus.INTRANS,
                                                  TransactionStatus.INERROR):  # fmt: skip
                await conn.execute("ROLLBACK")
            await conn.set_autocommit(False)
        except psycopg.Error:
            await conn.close()  # the pool discards it

    @asynccontextmanager
    async def _pipelined(self) -> AsyncIterator[None]:
        """Statements sent together: in the transaction's pipeline while it lasts, else in
        one of their own."""
        if self._pipeline is not None:
            yield
        else:
            async with self._conn.pipeline():
                yield

    async def lock_accounts(self, keys: Sequence[AccountKey]) -> dict[AccountKey, StreamHead]:
        found = await self._select_accounts(keys)
        missing = [k for k in keys if k not in found]
        if missing:
            async with self._conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO accounts (tenant_id, user_id, conversation_id) "
                    "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    [(k.tenant_id, k.user_id, k.conversation_id) for k in missing],
                )
            found |= await self._select_accounts(missing)
        return found

    async def _select_accounts(self, keys: Sequence[AccountKey]) -> dict[AccountKey, StreamHead]:
        cur = await self._conn.execute(*select_accounts_sql(keys, lock=True))
        return _heads(await cur.fetchall())

    async def read_locked(
        self,
        idempotency_keys: Sequence[str],
        limiter_accounts: Sequence[AccountKey],
        reservation_ids: Sequence[str],
        overdue_at: datetime,
        overdue_max: int,
        outcomes_since: datetime,
        lock: Sequence[AccountKey] = (),
        price_models: Sequence[str] = (),
        owners_of: Sequence[str] = (),
    ) -> Locked:
        """One round trip: the accounts locked (with the owners of `owners_of`, found by the
        locking statement itself), those of `lock` this process has not seen yet created
        (an INSERT that skips the ones that exist), then the queries, in a pipeline (the
        server runs them in order, so the reads happen under the accounts' locks, or after
        creating them, which makes any other writer of those rows wait). Accounts neither
        found nor created (another transaction created them meanwhile) are locked after
        it; when the tenant's own row was one of them, nothing held the tenant's lock
        during the reads, which are made again."""
        new = [k for k in lock if k not in self._known_accounts]
        async with self._pipelined():
            accounts = (
                await self._conn.execute(_LOCK_ACCOUNTS, self._keys_and_owners(lock, owners_of))
                if lock or owners_of
                else None
            )
            created = (
                await self._conn.execute(_CREATE_ACCOUNTS, self._keys_and_owners(new, ()))
                if new
                else None
            )
            known, limiters, named, overdue, prices = await self._read(
                idempotency_keys, limiter_accounts, reservation_ids, overdue_at, overdue_max,
                outcomes_since, price_models, owners_of,
            )  # fmt: skip
        heads = _heads(await _rows(accounts)) | _heads(await _rows(created))
        _remember(self._known_accounts, heads)
        if missing := [k for k in lock if k not in heads]:
            heads |= await self.lock_accounts(missing)
            if AccountKey(self._tenant_id) in missing:
                reread = await self.read_locked(
                    idempotency_keys, limiter_accounts, reservation_ids, overdue_at,
                    overdue_max, outcomes_since, price_models=price_models, owners_of=owners_of,
                )  # fmt: skip
                return replace(reread, heads=heads)
        return Locked(
            outcomes={
                row["idempotency_key"]: Outcome(
                    row["operation"], row["request"], row["response"], row["created_at"]
                )
                for row in await _rows(known)
            },
            rate_limits=[rate_limit_from_row(row) for row in await _rows(limiters)],
            reservations=[
                _stored_reservation(row)
                for rows in (await _rows(named), await _rows(overdue))
                for row in rows
            ],
            heads=heads,
            prices=[price_from_row(row) for row in await _rows(prices)],
        )

    async def price_facts(self, model: str) -> tuple[str, datetime | None]:
        cur = await self._conn.execute(
            """SELECT (SELECT currency FROM prices WHERE tenant_id = %(tenant)s LIMIT 1)
                          AS currency,
                      (SELECT max(expires_at) FROM reservations
                        WHERE tenant_id = %(tenant)s AND model = %(model)s AND state = 'held')
                          AS held_until""",
            {"tenant": self._tenant_id, "model": model},
        )
        row = await cur.fetchone()
        assert row is not None
        return row["currency"] or "", row["held_until"]

    async def _read(
        self,
        idempotency_keys: Sequence[str],
        limiter_accounts: Sequence[AccountKey],
        reservation_ids: Sequence[str],
        overdue_at: datetime,
        overdue_max: int,
        outcomes_since: datetime,
        price_models: Sequence[str],
        owners_of: Sequence[str] = (),
    ) -> list[psycopg.AsyncCursor[dict[str, Any]] | None]:
        """read_locked's queries, sent in its pipeline (their results are fetched after); a
        read whose answer is known to be empty (no keys, no reservations named, no models)
        is not sent (None)."""
        tenant = self._tenant_id
        return [
            await self._conn.execute(
                "SELECT idempotency_key, operation, request, response, created_at "
                "FROM idempotency_keys "
                "WHERE tenant_id = %s AND idempotency_key = ANY(%s) AND created_at >= %s",
                (tenant, list(idempotency_keys), outcomes_since),
            )
            if idempotency_keys
            else None,
            await self._conn.execute(
                _LOCK_RATE_LIMITS, self._keys_and_owners(limiter_accounts, owners_of)
            ),
            await self._conn.execute(
                *self._reservations_sql(
                    "reservation_id = ANY(%s) ORDER BY reservation_id", list(reservation_ids)
                )
            )
            if reservation_ids
            else None,
            await self._conn.execute(
                *self._reservations_sql(
                    "state = 'held' AND expires_at <= %s ORDER BY expires_at LIMIT %s",
                    overdue_at,
                    overdue_max,
                )
            ),
            await self._conn.execute(
                _LOCKED_PRICES,
                {
                    "tenant": tenant,
                    "models": list(price_models),
                    "reservations": list(reservation_ids),
                },
            )
            if price_models or reservation_ids
            else None,
        ]

    def _keys_and_owners(
        self, keys: Sequence[AccountKey], owners_of: Sequence[str]
    ) -> dict[str, Any]:
        """The parameters of _KEYS_AND_OWNERS: `keys` (this tenant's) as two arrays."""
        return {
            "tenant": self._tenant_id,
            "users": [k.user_id for k in keys],
            "conversations": [k.conversation_id for k in keys],
            "owners_of": list(owners_of),
        }

    def _reservations_sql(self, where: str, *params: Any) -> tuple[str, tuple[Any, ...]]:
        return (
            f"SELECT {RESERVATION_COLUMNS} FROM reservations "  # noqa: S608 (constant)
            f"WHERE tenant_id = %s AND {where} FOR UPDATE",
            (self._tenant_id, *params),
        )

    async def write(self, changes: Changes) -> None:
        """The hot tables in one statement (a statement a table, in chunks, for more rows
        than one may take), in the transaction's pipeline: no round trip of its own, its
        outcome comes with COMMIT's."""
        if not (changes.events or changes.accounts or changes.outcomes):
            return
        self.appended = self.appended or bool(changes.events)
        tenant = self._tenant_id
        records = {
            "events": [_event_record(r) for r in changes.events],
            "accounts": [_account_record(h) for h in changes.accounts],
            "new_reservations": [_reservation_record(r) for r in changes.new_reservations],
            "changed_reservations": [
                _reservation_record(r) for r in changes.changed_reservations
            ],
            "usage": [vars(k) | vars(c) for k, c in changes.usage.items()],
            "outcomes": [
                {"tenant_id": tenant, "idempotency_key": key, "operation": o.operation,
                 "request": o.request, "response": o.response, "created_at": o.created_at}
                for key, o in changes.outcomes.items()
            ],
        }  # fmt: skip
        async with self._pipelined(), self._conn.cursor() as cur:
            if max(map(len, records.values())) <= records_per_statement:
                async with psycopg.AsyncRawCursor(self._conn) as raw:
                    await raw.execute(_WRITE_ALL, [_jsonb(v) for v in records.values()])
            else:
                for name, statement in _WRITES.items():
                    await _each_chunk(cur, statement(), records[name])
            if changes.rate_limits:
                await cur.executemany(
                    _UPSERT_RATE_LIMITS, [_rate_limit_params(rl) for rl in changes.rate_limits]
                )
            if changes.prices:
                await cur.executemany(
                    _UPSERT_PRICES,
                    [
                        (tenant, p.model, p.effective_from, p.currency, p.price.input,
                         p.price.output, p.price.cached_input)
                        for p in changes.prices
                    ],
                )  # fmt: skip

    async def replace_projections(self, changes: Changes) -> None:
        for table in _PROJECTION_TABLES:
            await self._conn.execute(
                f"DELETE FROM {table} WHERE tenant_id = %s",  # noqa: S608 (constant names)
                (self._tenant_id,),
            )
        async with self._conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO accounts (tenant_id, user_id, conversation_id) VALUES (%s, %s, %s)",
                [
                    (h.account.key.tenant_id, h.account.key.user_id, h.account.key.conversation_id)
                    for h in changes.accounts
                ],
            )
        await self.write(changes)

    async def events_after(self, position: int) -> AsyncIterator[FoldedEvent]:
        """Through a named cursor: needs the transaction the unit of work runs in. From the
        start, refused for a tenant with an archive (its archived months may be gone)."""
        if position == 0:
            await self._refuse_if_archived()
        await self._leave_pipeline()
        async with self._conn.cursor(name="rebuild") as cur:
            await cur.execute(
                "SELECT * FROM events WHERE tenant_id = %s AND position > %s ORDER BY position",
                (self._tenant_id, position),
            )
            async for row in cur:
                yield FoldedEvent(
                    row["position"], codec.event_from_row(row), row["version"], bytes(row["hash"])
                )

    async def _refuse_if_archived(self) -> None:
        cur = await self._conn.execute(
            "SELECT max(last_position) AS p FROM audit_archives WHERE tenant_id = %s",
            (self._tenant_id,),
        )
        row = await cur.fetchone()
        if row is not None and row["p"] is not None:
            raise CheckpointRefused(
                f"tenant {self._tenant_id!r} is archived up to position {row['p']:,}: its "
                "projections cannot be rebuilt from the live log alone; nothing was changed"
            )


_OWNERS = (
    "FROM reservations AS r, LATERAL (VALUES ('', ''), (r.user_id, ''), "
    "(r.user_id, r.conversation_id)) AS o(u, c) "
    "WHERE r.tenant_id = %(tenant)s AND r.reservation_id = ANY(%(owners_of)s::text[]) "
    "ORDER BY r.reservation_id, o.u, o.c"
)
_USERS = f"%(users)s::text[] || ARRAY(SELECT o.u {_OWNERS})"
_KEYS_AND_OWNERS = (
    f"user_id = ANY({_USERS}) AND (user_id, conversation_id) IN (SELECT u, c FROM unnest("  # noqa: S608
    f"{_USERS}, %(conversations)s::text[] || ARRAY(SELECT o.c {_OWNERS})) AS k(u, c))"
)
"""Rows of the tenant's accounts (or their limiters) named by two arrays, (user_id,
conversation_id), and of the accounts holding the reservations `owners_of` with their
ancestors (their lineage; an owner never changes). A Commit names only its reservation: its
accounts are found by the statement that locks them, not by a round trip before it. The
owners are appended to the arrays (in one order, so that the pairs line up), and the users
are also matched with = ANY: so the accounts are read through their primary key (joined to
the key list, they were scanned whole: 1,000 rows and their dead versions per transaction)."""
_LOCK_ACCOUNTS = (
    f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE tenant_id = %(tenant)s "  # noqa: S608
    f"AND {_KEYS_AND_OWNERS} ORDER BY user_id, conversation_id FOR UPDATE"
)
"""Those accounts, locked in key order (tenant first)."""
_CREATE_ACCOUNTS = (
    "INSERT INTO accounts (tenant_id, user_id, conversation_id) "  # noqa: S608
    "SELECT %(tenant)s, u, c FROM unnest(%(users)s::text[], %(conversations)s::text[]) "
    f"AS k(u, c) ON CONFLICT DO NOTHING RETURNING {ACCOUNT_COLUMNS}"
)
"""Accounts of the tenant named by two arrays (in key order: tenant first) that do not exist
yet, created; those that exist are skipped (no row, no lock, nothing written)."""
_LOCK_RATE_LIMITS = (
    f"SELECT {RATE_LIMIT_COLUMNS} FROM rate_limits WHERE tenant_id = %(tenant)s "  # noqa: S608
    f"AND {_KEYS_AND_OWNERS} ORDER BY user_id, conversation_id, model FOR UPDATE"
)
"""Their limiters, locked; the account rows are locked before, so the order is fixed."""


known_accounts_max = 100_000
"""Account keys a process remembers as existing, to skip creating them: past it, it forgets
them all and learns again. A key remembered wrongly (its creating transaction rolled back)
costs a round trip (read_locked finds it neither locked nor created), not a result."""


def _remember(known: set[AccountKey], heads: dict[AccountKey, StreamHead]) -> None:
    if len(known) + len(heads) > known_accounts_max:
        known.clear()
    known.update(heads)


async def _rows(cur: psycopg.AsyncCursor[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A read's rows; none for a read not sent."""
    return [] if cur is None else await cur.fetchall()


def _stored_reservation(row: dict[str, Any]) -> StoredReservation:
    ended = row["ended_balance"]
    return StoredReservation(
        reservation_from_row(row), None if ended is None else codec.account_from_json(ended)
    )


records_per_statement = 5_000
"""Rows a statement writes at most (a rebuild writes a whole tenant; a jsonb value is at most
255 MB)."""


async def _each_chunk(
    cur: psycopg.AsyncCursor[dict[str, Any]], sql: str, records: list[dict[str, Any]]
) -> None:
    """`sql` (with a `%(rows)s` recordset) over `records`, a statement per chunk of them."""
    for start in range(0, len(records), records_per_statement):
        await cur.execute(sql, {"rows": _jsonb(records[start : start + records_per_statement])})


def _hex(value: bytes) -> str:
    """bytea's text form, for a jsonb record."""
    return "\\x" + value.hex()


def _event_record(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "prev_hash": _hex(row["prev_hash"]), "hash": _hex(row["hash"])}


def _account_record(head: StreamHead) -> dict[str, Any]:
    acc, k = head.account, head.account.key
    return {
        "tenant_id": k.tenant_id,
        "user_id": k.user_id,
        "conversation_id": k.conversation_id,
        "quota_limit": acc.limit,
        "period": acc.period.value,
        "window_hours": acc.window_hours,
        "time_zone": acc.time_zone,
        "soft_limit_percent": acc.soft_limit_percent,
        "grant_order": acc.grant_order.value,
        "held": acc.held,
        "used_total": acc.used_total,
        "used_day": acc.used_day,
        "day_start": acc.day_start,
        "used_month": acc.used_month,
        "month_start": acc.month_start,
        "recent": acc.recent,
        "grants": codec.grants_to_json(acc.grants),
        "alert_thresholds": acc.alert_thresholds,
        "alerts_fired": acc.alerts_fired,
        "alerts_period": acc.alerts_period,
        "money": None if acc.money is None else codec.account_to_json(acc.money),
        "stream_version": head.version,
        "head_hash": _hex(head.hash),
    }


def _rate_limit_params(rl: RateLimit) -> tuple[Any, ...]:
    k = rl.key.account
    return (k.tenant_id, k.user_id, k.conversation_id, rl.key.model, rl.tokens_per_minute,
            rl.requests_per_minute, rl.tokens_tat, rl.requests_tat)  # fmt: skip


def _reservation_record(stored: StoredReservation) -> dict[str, Any]:
    res, ended = stored.reservation, stored.ended_balance
    usage = res.usage
    return {
        "tenant_id": res.key.tenant_id,
        "reservation_id": res.reservation_id,
        "user_id": res.key.user_id,
        "conversation_id": res.key.conversation_id,
        "model": res.model,
        "amount": res.amount,
        "state": res.state.value,
        "created_at": res.created_at,
        "expires_at": res.expires_at,
        "labels": dict(res.labels),
        "input_tokens": None if usage is None else usage.input_tokens,
        "output_tokens": None if usage is None else usage.output_tokens,
        "cached_input_tokens": None if usage is None else usage.cached_input_tokens,
        "late": res.late,
        "ended_at": res.ended_at,
        "ended_balance": None if ended is None else codec.account_to_json(ended),
        "money": res.money,
        "cost": res.cost,
    }
