"""What the application needs from storage: a unit of work per tenant transaction, and a few
reads. The PostgreSQL adapter (ledger/postgres) and the in-memory one (ledger/memory.py)
implement it; one contract suite (tests/integration/test_store_contract.py) runs against both.

A unit of work is one transaction on one tenant. Its first act is to lock the tenant's account
row (every writer of a tenant does, so writers of one tenant are serialized and never
deadlock); everything it reads after that is locked for it until the transaction ends. Writes
are handed over once, as `Changes`, before the transaction commits; an exception inside the
transaction leaves nothing behind.

Errors: an adapter raises only LedgerErrors. `StoreUnavailable` when the database cannot be
reached or cannot take writes now (a failover); `Conflict` when the transaction lost a race
that a retry resolves (the application retries it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from ledger.model import Account, AccountKey, Event, RateLimit, Reservation
from ledger.money import PricePoint
from ledger.usage import UsageCounters, UsageKey

EventRow = dict[str, Any]
"""An event as codec.event_row() lays it out for the log: columns, data and hash chain."""


@dataclass(frozen=True)
class StreamHead:
    """An account's balance with the head of its stream: version and hash of its last event."""

    account: Account
    version: int
    hash: bytes


@dataclass(frozen=True)
class Outcome:
    """The first response to an idempotency key, with the request it answered."""

    operation: str
    request: dict[str, Any]
    response: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class StoredReservation:
    reservation: Reservation
    ended_balance: Account | None = None
    """The balance its commit or rollback answered (what repeats of that call return)."""


@dataclass(frozen=True)
class Locked:
    """What a batch reads once the tenant is locked."""

    outcomes: dict[str, Outcome]
    rate_limits: list[RateLimit]
    reservations: list[StoredReservation]
    """The named reservations, then the overdue holds, oldest first."""
    heads: dict[AccountKey, StreamHead] = field(default_factory=dict)
    """The accounts locked first (read_locked's `lock`), with their stream heads."""
    prices: list[PricePoint] = field(default_factory=list)
    """The price points of the models asked for and of the named reservations' models, by
    model and then oldest first."""


@dataclass
class Changes:
    """Everything one transaction writes, in one hand-over."""

    events: list[EventRow] = field(default_factory=list)
    accounts: list[StreamHead] = field(default_factory=list)
    rate_limits: list[RateLimit] = field(default_factory=list)
    new_reservations: list[StoredReservation] = field(default_factory=list)
    changed_reservations: list[StoredReservation] = field(default_factory=list)
    usage: dict[UsageKey, UsageCounters] = field(default_factory=dict)
    """Additions to the hourly usage rows."""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    """New idempotency keys; each replaces an expired one of the same name, if any."""
    prices: list[PricePoint] = field(default_factory=list)
    """Price points set; one at the same model and time replaces it."""


@dataclass(frozen=True)
class FoldedEvent:
    """An event of the log with where it stands: for rebuilding projections."""

    position: int
    event: Event
    version: int
    hash: bytes


class UnitOfWork(Protocol):
    async def lock_accounts(self, keys: Sequence[AccountKey]) -> dict[AccountKey, StreamHead]:
        """Lock the account rows `keys` (sorted; creating missing ones) and read them."""

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
        """Lock the account rows `lock` (sorted; creating missing ones) together with those
        of the lineages holding the reservations `owners_of` (in one key order), then read
        and lock: stored outcomes of the keys (those created at or after `outcomes_since`;
        older ones have expired), the rate limits of the accounts (`limiter_accounts` and
        those lineages), the named reservations and up to
        `overdue_max` holds overdue at `overdue_at`; and read the prices of `price_models`
        and of the named reservations' models. Whatever it returns was read while the
        tenant's row was locked, when `lock` names it or it was locked before."""

    async def price_facts(self, model: str) -> tuple[str, datetime | None]:
        """The tenant's currency ("" while it has no price) and when the last held
        reservation on `model` expires (None: none is held)."""

    async def write(self, changes: Changes) -> None:
        """Append the events and write the projection rows."""

    async def replace_projections(self, changes: Changes) -> None:
        """Delete every projection row of the tenant (not the log, not the idempotency keys),
        then write `changes`, whose accounts are all the tenant's accounts."""

    def events_after(self, position: int) -> AsyncIterator[FoldedEvent]:
        """The tenant's logged events after `position`, in log order."""


class Store(Protocol):
    def transaction(self, tenant_id: str) -> AbstractAsyncContextManager[UnitOfWork]:
        """A unit of work on `tenant_id`, committed when the block ends without an error."""

    async def overdue_tenants(self, at: datetime, limit: int) -> list[str]:
        """Tenants with holds overdue at `at` (at most `limit`)."""

    async def reservation(self, tenant_id: str, reservation_id: str) -> Reservation | None: ...

    async def accounts(self, keys: Sequence[AccountKey]) -> dict[AccountKey, Account]:
        """The stored balances of these accounts of one tenant (missing ones are absent)."""

    async def held_total(self) -> int:
        """Tokens held now, across all tenants."""

    async def prices(self, tenant_id: str, model: str = "") -> list[PricePoint]:
        """The tenant's price points (of `model` only, when given), by model, oldest first."""

    async def currency(self, tenant_id: str) -> str:
        """The tenant's currency: that of its prices ("" while it has none)."""

    async def prune_outcomes(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` idempotency keys created before `before`, without waiting for
        any writer; returns how many."""

    async def outcome_count(self) -> int:
        """Idempotency keys stored, expired or not (for the retention figure)."""
