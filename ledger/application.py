"""The ledger's application: commands in, results out, over any `Store` (ledger/ports.py).

Batching (group commit): writes are queued per tenant. While a tenant's transaction is in
flight, further writes for it wait in its queue; the next transaction takes all of them (up to
`limits.batch_commands_max`) and applies them one after another, in arrival order, exactly as
if each had its own transaction, with one outcome per write. A write that arrives alone goes
alone at once, so batching adds no latency; under load it saves a commit (and its WAL flush),
the row locks and the round trips per write.

Concurrency: a transaction locks the account rows it touches in key order, the tenant row
first (its key sorts first). Every writer of a tenant takes the tenant row first, so writers of
one tenant never deadlock, and a writer holding it may lock any other row of that tenant (to
expire someone else's overdue hold). A batch holds one tenant's writes only.

Each write is dispatched through `_HANDLERS`, one function per command type.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from ledger import codec, errors, limits
from ledger.batch import EXPIRY_ACTOR, Batch
from ledger.domain import (
    Decidable,
    commit_outcome,
    decide,
    headroom,
    hold_pricing,
    soft_limit_warnings,
)
from ledger.model import (
    Account,
    AccountKey,
    AdjustBalance,
    BalanceResult,
    Commit,
    CommitResult,
    Event,
    GrantTokens,
    PriceEntry,
    PriceSet,
    RateLimit,
    RateLimitKey,
    RecordUsage,
    Reservation,
    Reserve,
    ReserveResult,
    Rollback,
    RollbackResult,
    SetBudgetAlerts,
    SetPrices,
    SetQuota,
    SetRateLimit,
    SoftLimitWarning,
    State,
    Usage,
)
from ledger.money import PricePoint
from ledger.ports import Store, UnitOfWork
from ledger.reads import RebuildReport
from ledger.replay import Projection
from ledger.usage import UsageCounters, UsageKey, add_usage

_ATTEMPTS_MAX = 3

# Told the events of each transaction once it has committed (metrics count them). It runs on
# the event loop between transactions: it must be quick and must not block.
EventObserver = Callable[[Sequence[Event]], None]

_log = logging.getLogger("tokenledger.ledger")


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
class ExpireTenant:
    """Internal: expire a tenant's overdue holds (the sweeper's work for one tenant)."""

    tenant_id: str


# Writes on one account whose response is that account's balance (or, for SetRateLimit, the
# limiter): they differ only in their events.
AccountWrite = SetQuota | RecordUsage | GrantTokens | AdjustBalance | SetRateLimit | SetBudgetAlerts
Write = Reserve | Commit | Rollback | AccountWrite | SetPrices | ExpireTenant


@dataclass
class _Pending:
    """A call waiting for its tenant's next transaction: one write, or the writes of a batch
    call (`many`), which share the call's meta and get a list of outcomes, one a write."""

    commands: Sequence[Write]
    meta: CallMeta
    future: asyncio.Future[Any]
    many: bool = False


