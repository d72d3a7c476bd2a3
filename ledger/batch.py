"""One transaction's working state: what it locked, the events it decided and the projection
rows they change, handed to the unit of work as one `Changes` before the commit. The writes of
a batch run one after another against this state, so each sees the effects of those before it.
Pure bookkeeping: all reading and writing goes through the unit of work it is given."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from ledger import codec, errors, limits
from ledger.domain import (
    Snapshot,
    affected,
    applicable_limits,
    decide,
    evolve_account,
    evolve_rate_limit,
    evolve_reservation,
    rate_limit_keys,
    threshold_crossings,
)
from ledger.model import (
    Account,
    AccountKey,
    Context,
    Event,
    Expire,
    PriceSet,
    RateLimit,
    RateLimitKey,
    RateLimitSet,
    Reservation,
    State,
)
from ledger.money import PricePoint, point_of, with_point
from ledger.ports import (
    Changes,
    Locked,
    Outcome,
    StoredReservation,
    StreamHead,
    UnitOfWork,
)
from ledger.usage import UsageCounters, UsageKey, add_usage

EXPIRY_ACTOR = "system:expiry"


class Batch:
    """The locked state of one tenant's transaction and what it changed."""

    def __init__(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        now: datetime,
        new_id: Callable[[], str],
        key_retention: timedelta,
    ) -> None:
        self.key_retention = key_retention
        self.uow = uow
        self.new_id = new_id
        self.tenant_id = tenant_id
        self.now = now
        self.actor = ""
        self.trace_id = ""
        self.accounts: dict[AccountKey, Account] = {}
        self.streams: dict[AccountKey, tuple[int, bytes]] = {}
        self.reservations: dict[str, Reservation] = {}
        self.ended_balances: dict[str, Account] = {}
        self.rate_limits: dict[RateLimitKey, RateLimit] = {}
        self.prices: dict[str, tuple[PricePoint, ...]] = {}
        """The price points loaded (and set since), by model, oldest first."""
        self.currency = ""
        """The tenant's currency, as far as the prices loaded or set tell ("" if unknown)."""
        self.events: list[Event] = []
        self._outcomes: dict[str, Outcome] = {}
        self._overdue_checked = False
        self._changes = Changes()
        self._dirty_accounts: set[AccountKey] = set()
        self._dirty_reservations: set[str] = set()
        self._new_reservations: set[str] = set()
        self._ended: set[str] = set()
        self._dirty_limits: set[RateLimitKey] = set()

    # --- reading, under the tenant's lock ----------------------------------------------------

    async def load(
        self,
        account_keys: set[AccountKey],
        reservation_ids: Sequence[str],
        idempotency_keys: Sequence[str],
        price_models: Sequence[str] = (),
    ) -> None:
        """Lock and load what the batch's writes will read: every account of their lineages
        (tenant first), their reservations and idempotency keys, the tenant's limiters and its
        overdue holds. Idempotency keys are read after the tenant's row is locked: a twin of a
        call in flight elsewhere (another process, a client's retry) has then committed or not
        started, so its key is seen and the call is answered, not decided afresh."""
        ordered = sorted({AccountKey(self.tenant_id), *account_keys})
        locked = await self.uow.read_locked(
            idempotency_keys,
            ordered,
            reservation_ids,
            self.now,
            limits.expire_batch_max,
            outcomes_since=self.now - self.key_retention,
            lock=[k for k in ordered if k not in self.accounts],
            price_models=price_models,
            owners_of=reservation_ids,
        )
        self._take(locked)
        named = (self.reservations.get(r) for r in reservation_ids)
        if any(k not in self.accounts for r in named if r for k in r.key.lineage()):
            # An owner the locking statement did not see: only a reservation committed after
            # that statement began could be one. A lost race: the batch runs again.
            raise errors.Conflict("a reservation's accounts were not locked; retrying")

    def _take(self, locked: Locked) -> None:
        for k, head in locked.heads.items():
            self.accounts[k] = head.account
            self.streams[k] = (head.version, head.hash)
        self._outcomes = dict(locked.outcomes)
        for rl in locked.rate_limits:
            self.rate_limits[rl.key] = rl
        for point in locked.prices:
            self.prices[point.model] = (*self.prices.get(point.model, ()), point)
            self.currency = point.currency
        for stored in locked.reservations:
            rid = stored.reservation.reservation_id
            if rid in self.reservations:  # ours may be ahead of the table
                continue
            self.reservations[rid] = stored.reservation
            if stored.ended_balance is not None:
                self.ended_balances[rid] = stored.ended_balance

    async def lock_accounts(self, keys: Sequence[AccountKey]) -> None:
        """Lock (creating when missing) the account rows of this tenant named by `keys`."""
        wanted = [k for k in keys if k not in self.accounts]
        if not wanted:
            return
        for k, head in (await self.uow.lock_accounts(wanted)).items():
            self.accounts[k] = head.account
            self.streams[k] = (head.version, head.hash)

    # --- deciding ----------------------------------------------------------------------------

    def context(self, new_id: str = "") -> Context:
        return Context(now=self.now, new_id=new_id, actor=self.actor, trace_id=self.trace_id)

    def snapshot(
        self, key: AccountKey, res: Reservation | None = None, model: str = ""
    ) -> Snapshot:
        """What a decision on `key` may see; the prices of `model` (or of `res`'s)."""
        model = model or (res.model if res else "")
        return Snapshot(
            accounts={k: self.accounts[k] for k in key.lineage()},
            reservation=res,
            rate_limits=(
                {rl.key: rl for rl in applicable_limits(self.rate_limits, key, model)}
                if self.rate_limits
                else {}
            ),
            prices={model: self.prices.get(model, ())},
            currency=self.currency,
        )

    def price_snapshot(self, held_until: dict[str, datetime]) -> Snapshot:
        """What a SetPrices decision may see: every price loaded, and the live holds."""
        return Snapshot(prices=dict(self.prices), currency=self.currency, held_until=held_until)

    def held_until(self, model: str) -> datetime | None:
        """When the last hold on `model` this transaction placed or loaded expires."""
        held = [
            r.expires_at
            for r in self.reservations.values()
            if r.model == model and r.state is State.HELD
        ]
        return max(held, default=None)

    async def expire_overdue(self) -> int:
        """Expire the tenant's overdue holds, oldest first (at most `expire_batch_max` in a
        transaction, the rest in the next); returns how many expired. Once per transaction:
        its clock does not move."""
        if self._overdue_checked:
            return 0
        self._overdue_checked = True
        overdue = [  # as loaded, plus holds this transaction placed meanwhile
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
                Context(now=self.now, actor=EXPIRY_ACTOR, trace_id=self.trace_id),
            )
            self.apply(events)
            count += len(events)
        return count

    def apply(self, events: list[Event]) -> Reservation | None:
        """Evolve the locked state by `events` and chain them onto their streams, then log the
        budget alerts they made the accounts cross; returns the reservation the events
        concern, if any."""
        res: Reservation | None = None
        touched: dict[AccountKey, None] = {}
        for event in events:
            for k in affected(event):
                touched[k] = None
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
            if isinstance(event, PriceSet):
                self._set_price(event)
            if self.rate_limits or isinstance(event, RateLimitSet):  # a hold moves only those set
                for rk in rate_limit_keys(event):
                    rl = evolve_rate_limit(self.rate_limits.get(rk), rk, event)
                    if rl is not None:
                        self.rate_limits[rk] = rl
                        self._dirty_limits.add(rk)
            version, head = self.streams[event.key]
            row = codec.event_row(event, version + 1, head)
            self.streams[event.key] = (version + 1, row["hash"])
            self._dirty_accounts.add(event.key)
            self._changes.events.append(row)
            self.events.append(event)
            add_usage(self._changes.usage, event)
        ctx = self.context()
        crossed = [
            e for k in touched for e in threshold_crossings(self.accounts[k], ctx, self.currency)
        ]
        if crossed:
            self.apply(crossed)
        return res

    def _set_price(self, event: PriceSet) -> None:
        point = point_of(event)
        self.prices[event.model] = with_point(self.prices.get(event.model, ()), point)
        self.currency = event.currency
        self._changes.prices.append(point)

    def end(self, reservation_id: str, balance: Account) -> None:
        """Record the balance a commit or rollback answered, for its repeats."""
        self.ended_balances[reservation_id] = balance
        self._ended.add(reservation_id)

    # --- idempotency -------------------------------------------------------------------------

    def stored_response(
        self, key: str, operation: str, request: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The first response to this key, or None when the key is new. A different request
        under the same key is refused, naming the first field that differs."""
        outcome = self._outcomes.get(key)
        if outcome is None:
            return None
        first = {"operation": outcome.operation, **outcome.request}
        now = {"operation": operation, **request}
        for name in sorted(first.keys() | now.keys(), key=lambda n: (n != "operation", n)):
            if first.get(name) != now.get(name):
                raise errors.IdempotencyKeyReused(key, name, first.get(name), now.get(name))
        return outcome.response

    def remember(
        self, key: str, operation: str, request: dict[str, Any], response: dict[str, Any]
    ) -> None:
        outcome = Outcome(operation, request, response, self.now)
        self._outcomes[key] = outcome
        self._changes.outcomes[key] = outcome

    # --- handing over ------------------------------------------------------------------------

    def changes(self) -> Changes:
        """What the transaction writes: its events and every row they changed."""
        out = self._changes
        out.accounts = [self._head(k) for k in sorted(self._dirty_accounts)]
        out.rate_limits = [self.rate_limits[k] for k in sorted(self._dirty_limits)]
        out.new_reservations = [self._stored(r) for r in sorted(self._new_reservations)]
        out.changed_reservations = [
            self._stored(r) for r in sorted(self._dirty_reservations - self._new_reservations)
        ]
        out.usage = dict(sorted(out.usage.items()))
        return out

    def _head(self, k: AccountKey) -> StreamHead:
        version, head = self.streams[k]
        return StreamHead(self.accounts[k], version, head)

    def _stored(self, rid: str) -> StoredReservation:
        ended = self.ended_balances.get(rid) if rid in self._ended else None
        return StoredReservation(self.reservations[rid], ended)

    def replacing(
        self,
        accounts: dict[AccountKey, Account],
        heads: dict[AccountKey, tuple[int, bytes]],
        reservations: dict[str, Reservation],
        ended_balances: dict[str, Account],
        rate_limits: dict[RateLimitKey, RateLimit],
        usage: dict[UsageKey, UsageCounters],
        prices: list[PricePoint],
    ) -> Changes:
        """The rows of a tenant rebuilt from its log, as changes that replace all of its
        projection rows."""
        keys = sorted(accounts.keys() | heads.keys())
        self.accounts = {k: accounts.get(k, Account(k)) for k in keys}
        self.streams = {k: heads.get(k, (0, codec.GENESIS_HASH)) for k in keys}
        self.reservations = dict(reservations)
        self.ended_balances = dict(ended_balances)
        self.rate_limits = dict(rate_limits)
        self._dirty_accounts = set(keys)
        self._new_reservations = set(self.reservations)
        self._ended = set(self.ended_balances)
        self._dirty_limits = set(self.rate_limits)
        self._changes = Changes(usage=dict(usage), prices=list(prices))
        return self.changes()
