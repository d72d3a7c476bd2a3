"""Rebuild projections from the log, and check the hash chains: what an auditor relies on.

Both use the same evolve functions as the live store, so a difference between a rebuild and the
live tables means the log or the tables were changed outside the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger import codec
from ledger.domain import (
    affected,
    evolve_account,
    evolve_rate_limit,
    evolve_reservation,
    rate_limit_keys,
)
from ledger.model import (
    Account,
    AccountKey,
    Event,
    PriceSet,
    RateLimit,
    RateLimitKey,
    RateLimitSet,
    Reservation,
    ReservationCommitted,
    ReservationRolledBack,
    TokensReserved,
    UsageRecorded,
)
from ledger.money import PricePoint, point_of


def _every(key: AccountKey) -> bool:
    return True


@dataclass
class Projection:
    keep: Callable[[AccountKey], bool] = _every
    """Which accounts to build (with their limiters and reservations); the others are skipped."""
    accounts: dict[AccountKey, Account] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    rate_limits: dict[RateLimitKey, RateLimit] = field(default_factory=dict)
    ended_balances: dict[str, Account] = field(default_factory=dict)
    """The balance a commit or rollback answered (what its repeats return)."""
    prices: dict[tuple[str, datetime], PricePoint] = field(default_factory=dict)
    """(model, effective_from) -> the price set last for it."""

    def feed(self, event: Event) -> None:
        """Apply one event (in log order). An event about a reservation the log never placed
        (its TokensReserved was removed) changes the balances but no reservation, so the
        rebuild shows the reservation as missing instead of failing."""
        keep = self.keep
        if isinstance(event, PriceSet):
            self.prices[(event.model, event.effective_from)] = point_of(event)
        for key in affected(event):
            if keep(key):
                self.accounts[key] = evolve_account(self.accounts.get(key, Account(key)), event)
        # Only a RateLimitSet makes a limiter; until one exists, no event changes any.
        for rk in (
            rate_limit_keys(event) if self.rate_limits or isinstance(event, RateLimitSet) else ()
        ):
            if keep(rk.account):
                rl = evolve_rate_limit(self.rate_limits.get(rk), rk, event)
                if rl is not None:
                    self.rate_limits[rk] = rl
        rid = getattr(event, "reservation_id", "")
        if not (rid and keep(event.key)):
            return
        if rid in self.reservations or isinstance(event, TokensReserved):
            res = evolve_reservation(self.reservations.get(rid), event)
            assert res is not None
            self.reservations[rid] = res
            if isinstance(event, ReservationCommitted | ReservationRolledBack | UsageRecorded):
                self.ended_balances[rid] = self.accounts[res.key]


@dataclass(frozen=True)
class ChainBreak:
    """The first event of a stream whose version or hash does not follow from its predecessor."""

    stream: AccountKey
    version: int
    problem: str


class ChainVerifier:
    """Checks event rows one at a time, each stream's in version order (streams may
    interleave, as in log order): versions 1, 2, 3… without gaps, each prev_hash equal to the
    previous hash, each hash recomputed from the row. Reports each stream's first break."""

    def __init__(self) -> None:
        self.breaks: list[ChainBreak] = []
        self.heads: dict[AccountKey, tuple[int, bytes]] = {}
        self.checked = 0
        self._broken: set[AccountKey] = set()

    def feed(self, row: dict[str, Any]) -> None:
        self.checked += 1
        key = AccountKey(row["tenant_id"], row["user_id"], row["conversation_id"])
        version, head = self.heads.get(key, (0, codec.GENESIS_HASH))
        self.heads[key] = (row["version"], bytes(row["hash"]))
        if key in self._broken:
            return
        problem = ""
        if row["version"] != version + 1:
            problem = f"version {row['version']} follows {version}"
        elif bytes(row["prev_hash"]) != head:
            problem = "prev_hash is not the previous event's hash"
        elif codec.event_hash(row, head) != bytes(row["hash"]):
            problem = "hash does not match the event's content"
        if problem:
            self.breaks.append(ChainBreak(key, row["version"], problem))
            self._broken.add(key)