class Ledger:
    """Reserve, commit, roll back and the account writes, batched per tenant over `store`;
    balance and reservation reads; expiry and rebuild."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime] = utc_now,
        new_id: Callable[[], str] = new_reservation_id,
        batch_max: int = limits.batch_commands_max,
        on_appended: EventObserver | None = None,
        key_retention_s: int = limits.idempotency_retention_s_default,
    ) -> None:
        """`key_retention_s`: how long an idempotency key's first outcome is the answer to
        it; after that the key is a new request (and its record is pruned)."""
        self._store = store
        self._key_retention = timedelta(seconds=key_retention_s)
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

    async def set_budget_alerts(self, cmd: SetBudgetAlerts, meta: CallMeta = CallMeta()) -> Account:
        result: Account = await self._submit(cmd, meta)
        return result

    async def set_prices(self, cmd: SetPrices, meta: CallMeta = CallMeta()) -> list[PricePoint]:
        result: list[PricePoint] = await self._submit(cmd, meta)
        return result

    async def reserve_batch(
        self, cmds: Sequence[Reserve], meta: CallMeta = CallMeta()
    ) -> list[ReserveResult | errors.LedgerError]:
        return await self._submit_many(cmds, meta)

    async def commit_batch(
        self, cmds: Sequence[Commit], meta: CallMeta = CallMeta()
    ) -> list[CommitResult | errors.LedgerError]:
        return await self._submit_many(cmds, meta)

    async def rollback_batch(
        self, cmds: Sequence[Rollback], meta: CallMeta = CallMeta()
    ) -> list[RollbackResult | errors.LedgerError]:
        return await self._submit_many(cmds, meta)

    async def expire_overdue(self) -> int:
        """End overdue holds of every tenant (the sweeper's pass); returns how many expired."""
        tenants = await self._store.overdue_tenants(self._clock(), limits.expire_batch_max)
        meta = CallMeta(actor=EXPIRY_ACTOR)
        counts = await asyncio.gather(*(self._submit(ExpireTenant(t), meta) for t in tenants))
        return sum(counts)

    # --- batching ---------------------------------------------------------------------------

    async def _submit(self, cmd: Write, meta: CallMeta) -> Any:
        """Queue a write for its tenant's next transaction and wait for its outcome. A caller
        that gives up before its transaction starts leaves no effect; after, the whole one."""
        return await self._enqueue(_tenant_of(cmd), _Pending((cmd,), meta, self._future()))

    async def _submit_many(self, cmds: Sequence[Write], meta: CallMeta) -> list[Any]:
        """Queue the writes of a batch call (one tenant's) as one entry: they are applied one
        after another in one transaction, each exactly as if it were a call of its own (a
        refusal is its outcome, not the batch's), with no task or future of their own."""
        if not cmds:
            return []
        tenant_id = _tenant_of(cmds[0])
        if any(_tenant_of(c) != tenant_id for c in cmds):
            raise ValueError("the writes of a batch call are one tenant's")
        pending = _Pending(tuple(cmds), meta, self._future(), many=True)
        outcomes: list[Any] = await self._enqueue(tenant_id, pending)
        return outcomes

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, tenant_id: str, pending: _Pending) -> Any:
        self._queues.setdefault(tenant_id, deque()).append(pending)
        if tenant_id not in self._workers:
            self._workers[tenant_id] = asyncio.create_task(self._drain(tenant_id))
        return await pending.future

    async def _drain(self, tenant_id: str) -> None:
        queue = self._queues[tenant_id]
        try:
            while queue:
                batch = self._next_batch(queue)
                if batch:
                    await self._run_batch(tenant_id, batch)
        finally:
            # No await between the emptiness check and here: a write queued meanwhile would
            # otherwise find a worker that is about to end.
            del self._workers[tenant_id]
            del self._queues[tenant_id]

    async def _run_batch(self, tenant_id: str, batch: list[_Pending]) -> None:
        """Apply a batch in one transaction, retrying lost races; settle each write's future
        with its outcome once the transaction has committed."""
        outcomes: list[list[Any]] = []
        failure: BaseException | None = None
        for attempt in range(_ATTEMPTS_MAX):
            try:
                outcomes = await self._apply_batch(tenant_id, batch)
            except errors.Conflict as exc:
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
            if failure is not None:
                pending.future.set_exception(failure)
            elif pending.many:
                pending.future.set_result(outcomes[i])
            elif isinstance(outcomes[i][0], BaseException):
                pending.future.set_exception(outcomes[i][0])
            else:
                pending.future.set_result(outcomes[i][0])

    def _next_batch(self, queue: deque[_Pending]) -> list[_Pending]:
        """The calls of the next transaction: the first waiting, and those after it while
        their writes together stay within `batch_max` (a batch call is never split)."""
        batch: list[_Pending] = []
        writes = 0
        while queue and (not batch or writes + len(queue[0].commands) <= self._batch_max):
            pending = queue.popleft()
            if not pending.future.cancelled():
                batch.append(pending)
                writes += len(pending.commands)
        return batch

    async def _apply_batch(self, tenant_id: str, batch: list[_Pending]) -> list[list[Any]]:
        """Each call's outcomes, one a write: its result or the LedgerError refusing it."""
        async with self._store.transaction(tenant_id) as uow:
            work = Batch(uow, tenant_id, self._clock(), self._new_id, self._key_retention)
            await _load(work, [c for p in batch for c in p.commands])
            outcomes: list[list[Any]] = []
            for pending in batch:
                work.actor, work.trace_id = pending.meta.actor, pending.meta.trace_id
                outcomes.append([await _apply(work, cmd) for cmd in pending.commands])
            await uow.write(work.changes())
        self._observe(work.events)
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

    # --- maintenance ------------------------------------------------------------------------

    async def prune_keys(self, batches_max: int = 100) -> int:
        """Delete expired idempotency keys, `limits.prune_batch_max` at a time, each batch a
        short transaction of its own that skips rows a writer holds (it never waits for one);
        returns how many. At most `batches_max` batches a call: the sweeper calls again."""
        before = self._clock() - self._key_retention
        pruned = 0
        for _ in range(batches_max):
            n = await self._store.prune_outcomes(before, limits.prune_batch_max)
            pruned += n
            if n < limits.prune_batch_max:
                break
        return pruned

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
        log = _Refold()
        async with self._store.transaction(tenant_id) as uow:
            await log.fold(uow)
        unlocked = log.events
        async with self._store.transaction(tenant_id) as uow:
            work = Batch(uow, tenant_id, self._clock(), self._new_id, self._key_retention)
            await work.lock_accounts([AccountKey(tenant_id)])
            locked = time.monotonic()
            await log.fold(uow)
            p = log.projection
            changes = work.replacing(
                p.accounts,
                log.heads,
                p.reservations,
                p.ended_balances,
                p.rate_limits,
                log.usage,
                list(p.prices.values()),
            )
            await uow.replace_projections(changes)
        return RebuildReport(
            events=log.events,
            events_under_lock=log.events - unlocked,
            lock_held_s=round(time.monotonic() - locked, 3),
            accounts=len(changes.accounts),
            reservations=len(p.reservations),
            usage_rows=len(log.usage),
            rate_limits=len(p.rate_limits),
        )

    # --- reads ------------------------------------------------------------------------------

    async def get_reservation(self, tenant_id: str, reservation_id: str) -> Reservation:
        res = await self._store.reservation(tenant_id, reservation_id)
        if res is None:
            raise errors.ReservationNotFound(tenant_id, reservation_id)
        return res

    async def get_balance(self, key: AccountKey) -> BalanceResult:
        now = self._clock()
        lineage = key.lineage()
        stored = await self._store.accounts(lineage)
        accounts = [stored.get(k, Account(k)).rolled(now) for k in lineage]
        return BalanceResult(accounts[-1], tuple(accounts[:-1]), await self.currency(key.tenant_id))

    async def prices(self, tenant_id: str, model: str = "") -> list[PricePoint]:
        """The tenant's price points (of `model`, when given), by model, oldest first."""
        return await self._store.prices(tenant_id, model)

    async def currency(self, tenant_id: str) -> str:
        """The tenant's currency ("" while it has no prices)."""
        return await self._store.currency(tenant_id)

    async def held_total(self) -> int:
        """Tokens held now across all tenants: for a periodic gauge, not the request path."""
        return await self._store.held_total()


