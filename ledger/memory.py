"""The ledger's store in memory: the `Store` of ledger/ports.py for tests and for trying the
ledger without a database. Same contract as the PostgreSQL adapter (one suite runs against
both); nothing survives the process.

A transaction holds its tenant's lock from start to end (PostgreSQL's adapter holds the
tenant's row lock from its first statement, which every writer of a tenant takes first: the
same serialization). Writes are staged and applied when the block ends without an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

from ledger import codec
from ledger.errors import Conflict
from ledger.model import Account, AccountKey, RateLimit, RateLimitKey, Reservation, State
from ledger.money import PricePoint
from ledger.ports import (
    Changes,
    EventRow,
    FoldedEvent,
    Locked,
    Outcome,
    StoredReservation,
    StreamHead,
)
from ledger.usage import UsageCounters, UsageKey


@dataclass
class _Tables:
    accounts: dict[AccountKey, StreamHead] = field(default_factory=dict)
    reservations: dict[tuple[str, str], StoredReservation] = field(default_factory=dict)
    rate_limits: dict[RateLimitKey, RateLimit] = field(default_factory=dict)
    usage: dict[UsageKey, UsageCounters] = field(default_factory=dict)
    outcomes: dict[tuple[str, str], Outcome] = field(default_factory=dict)
    prices: dict[tuple[str, str, datetime], PricePoint] = field(default_factory=dict)
    """(tenant, model, effective_from) -> point."""
    events: list[tuple[int, EventRow]] = field(default_factory=list)
    """(position, row) in log order."""


class MemoryStore:
    """Tables in dictionaries, a lock per tenant."""

    def __init__(self) -> None:
        self.tables = _Tables()
        self._locks: dict[str, asyncio.Lock] = {}

    @asynccontextmanager
    async def transaction(self, tenant_id: str) -> AsyncIterator[_Unit]:
        lock = self._locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            unit = _Unit(self.tables, tenant_id)
            yield unit
            unit.commit()

    async def overdue_tenants(self, at: datetime, limit: int) -> list[str]:
        tenants = {
            tenant
            for (tenant, _), s in self.tables.reservations.items()
            if s.reservation.state is State.HELD and s.reservation.expires_at <= at
        }
        return sorted(tenants)[:limit]

    async def reservation(self, tenant_id: str, reservation_id: str) -> Reservation | None:
        stored = self.tables.reservations.get((tenant_id, reservation_id))
        return None if stored is None else stored.reservation

    async def accounts(self, keys: Sequence[AccountKey]) -> dict[AccountKey, Account]:
        return {k: self.tables.accounts[k].account for k in keys if k in self.tables.accounts}

    async def prices(self, tenant_id: str, model: str = "") -> list[PricePoint]:
        return [
            p
            for (tenant, m, _), p in sorted(self.tables.prices.items())
            if tenant == tenant_id and (not model or m == model)
        ]

    async def currency(self, tenant_id: str) -> str:
        return next((p.currency for k, p in self.tables.prices.items() if k[0] == tenant_id), "")

    async def held_total(self) -> int:
        return sum(h.account.held for k, h in self.tables.accounts.items() if not k.user_id)

    async def prune_outcomes(self, before: datetime, limit: int) -> int:
        old = [k for k, o in self.tables.outcomes.items() if o.created_at < before][:limit]
        for k in old:
            del self.tables.outcomes[k]
        return len(old)

    async def outcome_count(self) -> int:
        return len(self.tables.outcomes)


class _Unit:
    def __init__(self, tables: _Tables, tenant_id: str) -> None:
        self._tables = tables
        self._tenant_id = tenant_id
        self._staged: list[tuple[Changes, bool]] = []  # (changes, replacing)
        self._created: dict[AccountKey, StreamHead] = {}

    def _owners(self, reservation_ids: Sequence[str]) -> set[AccountKey]:
        """The lineages of the accounts holding these reservations (those that exist)."""
        found = (self._tables.reservations.get((self._tenant_id, r)) for r in reservation_ids)
        return {k for s in found if s is not None for k in s.reservation.key.lineage()}

    async def lock_accounts(self, keys: Sequence[AccountKey]) -> dict[AccountKey, StreamHead]:
        accounts = self._tables.accounts
        for k in keys:
            if k not in accounts:
                self._created.setdefault(k, StreamHead(Account(k), 0, codec.GENESIS_HASH))
        return {k: accounts.get(k) or self._created[k] for k in keys}

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
        owners = self._owners(owners_of)
        heads = await self.lock_accounts(sorted({*lock, *owners}))
        t, tenant = self._tables, self._tenant_id
        accounts = {*limiter_accounts, *owners}
        named = [
            t.reservations[(tenant, r)]
            for r in sorted(set(reservation_ids))
            if (tenant, r) in t.reservations
        ]
        overdue = sorted(
            (
                s
                for (owner, _), s in t.reservations.items()
                if owner == tenant
                and s.reservation.state is State.HELD
                and s.reservation.expires_at <= overdue_at
            ),
            key=lambda s: s.reservation.expires_at,
        )
        models = {*price_models, *(s.reservation.model for s in named)}
        return Locked(
            prices=[
                p
                for (owner, m, _), p in sorted(t.prices.items())
                if owner == tenant and m in models
            ],
            outcomes={
                k: o
                for k in idempotency_keys
                if (o := t.outcomes.get((tenant, k))) and o.created_at >= outcomes_since
            },
            rate_limits=[rl for k, rl in sorted(t.rate_limits.items()) if k.account in accounts],
            reservations=named + overdue[:overdue_max],
            heads=heads,
        )

    async def price_facts(self, model: str) -> tuple[str, datetime | None]:
        t, tenant = self._tables, self._tenant_id
        currency = next((p.currency for k, p in t.prices.items() if k[0] == tenant), "")
        held = [
            s.reservation.expires_at
            for (owner, _), s in t.reservations.items()
            if owner == tenant
            and s.reservation.model == model
            and s.reservation.state is State.HELD
        ]
        return currency, max(held, default=None)

    async def write(self, changes: Changes) -> None:
        self._staged.append((changes, False))

    async def replace_projections(self, changes: Changes) -> None:
        self._staged.append((changes, True))

    async def events_after(self, position: int) -> AsyncIterator[FoldedEvent]:
        for pos, row in list(self._tables.events):
            if pos > position and row["tenant_id"] == self._tenant_id:
                event = codec.event_from_row(row)
                yield FoldedEvent(pos, event, row["version"], row["hash"])

    def commit(self) -> None:
        """Apply the staged changes, checking the log's uniqueness first, as the events
        table's primary key does: nothing is applied when it fails."""
        t = self._tables
        heads = {
            (r["tenant_id"], r["user_id"], r["conversation_id"], r["version"]) for _, r in t.events
        }
        for changes, _ in self._staged:
            for row in changes.events:
                stream = (row["tenant_id"], row["user_id"], row["conversation_id"], row["version"])
                if stream in heads:
                    raise Conflict(f"event {stream} was appended by another writer")
                heads.add(stream)
        for key, head in self._created.items():
            t.accounts.setdefault(key, head)
        for changes, replacing in self._staged:
            if replacing:
                self._clear()
            self._apply(changes)

    def _clear(self) -> None:
        t, tenant = self._tables, self._tenant_id
        t.accounts = {k: h for k, h in t.accounts.items() if k.tenant_id != tenant}
        t.reservations = {k: s for k, s in t.reservations.items() if k[0] != tenant}
        t.rate_limits = {k: r for k, r in t.rate_limits.items() if k.account.tenant_id != tenant}
        t.usage = {k: c for k, c in t.usage.items() if k.tenant_id != tenant}
        t.prices = {k: p for k, p in t.prices.items() if k[0] != tenant}

    def _apply(self, changes: Changes) -> None:
        t, tenant = self._tables, self._tenant_id
        for row in changes.events:
            t.events.append((len(t.events) + 1, row))
        for head in changes.accounts:
            t.accounts[head.account.key] = head
        for rl in changes.rate_limits:
            t.rate_limits[rl.key] = rl
        for stored in (*changes.new_reservations, *changes.changed_reservations):
            t.reservations[(tenant, stored.reservation.reservation_id)] = stored
        for key, counters in changes.usage.items():
            t.usage.setdefault(key, UsageCounters()).add(counters)
        for idem, outcome in changes.outcomes.items():
            t.outcomes[(tenant, idem)] = outcome
        for p in changes.prices:
            t.prices[(tenant, p.model, p.effective_from)] = p
