"""The PostgreSQL event store: appends events and updates the inline projections in one
transaction, so a balance read is never behind the log.

Batching (group commit): writes are queued per tenant. While a tenant's transaction is in
flight, further writes for it wait in its queue; the next transaction takes all of them (up to
`limits.batch_commands_max`) and applies them one after another, in arrival order, exactly as
if each had its own transaction, with one outcome per write. A write that arrives alone goes
alone at once, so batching adds no latency; under load it saves a commit (and its WAL flush),
the row locks and the round trips per write.

Concurrency: a transaction locks the account rows it touches with SELECT ... FOR UPDATE in key
order, the tenant row first (its key sorts first). Every writer of a tenant takes the tenant
row first, so writers of one tenant never deadlock, and a writer holding it may lock any other
row of that tenant (to expire someone else's overdue hold). A batch holds one tenant's writes
only. Reservation rows are locked after account rows. The (stream, version) primary key of the
events table is the backstop should two writers ever race on one stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ledger import codec, errors, limits
from ledger.domain import (
    Decidable,
    Snapshot,
    affected,
    applicable_limits,
    commit_outcome,
    decide,
    evolve_account,
    evolve_rate_limit,
    evolve_reservation,
    headroom,
    rate_limit_keys,
    soft_limit_warnings,
)
from ledger.model import (
    Account,
    AccountKey,
    AdjustBalance,
    BalanceResult,
    Commit,
    CommitResult,
    Context,
    Event,
    Expire,
    GrantTokens,
    RateLimit,
    RateLimitKey,
    RecordUsage,
    Reservation,
    Reserve,
    ReserveResult,
    Rollback,
    RollbackResult,
    SetQuota,
    SetRateLimit,
    SoftLimitWarning,
    State,
    Usage,
)
from ledger.replay import Projection
from ledger.rows import (
    RATE_LIMIT_COLUMNS,
    RESERVATION_COLUMNS,
    account_from_row,
    account_key,
    rate_limit_from_row,
    reservation_from_row,
    select_accounts_sql,
)
from ledger.usage import COUNTER_NAMES, UsageCounters, UsageKey, add_usage

Conn = psycopg.AsyncConnection[dict[str, Any]]

_UPSERT_USAGE = (
    "INSERT INTO usage_hourly (tenant_id, hour, user_id, conversation_id, model, "  # noqa: S608
    + ", ".join(COUNTER_NAMES)
    + ") VALUES (%(tenant_id)s, %(hour)s, %(user_id)s, %(conversation_id)s, %(model)s, "
    + ", ".join(f"%({c})s" for c in COUNTER_NAMES)
    + ") ON CONFLICT (tenant_id, hour, user_id, conversation_id, model) DO UPDATE SET "
    + ", ".join(f"{c} = usage_hourly.{c} + EXCLUDED.{c}" for c in COUNTER_NAMES)
)
_TRANSIENT = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
_ATTEMPTS_MAX = 3
EXPIRY_ACTOR = "system:expiry"

# Told the events of each transaction once it has committed (metrics count them). It runs on
# the event loop between transactions: it must be quick and must not block.
EventObserver = Callable[[Sequence[Event]], None]

_log = logging.getLogger("tokenledger.store")


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_reservation_id() -> str:
    return "rsv_" + uuid.uuid4().hex


@dataclass(frozen=True)
class CallMeta:
    """Who made the call and under which trace; recorded with every event it appends."""

    actor: str = ""
    trace_id: str = ""


@dataclass(frozen=True)
class RebuildReport:
    """What a rebuild replayed and wrote."""

    events: int
    events_under_lock: int  # appended while the log was folded, folded holding the lock
    lock_held_s: float  # how long the tenant's writers waited for the rebuild (at most)
    accounts: int
    reservations: int
    usage_rows: int
    rate_limits: int


@dataclass(frozen=True)
class ExpireTenant:
    """Internal: expire a tenant's overdue holds (the sweeper's work for one tenant)."""

    tenant_id: str


# Writes on one account whose response is that account's balance (or, for SetRateLimit, the
# limiter): they differ only in their events.
AccountWrite = SetQuota | RecordUsage | GrantTokens | AdjustBalance | SetRateLimit
Write = Reserve | Commit | Rollback | AccountWrite | ExpireTenant


@dataclass
class _Pending:
    command: Write
    meta: CallMeta
    future: asyncio.Future[Any]


class LedgerStore:
    """The ledger's application service over a PostgreSQL connection pool."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Conn],
        clock: Callable[[], datetime] = utc_now,
        new_id: Callable[[], str] = new_reservation_id,
        batch_max: int = limits.batch_commands_max,
        on_appended: EventObserver | None = None,
    ) -> None:
        self._pool = pool
        self._on_appended = on_appended
        self._clock = clock
        self._new_id = new_id
        self._batch_max = batch_max
        self._queues: dict[str, deque[_Pending]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}

    # --- writes -----------------------------------------------------------------------------

    async def reserve(self, cmd: Reserve, meta: CallMeta = CallMeta()) -> ReserveResult:
        result: ReserveResult = await self._submit(cmd, meta)
        return result

    async def commit(self, cmd: Commit, meta: CallMeta = CallMeta()) -> CommitResult:
        result: CommitResult = await self._submit(cmd, meta)
        return result

    async def rollback(self, cmd: Rollback, meta: CallMeta = CallMeta()) -> RollbackResult:
        result: RollbackResult = await self._submit(cmd, meta)
        return result

    async def set_quota(self, cmd: SetQuota, meta: CallMeta = CallMeta()) -> Account:
        result: Account = await self._submit(cmd, meta)
        return result

    async def record_usage(self, cmd: RecordUsage, meta: CallMeta = CallMeta()) -> Account:
        result: Account = await self._submit(cmd, meta)
        return result

    async def grant_tokens(self, cmd: GrantTokens, meta: CallMeta = CallMeta()) -> Account:
        result: Account = await self._submit(cmd, meta)
        return result

    async def adjust_balance(self, cmd: AdjustBalance, meta: CallMeta = CallMeta()) -> Account:
        result: Account = await self._submit(cmd, meta)
        return result

    async def set_rate_limit(self, cmd: SetRateLimit, meta: CallMeta = CallMeta()) -> RateLimit:
        result: RateLimit = await self._submit(cmd, meta)
        return result

    async def expire_overdue(self) -> int:
        """End overdue holds of every tenant (the sweeper's pass); returns how many expired."""
        now = self._clock()
        async with self._connection() as conn:
            cur = await conn.execute(
                """SELECT DISTINCT tenant_id FROM reservations
                   WHERE state = 'held' AND expires_at <= %s LIMIT %s""",
                (now, limits.expire_batch_max),
            )
            tenants = [row["tenant_id"] for row in await cur.fetchall()]
        meta = CallMeta(actor=EXPIRY_ACTOR)
        counts = await asyncio.gather(*(self._submit(ExpireTenant(t), meta) for t in tenants))
        return sum(counts)

    # --- batching ---------------------------------------------------------------------------

    async def _submit(self, cmd: Write, meta: CallMeta) -> Any:
        """Queue a write for its tenant's next transaction and wait for its outcome. A caller
        that gives up before its transaction starts leaves no effect; after, the whole one."""
        tenant_id = _tenant_of(cmd)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(tenant_id, deque()).append(_Pending(cmd, meta, future))
        if tenant_id not in self._workers:
            self._workers[tenant_id] = asyncio.create_task(self._drain(tenant_id))
        return await future

    async def _drain(self, tenant_id: str) -> None:
        queue = self._queues[tenant_id]
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self._batch_max))]
                batch = [p for p in batch if not p.future.cancelled()]
                if batch:
                    await self._run_batch(batch)
        finally:
            # No await between the emptiness check and here: a write queued meanwhile would
            # otherwise find a worker that is about to end.
            del self._workers[tenant_id]
            del self._queues[tenant_id]

    async def _run_batch(self, batch: list[_Pending]) -> None:
        """Apply a batch in one transaction, retrying transient conflicts; settle each write's
        future with its outcome once the transaction has committed."""
        outcomes: list[Any] = []
        failure: BaseException | None = None
        for attempt in range(_ATTEMPTS_MAX):
            try:
                outcomes = await self._apply_batch(batch)
            except (*_TRANSIENT, pg_errors.UniqueViolation) as exc:
                failure = exc
                if attempt < _ATTEMPTS_MAX - 1:
                    continue
            except Exception as exc:
                failure = exc
            else:
                failure = None
            break
        for i, pending in enumerate(batch):
            if pending.future.done():
                continue
            outcome = failure if failure is not None else outcomes[i]
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    async def _apply_batch(self, batch: list[_Pending]) -> list[Any]:
        async with self._connection() as conn, conn.transaction():
            tx = _Tx(conn, self._clock())
            await tx.prepare([p.command for p in batch])
            outcomes: list[Any] = []
            for pending in batch:
                tx.meta = pending.meta
                try:
                    outcomes.append(await self._execute(tx, pending.command))
                except errors.LedgerError as exc:
                    outcomes.append(exc)
            await tx.flush()
        self._observe(tx.events)
        return outcomes

    def _observe(self, events: Sequence[Event]) -> None:
        """Tell the observer what a committed transaction appended; its failure is no failure
        of the writes, which are durable by now."""
        if self._on_appended is None or not events:
            return
        try:
            self._on_appended(events)
        except Exception:
            _log.exception("event observer failed")

    async def _execute(self, tx: _Tx, cmd: Write) -> Any:
        """One write inside a batch: a result, or a LedgerError raised before it changed
        anything (expiries it made stand: they were due anyway)."""
        match cmd:
            case Reserve():
                return await self._reserve(tx, cmd)
            case Commit():
                res, balance = await self._end_reservation(tx, cmd)
                return commit_outcome(res, balance)
            case Rollback():
                res, balance = await self._end_reservation(tx, cmd)
                return RollbackResult(reservation=res, released=res.amount, balance=balance)
            case SetQuota() | RecordUsage() | GrantTokens() | AdjustBalance() | SetRateLimit():
                return await self._simple(tx, cmd)
            case ExpireTenant():
                return await tx.expire_overdue()

    async def _reserve(self, tx: _Tx, cmd: Reserve) -> ReserveResult:
        request = _request_json(cmd)
        stored = tx.idempotent_response(cmd.idempotency_key, "Reserve", request)
        if stored is not None:
            resets_at = stored["resets_at"]
            return ReserveResult(
                reservation=codec.reservation_from_json(stored["reservation"]),
                balance=codec.account_from_json(stored["balance"]),
                requested=cmd.amount,
                warnings=tuple(SoftLimitWarning(**w) for w in stored["warnings"]),
                reservable=stored["reservable"],
                resets_at=codec.parse_ts(resets_at) if resets_at else None,
            )
        await tx.expire_overdue()
        events = decide(tx.snapshot(cmd.key, model=cmd.model), cmd, tx.context(self._new_id()))
        res = tx.apply(events)
        assert res is not None
        levels = [tx.accounts[k].rolled(tx.now) for k in cmd.key.lineage()]
        reservable, resets_at = headroom(levels)
        result = ReserveResult(
            reservation=res,
            balance=tx.accounts[cmd.key],
            requested=cmd.amount,
            warnings=soft_limit_warnings(levels),
            reservable=reservable,
            resets_at=resets_at,
        )
        tx.remember(
            cmd.idempotency_key,
            "Reserve",
            request,
            {
                "reservation": codec.reservation_to_json(res),
                "balance": codec.account_to_json(result.balance),
                "warnings": [vars(w) for w in result.warnings],
                "reservable": reservable,
                "resets_at": codec.ts(resets_at) if resets_at else None,
            },
        )
        return result

    async def _end_reservation(
        self, tx: _Tx, cmd: Commit | Rollback
    ) -> tuple[Reservation, Account]:
        """Commit or roll back; a repeat of the call that ended the reservation writes nothing
        and returns the balance recorded when it ended."""
        res = tx.reservations.get(cmd.reservation_id)
        if res is None:
            raise errors.ReservationNotFound(cmd.tenant_id, cmd.reservation_id)
        if res.state is not State.HELD and not decide(tx.snapshot(res.key, res), cmd, tx.context()):
            return res, tx.ended_balances[res.reservation_id]
        await tx.expire_overdue()
        res = tx.reservations[cmd.reservation_id]
        res_after = tx.apply(decide(tx.snapshot(res.key, res), cmd, tx.context()))
        assert res_after is not None
        tx.end(res_after.reservation_id, tx.accounts[res.key])
        return res_after, tx.accounts[res.key]

    async def _simple(self, tx: _Tx, cmd: AccountWrite) -> Account | RateLimit:
        """A write on one account; its response (the account's balance after it, or the rate
        limit as set) is stored with its key, and a retry gets that first response."""
        operation = type(cmd).__name__
        request = _request_json(cmd)
        stored = tx.idempotent_response(cmd.idempotency_key, operation, request)
        if stored is None:
            await tx.expire_overdue()
            tx.apply(decide(tx.snapshot(cmd.key), cmd, tx.context()))
            if isinstance(cmd, SetRateLimit):
                rl = tx.rate_limits[RateLimitKey(cmd.key, cmd.model)]
                stored = {"rate_limit": [rl.tokens_per_minute, rl.requests_per_minute]}
            else:
                stored = {"balance": codec.account_to_json(tx.accounts[cmd.key])}
            tx.remember(cmd.idempotency_key, operation, request, stored)
        if isinstance(cmd, SetRateLimit):
            return RateLimit(RateLimitKey(cmd.key, cmd.model), *stored["rate_limit"])
        return codec.account_from_json(stored["balance"])

    # --- maintenance ------------------------------------------------------------------------

    async def rebuild(self, tenant_id: str) -> RebuildReport:
        """Replace the tenant's projections (accounts and stream heads, reservations, usage,
        rate limits) by a replay of its log. The log is folded first without a lock, so the
        tenant's writers go on meanwhile; then, holding the tenant's row lock (every writer of
        the tenant, in any process, now waits, and none is lost), what they appended is folded
        too and the rows are replaced, in one transaction. Every write of a tenant holds that
        lock until it commits, so the tenant's events commit in position order: the ones the
        first fold did not see all come after the last one it did.
        Idempotency records are requests, not projections of the log, and stay as they are.
        Needs DELETE on the projection tables: an owner's job, not the service role's."""
        log = _Refold(tenant_id)
        async with self._connection() as conn, conn.transaction():
            await log.fold(conn)
        unlocked = log.events
        async with self._connection() as conn, conn.transaction():
            tx = _Tx(conn, self._clock())
            tx.tenant_id = tenant_id
            await tx.lock_accounts([AccountKey(tenant_id)])
            locked = time.monotonic()
            await log.fold(conn)
            await tx.replace_projections(log.projection, log.heads, log.usage)
        return RebuildReport(
            events=log.events,
            events_under_lock=log.events - unlocked,
            lock_held_s=round(time.monotonic() - locked, 3),
            accounts=len(tx.accounts),
            reservations=len(log.projection.reservations),
            usage_rows=len(log.usage),
            rate_limits=len(log.projection.rate_limits),
        )

    # --- reads ------------------------------------------------------------------------------

    async def get_reservation(self, tenant_id: str, reservation_id: str) -> Reservation:
        async with self._connection() as conn:
            cur = await conn.execute(
                f"SELECT {RESERVATION_COLUMNS} FROM reservations "  # noqa: S608 (constant)
                "WHERE tenant_id = %s AND reservation_id = %s",
                (tenant_id, reservation_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise errors.ReservationNotFound(tenant_id, reservation_id)
        return reservation_from_row(row)

    async def get_balance(self, key: AccountKey) -> BalanceResult:
        now = self._clock()
        lineage = key.lineage()
        async with self._connection() as conn:
            cur = await conn.execute(*select_accounts_sql(lineage, lock=False))
            rows = {account_key(row): account_from_row(row) for row in await cur.fetchall()}
        accounts = [rows.get(k, Account(k)).rolled(now) for k in lineage]
        return BalanceResult(balance=accounts[-1], ancestors=tuple(accounts[:-1]))

    async def held_total(self) -> int:
        """Tokens held now across all tenants (their tenant-level rows hold every hold below
        them). It reads every tenant row: for a periodic gauge, not the request path."""
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT coalesce(sum(held), 0) AS held FROM accounts WHERE user_id = ''"
            )
            row = await cur.fetchone()
        return int(row["held"]) if row else 0

    # --- plumbing ---------------------------------------------------------------------------

    def _connection(self) -> _Connection:
        return _Connection(self._pool)


class _Connection:
    """A pooled connection whose connectivity failures become StoreUnavailable."""

    def __init__(self, pool: AsyncConnectionPool[Conn]) -> None:
        self._cm = pool.connection()

    async def __aenter__(self) -> Conn:
        try:
            return await self._cm.__aenter__()
        except PoolTimeout as exc:
            raise errors.StoreUnavailable(f"no database connection available: {exc}") from exc

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._cm.__aexit__(*exc_info)
        except psycopg.OperationalError as exc:
            raise errors.StoreUnavailable(f"database unavailable: {exc}") from exc
        if isinstance(exc_info[1], psycopg.OperationalError):
            raise errors.StoreUnavailable(f"database unavailable: {exc_info[1]}") from exc_info[1]


class _Tx:
    """One transaction's unit of work: the rows it locked, the events it will append and the
    projection rows it will write, all flushed together before the commit. Writes of a batch
    run one after another against this state, so each sees the effects of those before it."""

    def __init__(self, conn: Conn, now: datetime) -> None:
        self.conn = conn
        self.now = now
        self.meta = CallMeta()
        self.tenant_id = ""
        self.accounts: dict[AccountKey, Account] = {}
        self.streams: dict[AccountKey, tuple[int, bytes]] = {}
        self.reservations: dict[str, Reservation] = {}
        self.rate_limits: dict[RateLimitKey, RateLimit] = {}
        self._dirty_limits: set[RateLimitKey] = set()
        self.ended_balances: dict[str, Account] = {}
        self._idempotency: dict[str, dict[str, Any]] = {}
        self._overdue_checked = False
        self._dirty_accounts: set[AccountKey] = set()
        self._dirty_reservations: set[str] = set()
        self._new_reservations: set[str] = set()
        self._ended: set[str] = set()
        self._rows: list[dict[str, Any]] = []
        self.events: list[Event] = []
        self._new_keys: list[dict[str, Any]] = []
        self._usage: dict[UsageKey, UsageCounters] = {}

    def context(self, new_id: str = "") -> Context:
        return Context(
            now=self.now, new_id=new_id, actor=self.meta.actor, trace_id=self.meta.trace_id
        )

    def snapshot(
        self, key: AccountKey, res: Reservation | None = None, model: str = ""
    ) -> Snapshot:
        return Snapshot(
            accounts={k: self.accounts[k] for k in key.lineage()},
            reservation=res,
            rate_limits={rl.key: rl for rl in applicable_limits(self.rate_limits, key, model)},
        )

    async def prepare(self, commands: Sequence[Write]) -> None:
        """Lock and load, in three round trips, what the batch's writes will read: their
        reservations and idempotency keys, every account of their lineages (tenant first),
        and the tenant's overdue holds. Account rows are locked before reservation rows.
        Idempotency keys are read after the tenant's row is locked: a twin of this call in
        flight elsewhere (another process, a client's retry) has then committed or not
        started, so its key is seen and the call is answered, not decided afresh."""
        self.tenant_id = _tenant_of(commands[0])
        rids = [c.reservation_id for c in commands if isinstance(c, Commit | Rollback)]
        keyed = [c for c in commands if isinstance(c, Reserve | AccountWrite)]
        idem = [c.idempotency_key for c in keyed]
        keys: set[AccountKey] = {AccountKey(self.tenant_id)}
        for c in keyed:
            keys.update(c.key.lineage())
        async with self.conn.pipeline():
            owners = await self.conn.execute(
                "SELECT user_id, conversation_id FROM reservations "
                "WHERE tenant_id = %s AND reservation_id = ANY(%s)",
                (self.tenant_id, rids),
            )
        for row in await owners.fetchall():
            keys.update(
                AccountKey(self.tenant_id, row["user_id"], row["conversation_id"]).lineage()
            )
        await self.lock_accounts(sorted(keys))
        async with self.conn.pipeline():
            known = await self.conn.execute(
                "SELECT idempotency_key, operation, request, response FROM idempotency_keys "
                "WHERE tenant_id = %s AND idempotency_key = ANY(%s)",
                (self.tenant_id, idem),
            )
            limiters = await self.conn.execute(*_rate_limits_sql(sorted(keys)))
            named = await self.conn.execute(
                *self._reservations_sql("reservation_id = ANY(%s) ORDER BY reservation_id", rids)
            )
            overdue = await self.conn.execute(
                *self._reservations_sql(
                    "state = 'held' AND expires_at <= %s ORDER BY expires_at LIMIT %s",
                    self.now,
                    limits.expire_batch_max,
                )
            )
        self._idempotency = {row["idempotency_key"]: row for row in await known.fetchall()}
        for row in await limiters.fetchall():
            rl = rate_limit_from_row(row)
            self.rate_limits[rl.key] = rl
        self._keep(await named.fetchall())
        self._keep(await overdue.fetchall())

    async def lock_accounts(self, keys: Sequence[AccountKey]) -> None:
        """Lock (creating when missing) the account rows of this tenant named by `keys`."""
        wanted = [k for k in keys if k not in self.accounts]
        if not wanted:
            return
        found = await self._select_accounts(wanted)
        missing = [k for k in wanted if k not in found]
        if missing:
            async with self.conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO accounts (tenant_id, user_id, conversation_id) "
                    "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    [(k.tenant_id, k.user_id, k.conversation_id) for k in missing],
                )
            found |= await self._select_accounts(missing)
        for k in wanted:
            acc, version, head = found[k]
            self.accounts[k] = acc
            self.streams[k] = (version, head)

    async def _select_accounts(
        self, keys: list[AccountKey]
    ) -> dict[AccountKey, tuple[Account, int, bytes]]:
        cur = await self.conn.execute(*select_accounts_sql(keys, lock=True))
        return {
            account_key(row): (
                account_from_row(row),
                row["stream_version"],
                bytes(row["head_hash"]),
            )
            for row in await cur.fetchall()
        }

    def _reservations_sql(self, where: str, *params: Any) -> tuple[str, tuple[Any, ...]]:
        return (
            f"SELECT {RESERVATION_COLUMNS} FROM reservations "  # noqa: S608 (constant)
            f"WHERE tenant_id = %s AND {where} FOR UPDATE",
            (self.tenant_id, *params),
        )

    def _keep(self, rows: list[dict[str, Any]]) -> None:
        """Take locked reservation rows into the transaction's state; rows it already holds
        keep their in-memory state, which may be ahead of the table."""
        for row in rows:
            rid = row["reservation_id"]
            if rid not in self.reservations:
                self.reservations[rid] = reservation_from_row(row)
                if row["ended_balance"] is not None:
                    self.ended_balances[rid] = codec.account_from_json(row["ended_balance"])

    async def expire_overdue(self) -> int:
        """Expire the tenant's overdue holds, oldest first (at most `expire_batch_max` in a
        transaction, the rest in the next); returns how many expired. Once per transaction:
        its clock does not move."""
        if self._overdue_checked:
            return 0
        self._overdue_checked = True
        overdue = [  # as found by prepare(), plus holds this transaction placed meanwhile
            r
            for r in self.reservations.values()
            if r.state is State.HELD and r.expires_at <= self.now
        ]
        await self.lock_accounts(sorted({k for r in overdue for k in r.key.lineage()}))
        count = 0
        for res in overdue:
            events = decide(
                self.snapshot(res.key, res),
                Expire(self.tenant_id, res.reservation_id),
                Context(now=self.now, actor=EXPIRY_ACTOR, trace_id=self.meta.trace_id),
            )
            self.apply(events)
            count += len(events)
        return count

    async def replace_projections(
        self,
        rebuilt: Projection,
        heads: dict[AccountKey, tuple[int, bytes]],
        usage: dict[UsageKey, UsageCounters],
    ) -> None:
        """Delete the tenant's projection rows and write `rebuilt` in their place."""
        for table in ("accounts", "reservations", "usage_hourly", "rate_limits"):
            await self.conn.execute(
                f"DELETE FROM {table} WHERE tenant_id = %s",  # noqa: S608 (constant names)
                (self.tenant_id,),
            )
        keys = sorted(rebuilt.accounts.keys() | heads.keys())
        async with self.conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO accounts (tenant_id, user_id, conversation_id) VALUES (%s, %s, %s)",
                [(k.tenant_id, k.user_id, k.conversation_id) for k in keys],
            )
        self.accounts = {k: rebuilt.accounts.get(k, Account(k)) for k in keys}
        self.streams = {k: heads.get(k, (0, codec.GENESIS_HASH)) for k in keys}
        self.reservations = dict(rebuilt.reservations)
        self.ended_balances = dict(rebuilt.ended_balances)
        self.rate_limits = dict(rebuilt.rate_limits)
        self._dirty_accounts = set(keys)
        self._new_reservations = self._dirty_reservations = set(self.reservations)
        self._ended = set(self.ended_balances)
        self._dirty_limits = set(self.rate_limits)
        self._usage = usage
        await self.flush()

    def apply(self, events: list[Event]) -> Reservation | None:
        """Evolve the locked state by `events` and queue their rows; returns the reservation
        the events concern, if any."""
        res: Reservation | None = None
        for event in events:
            for k in affected(event):
                self.accounts[k] = evolve_account(self.accounts[k], event)
                self._dirty_accounts.add(k)
            rid = getattr(event, "reservation_id", "")
            if rid:
                res = evolve_reservation(self.reservations.get(rid), event)
                assert res is not None
                if rid not in self.reservations:
                    self._new_reservations.add(rid)
                self.reservations[rid] = res
                self._dirty_reservations.add(rid)
            for rk in rate_limit_keys(event):
                rl = evolve_rate_limit(self.rate_limits.get(rk), rk, event)
                if rl is not None:
                    self.rate_limits[rk] = rl
                    self._dirty_limits.add(rk)
            version, head = self.streams[event.key]
            row = codec.event_row(event, version + 1, head)
            self.streams[event.key] = (version + 1, row["hash"])
            self._dirty_accounts.add(event.key)
            self._rows.append(row)
            self.events.append(event)
            add_usage(self._usage, event)
        return res

    def end(self, reservation_id: str, balance: Account) -> None:
        """Record the balance a commit or rollback answered, for its repeats."""
        self.ended_balances[reservation_id] = balance
        self._ended.add(reservation_id)

    def idempotent_response(
        self, key: str, operation: str, request: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The first response to this key, or None when the key is new. A different request
        under the same key is refused, naming the first field that differs."""
        row = self._idempotency.get(key)
        if row is None:
            return None
        first = {"operation": row["operation"], **row["request"]}
        now = {"operation": operation, **request}
        for name in sorted(first.keys() | now.keys(), key=lambda n: (n != "operation", n)):
            if first.get(name) != now.get(name):
                raise errors.IdempotencyKeyReused(key, name, first.get(name), now.get(name))
        response: dict[str, Any] = row["response"]
        return response

    def remember(
        self, key: str, operation: str, request: dict[str, Any], response: dict[str, Any]
    ) -> None:
        row = {
            "tenant_id": self.tenant_id,
            "idempotency_key": key,
            "operation": operation,
            "request": request,
            "response": response,
        }
        self._idempotency[key] = row
        self._new_keys.append(row)

    async def flush(self) -> None:
        """Write the batch's events and projection rows in one pipeline (one round trip)."""
        if not (self._rows or self._dirty_accounts):
            return
        async with self.conn.pipeline(), self.conn.cursor() as cur:
            await cur.executemany(
                """INSERT INTO events (tenant_id, user_id, conversation_id, version, event_type,
                       occurred_at, model, reservation_id, amount, input_tokens, output_tokens,
                       cached_input_tokens, idempotency_key, actor, trace_id, data, prev_hash,
                       hash)
                   VALUES (%(tenant_id)s, %(user_id)s, %(conversation_id)s, %(version)s,
                       %(event_type)s, %(occurred_at)s, %(model)s, %(reservation_id)s,
                       %(amount)s, %(input_tokens)s, %(output_tokens)s,
                       %(cached_input_tokens)s, %(idempotency_key)s, %(actor)s, %(trace_id)s,
                       %(data)s, %(prev_hash)s, %(hash)s)""",
                [{**row, "data": Jsonb(row["data"])} for row in self._rows],
            )
            await cur.executemany(
                """UPDATE accounts SET quota_limit = %s, period = %s, window_hours = %s,
                       time_zone = %s, soft_limit_percent = %s, grant_order = %s, held = %s,
                       used_total = %s, used_day = %s, day_start = %s, used_month = %s,
                       month_start = %s, recent = %s, grants = %s, stream_version = %s,
                       head_hash = %s, updated_at = now()
                   WHERE tenant_id = %s AND user_id = %s AND conversation_id = %s""",
                [self._account_params(k) for k in sorted(self._dirty_accounts)],
            )
            if self._dirty_limits:
                await cur.executemany(
                    f"INSERT INTO rate_limits ({RATE_LIMIT_COLUMNS}) VALUES "  # noqa: S608
                    "(%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT "
                    "(tenant_id, user_id, conversation_id, model) DO UPDATE SET "
                    "tokens_per_minute = EXCLUDED.tokens_per_minute, "
                    "requests_per_minute = EXCLUDED.requests_per_minute, "
                    "tokens_tat = EXCLUDED.tokens_tat, requests_tat = EXCLUDED.requests_tat",
                    [_rate_limit_params(self.rate_limits[k]) for k in sorted(self._dirty_limits)],
                )
            new = [self._reservation_params(r) for r in sorted(self._new_reservations)]
            if new:
                await cur.executemany(
                    f"INSERT INTO reservations ({RESERVATION_COLUMNS}) VALUES ("  # noqa: S608
                    + ", ".join(f"%({c.strip()})s" for c in RESERVATION_COLUMNS.split(","))
                    + ")",
                    new,
                )
            changed = sorted(self._dirty_reservations - self._new_reservations)
            if changed:
                await cur.executemany(
                    """UPDATE reservations SET state = %(state)s,
                           input_tokens = %(input_tokens)s, output_tokens = %(output_tokens)s,
                           cached_input_tokens = %(cached_input_tokens)s, late = %(late)s,
                           ended_at = %(ended_at)s, ended_balance = %(ended_balance)s
                       WHERE tenant_id = %(tenant_id)s AND reservation_id = %(reservation_id)s""",
                    [self._reservation_params(r) for r in changed],
                )
            await cur.executemany(
                _UPSERT_USAGE,
                [vars(key) | vars(counters) for key, counters in sorted(self._usage.items())],
            )
            if self._new_keys:
                await cur.executemany(
                    "INSERT INTO idempotency_keys "
                    "(tenant_id, idempotency_key, operation, request, response) VALUES "
                    "(%(tenant_id)s, %(idempotency_key)s, %(operation)s, %(request)s, "
                    "%(response)s)",
                    [
                        {**k, "request": Jsonb(k["request"]), "response": Jsonb(k["response"])}
                        for k in self._new_keys
                    ],
                )

    def _account_params(self, k: AccountKey) -> tuple[Any, ...]:
        acc = self.accounts[k]
        version, head = self.streams[k]
        return (
            acc.limit,
            acc.period.value,
            acc.window_hours,
            acc.time_zone,
            acc.soft_limit_percent,
            acc.grant_order.value,
            acc.held,
            acc.used_total,
            acc.used_day,
            acc.day_start,
            acc.used_month,
            acc.month_start,
            Jsonb([list(b) for b in acc.recent]),
            Jsonb(codec.grants_to_json(acc.grants)),
            version,
            head,
            k.tenant_id,
            k.user_id,
            k.conversation_id,
        )

    def _reservation_params(self, rid: str) -> dict[str, Any]:
        res = self.reservations[rid]
        usage = res.usage
        ended = self.ended_balances.get(rid) if rid in self._ended else None
        return {
            "tenant_id": res.key.tenant_id,
            "reservation_id": rid,
            "user_id": res.key.user_id,
            "conversation_id": res.key.conversation_id,
            "model": res.model,
            "amount": res.amount,
            "state": res.state.value,
            "created_at": res.created_at,
            "expires_at": res.expires_at,
            "labels": Jsonb(dict(res.labels)),
            "input_tokens": None if usage is None else usage.input_tokens,
            "output_tokens": None if usage is None else usage.output_tokens,
            "cached_input_tokens": None if usage is None else usage.cached_input_tokens,
            "late": res.late,
            "ended_at": res.ended_at,
            "ended_balance": None if ended is None else Jsonb(codec.account_to_json(ended)),
        }


@dataclass
class _Refold:
    """A tenant's projections folded from its log, in steps that each continue from the
    last position the one before read."""

    tenant_id: str
    projection: Projection = field(default_factory=Projection)
    heads: dict[AccountKey, tuple[int, bytes]] = field(default_factory=dict)
    usage: dict[UsageKey, UsageCounters] = field(default_factory=dict)
    events: int = 0
    position: int = 0

    async def fold(self, conn: Conn) -> None:
        """Fold the tenant's events after `position` (in a transaction: a named cursor)."""
        async with conn.cursor(name="rebuild") as cur:
            await cur.execute(
                "SELECT * FROM events WHERE tenant_id = %s AND position > %s ORDER BY position",
                (self.tenant_id, self.position),
            )
            async for row in cur:
                event = codec.event_from_row(row)
                self.projection.feed(event)
                add_usage(self.usage, event)
                self.heads[event.key] = (row["version"], bytes(row["hash"]))
                self.events += 1
                self.position = row["position"]


def _tenant_of(cmd: Write) -> str:
    return cmd.key.tenant_id if isinstance(cmd, Reserve | AccountWrite) else cmd.tenant_id


def _rate_limits_sql(keys: Sequence[AccountKey]) -> tuple[str, tuple[str, ...]]:
    """The limiters of the accounts `keys` (one tenant's), locked; account rows are locked
    before, so the order is fixed."""
    placeholders = ", ".join(["(%s, %s)"] * len(keys))
    params = [keys[0].tenant_id]
    for k in keys:
        params += [k.user_id, k.conversation_id]
    return (
        f"SELECT {RATE_LIMIT_COLUMNS} FROM rate_limits WHERE tenant_id = %s "  # noqa: S608
        f"AND (user_id, conversation_id) IN ({placeholders}) "
        "ORDER BY user_id, conversation_id, model FOR UPDATE",
        tuple(params),
    )


def _rate_limit_params(rl: RateLimit) -> tuple[Any, ...]:
    k = rl.key.account
    return (k.tenant_id, k.user_id, k.conversation_id, rl.key.model, rl.tokens_per_minute,
            rl.requests_per_minute, rl.tokens_tat, rl.requests_tat)  # fmt: skip


def _request_json(cmd: Decidable) -> dict[str, Any]:
    """The fields of a request compared on an idempotent retry."""
    fields: dict[str, Any] = {}
    for name, value in vars(cmd).items():
        if name == "idempotency_key":
            continue
        if isinstance(value, AccountKey):
            fields |= {
                "tenant_id": value.tenant_id,
                "user_id": value.user_id,
                "conversation_id": value.conversation_id,
            }
        elif isinstance(value, Usage):
            fields |= vars(value)
        elif name == "labels":
            fields[name] = dict(value)
        elif isinstance(value, datetime):
            fields[name] = codec.ts(value)
        else:
            fields[name] = value.value if isinstance(value, StrEnum) else value
    return fields