# --- the handlers: one per command type -------------------------------------------------------


async def _load(work: Batch, commands: Sequence[Write]) -> None:
    """Lock and load what the batch's commands will read."""
    keyed = [c for c in commands if isinstance(c, Reserve | AccountWrite)]
    priced = [c for c in commands if isinstance(c, SetPrices)]
    await work.load(
        {k for c in keyed for k in c.key.lineage()},
        [c.reservation_id for c in commands if isinstance(c, Commit | Rollback)],
        [c.idempotency_key for c in (*keyed, *priced)],
        price_models=sorted(
            {c.model for c in commands if isinstance(c, Reserve | RecordUsage)}
            | {e.model for c in priced for e in c.prices}
        ),
    )


async def _apply(work: Batch, cmd: Write) -> Any:
    """A write's result, or the LedgerError that refuses it (its neighbours go on)."""
    try:
        return await _HANDLERS[type(cmd)](work, cmd)
    except errors.LedgerError as exc:
        return exc


async def _reserve(work: Batch, cmd: Reserve) -> ReserveResult:
    request = _request_json(cmd)
    stored = work.stored_response(cmd.idempotency_key, "Reserve", request)
    if stored is not None:
        return _reserve_result(cmd, stored)
    await work.expire_overdue()
    try:
        events = decide(work.snapshot(cmd.key, model=cmd.model), cmd, work.context(work.new_id()))
    except errors.Refusal as refusal:  # the key's outcome, as a grant would be
        work.remember(
            cmd.idempotency_key, "Reserve", request, {"refusal": codec.refusal_to_json(refusal)}
        )
        raise
    res = work.apply(events)
    assert res is not None
    levels = [work.accounts[k].rolled(work.now) for k in cmd.key.lineage()]
    points = work.prices.get(cmd.model, ())
    reservable, resets_at = headroom(
        levels, hold_pricing(points, work.now, res.expires_at, cmd.prompt_tokens)
    )
    result = ReserveResult(
        reservation=res,
        balance=work.accounts[cmd.key],
        requested=cmd.amount,
        warnings=soft_limit_warnings(levels, work.currency),
        reservable=reservable,
        resets_at=resets_at,
    )
    response = {
        "reservation": codec.reservation_to_json(res),
        "balance": codec.account_to_json(result.balance),
        "warnings": [vars(w) for w in result.warnings],
        "reservable": reservable,
        "resets_at": codec.ts(resets_at) if resets_at else None,
    }
    work.remember(cmd.idempotency_key, "Reserve", request, response)
    return result


def _reserve_result(cmd: Reserve, stored: dict[str, Any]) -> ReserveResult:
    """The first outcome of a key: its hold, or its refusal raised again."""
    if "refusal" in stored:
        raise codec.refusal_from_json(stored["refusal"])
    resets_at = stored["resets_at"]
    return ReserveResult(
        reservation=codec.reservation_from_json(stored["reservation"]),
        balance=codec.account_from_json(stored["balance"]),
        requested=cmd.amount,
        warnings=tuple(SoftLimitWarning(**w) for w in stored["warnings"]),
        reservable=stored["reservable"],
        resets_at=codec.parse_ts(resets_at) if resets_at else None,
    )


async def _commit(work: Batch, cmd: Commit) -> CommitResult:
    res, balance = await _end_reservation(work, cmd)
    return commit_outcome(res, balance)


async def _rollback(work: Batch, cmd: Rollback) -> RollbackResult:
    res, balance = await _end_reservation(work, cmd)
    return RollbackResult(reservation=res, released=res.amount, balance=balance)


async def _end_reservation(work: Batch, cmd: Commit | Rollback) -> tuple[Reservation, Account]:
    """Commit or roll back; a repeat of the call that ended the reservation writes nothing and
    returns the balance recorded when it ended."""
    res = work.reservations.get(cmd.reservation_id)
    if res is None:
        raise errors.ReservationNotFound(cmd.tenant_id, cmd.reservation_id)
    if res.state is not State.HELD and not decide(work.snapshot(res.key, res), cmd, work.context()):
        return res, work.ended_balances[res.reservation_id]
    await work.expire_overdue()
    res = work.reservations[cmd.reservation_id]
    res_after = work.apply(decide(work.snapshot(res.key, res), cmd, work.context()))
    assert res_after is not None
    work.end(res_after.reservation_id, work.accounts[res.key])
    return res_after, work.accounts[res.key]


async def _account_write(work: Batch, cmd: AccountWrite) -> Account | RateLimit:
    """A write on one account; its response (the account's balance after it, or the rate
    limit as set) is stored with its key, and a retry gets that first response."""
    operation = type(cmd).__name__
    request = _request_json(cmd)
    stored = work.stored_response(cmd.idempotency_key, operation, request)
    if stored is None:
        await work.expire_overdue()
        model = cmd.model if isinstance(cmd, RecordUsage) else ""  # priced at the usage's model
        work.apply(decide(work.snapshot(cmd.key, model=model), cmd, work.context()))
        if isinstance(cmd, SetRateLimit):
            rl = work.rate_limits[RateLimitKey(cmd.key, cmd.model)]
            stored = {"rate_limit": [rl.tokens_per_minute, rl.requests_per_minute]}
        else:
            stored = {"balance": codec.account_to_json(work.accounts[cmd.key])}
        work.remember(cmd.idempotency_key, operation, request, stored)
    if isinstance(cmd, SetRateLimit):
        return RateLimit(RateLimitKey(cmd.key, cmd.model), *stored["rate_limit"])
    return codec.account_from_json(stored["balance"])


async def _set_prices(work: Batch, cmd: SetPrices) -> list[PricePoint]:
    """Set every price of the call in this transaction, or none; a retry of the key gets
    the points it set."""
    request = _request_json(cmd)
    stored = work.stored_response(cmd.idempotency_key, "SetPrices", request)
    if stored is None:
        held_until: dict[str, datetime] = {}
        for model in sorted({e.model for e in cmd.prices}):
            currency, until = await work.uow.price_facts(model)
            work.currency = work.currency or currency
            ends = [t for t in (until, work.held_until(model)) if t is not None]
            if ends:
                held_until[model] = max(ends)
        events = decide(work.price_snapshot(held_until), cmd, work.context())
        work.apply(events)
        stored = {"prices": [codec.price_to_json(e) for e in events if isinstance(e, PriceSet)]}
        work.remember(cmd.idempotency_key, "SetPrices", request, stored)
    return [codec.price_from_json(p) for p in stored["prices"]]


async def _expire(work: Batch, cmd: ExpireTenant) -> int:
    return await work.expire_overdue()


Handler = Callable[[Batch, Any], Awaitable[Any]]
_HANDLERS: dict[type, Handler] = {
    Reserve: _reserve,
    Commit: _commit,
    Rollback: _rollback,
    SetQuota: _account_write,
    RecordUsage: _account_write,
    GrantTokens: _account_write,
    AdjustBalance: _account_write,
    SetRateLimit: _account_write,
    SetBudgetAlerts: _account_write,
    SetPrices: _set_prices,
    ExpireTenant: _expire,
}


@dataclass
class _Refold:
    """A tenant's projections folded from its log, in steps that each continue from the last
    position the one before read."""

    projection: Projection = field(default_factory=Projection)
    heads: dict[AccountKey, tuple[int, bytes]] = field(default_factory=dict)
    usage: dict[UsageKey, UsageCounters] = field(default_factory=dict)
    events: int = 0
    position: int = 0

    async def fold(self, uow: UnitOfWork) -> None:
        async for logged in uow.events_after(self.position):
            self.projection.feed(logged.event)
            add_usage(self.usage, logged.event)
            self.heads[logged.event.key] = (logged.version, logged.hash)
            self.events += 1
            self.position = logged.position


def _entry_json(entry: PriceEntry) -> dict[str, Any]:
    at = entry.effective_from
    return vars(entry) | {"effective_from": codec.ts(at) if at else None}


def _tenant_of(cmd: Write) -> str:
    return cmd.key.tenant_id if isinstance(cmd, Reserve | AccountWrite) else cmd.tenant_id


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
        elif name == "prices":
            fields[name] = [_entry_json(e) for e in value]
        else:
            fields[name] = value.value if isinstance(value, StrEnum) else value
    return fields
