"""Domain errors. No gRPC in them: the servers map each class to one status code in one table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose."""

    reason = "LEDGER_ERROR"

    def metadata(self) -> dict[str, str]:
        """Machine-readable facts for ErrorInfo.metadata."""
        return {}


class Refusal(LedgerError):
    """A Reserve refused for budget or rate; carries what to do instead."""

    advice: dict[str, str]

    def advise(self, advice: Mapping[str, str]) -> None:
        """Add the edge's advice, which the ledger itself cannot know (it has no model
        catalogue): what else the caller may do, as ErrorInfo metadata."""
        self.advice = dict(advice)

    def metadata(self) -> dict[str, str]:
        return dict(getattr(self, "advice", {}))


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(LedgerError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


@dataclass(frozen=True)
class RefusingLevel:
    """The account level whose limit a reservation did not fit."""

    scope: str  # "tenant" | "user" | "conversation"
    account: str  # e.g. "acme/alice"
    limit: int
    held: int
    used: int
    available: int
    currency: str = ""
    """Set when the level's money budget refused: the figures are micro-units of it."""

    def figure(self, amount: int) -> str:
        return f"{amount} µ{self.currency}" if self.currency else str(amount)


class BudgetExhausted(Refusal):
    """No level's budget refused less than the minimum asked for; `level` is the first
    (tenant first) that refused, `reservable` the most any request could get now and
    `resets_at` when the refusing level's period resets (None: it never does)."""

    reason = "BUDGET_EXHAUSTED"

    def __init__(
        self,
        requested: int,
        level: RefusingLevel,
        reservable: int,
        resets_at: datetime | None = None,
    ) -> None:
        self.requested = requested
        self.level = level
        self.reservable = reservable
        self.resets_at = resets_at
        when = f"the period resets at {resets_at.isoformat()}" if resets_at else "holds end"
        f = level.figure
        budget = "money budget of the " if level.currency else ""
        super().__init__(
            f"requested {requested} tokens but the {budget}{level.scope} {level.account} "
            f"has {f(level.available)} available (limit {f(level.limit)}, held "
            f"{f(level.held)}, used {f(level.used)}); reserve at most {reservable} tokens "
            f"now (or pass min_amount to accept a partial grant), or wait until {when}"
        )

    def metadata(self) -> dict[str, str]:
        out = super().metadata() | {
            "requested": str(self.requested),
            "available": str(self.level.available),
            "limit": str(self.level.limit),
            "scope": self.level.scope,
            "account": self.level.account,
            "reservable": str(self.reservable),
        }
        if self.level.currency:
            out["currency"] = self.level.currency
        if self.resets_at is not None:
            out["resets_at"] = self.resets_at.isoformat()
        return out


class RateLimited(Refusal):
    """A tokens- or requests-per-minute limit refused the call; it fits again after
    `retry_after_s` (None: never, the request is larger than a minute's worth)."""

    reason = "RATE_LIMITED"

    def __init__(
        self,
        kind: str,
        account: str,
        model: str,
        per_minute: int,
        requested: int,
        room: int,
        retry_after_s: float | None,
    ) -> None:
        self.kind = kind  # "tokens" | "requests"
        self.account = account
        self.model = model
        self.per_minute = per_minute
        self.requested = requested
        self.room = room
        self.retry_after_s = retry_after_s
        which = f"model {model}" if model else "all models"
        advice = (
            f"retry in {retry_after_s:.3f} s"
            if retry_after_s is not None
            else f"ask for at most {per_minute} {kind}: more never fits"
        )
        super().__init__(
            f"{account} may use {per_minute} {kind} per minute on {which}; this call needs "
            f"{requested} and {room} fit now; {advice}"
        )

    def metadata(self) -> dict[str, str]:
        out = super().metadata() | {
            "kind": self.kind,
            "account": self.account,
            "model": self.model,
            "per_minute": str(self.per_minute),
            "requested": str(self.requested),
            "reservable": str(self.room),
        }
        if self.retry_after_s is not None:
            out["retry_after_s"] = f"{self.retry_after_s:.3f}"
        return out


class ReservationNotFound(LedgerError):
    reason = "RESERVATION_NOT_FOUND"

    def __init__(self, tenant_id: str, reservation_id: str) -> None:
        self.reservation_id = reservation_id
        super().__init__(f"no reservation {reservation_id!r} in tenant {tenant_id!r}")


class ReservationEnded(LedgerError):
    """The reservation already ended in a way the call cannot follow."""

    reason = "RESERVATION_ENDED"

    def __init__(self, reservation_id: str, state: str, detail: str) -> None:
        self.reservation_id = reservation_id
        self.state = state
        super().__init__(f"reservation {reservation_id!r} is already {state}: {detail}")

    def metadata(self) -> dict[str, str]:
        return {"state": self.state}


class IdempotencyKeyReused(LedgerError):
    """The same idempotency key came with a different request."""

    reason = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self, key: str, field: str, first: object, now: object) -> None:
        self.key = key
        self.field = field
        super().__init__(
            f"idempotency key {key!r} was first used with {field}={first!r}, "
            f"this request has {field}={now!r}; use a new key for a different request"
        )

    def metadata(self) -> dict[str, str]:
        return {"field": self.field}


class PriceMissing(LedgerError):
    """A hold must be priced (a level has a money quota) but the model has no price."""

    reason = "PRICE_MISSING"

    def __init__(self, model: str, account: str) -> None:
        self.model = model
        super().__init__(
            f"{account} has a money budget but model {model!r} has no price, so a hold "
            f"cannot be bounded in money; set one with SetPrices (`tokenledger price set`) "
            f"or import the default table (`tokenledger price import`)"
        )

    def metadata(self) -> dict[str, str]:
        return {"model": self.model}


class PriceRefused(LedgerError):
    """A price that cannot be set as asked: another currency than the tenant's, or a rise
    that would take effect while holds priced without it are live. Nothing was written."""

    reason = "PRICE_REFUSED"

    def __init__(self, detail: str, **facts: str) -> None:
        self.facts = facts
        super().__init__(detail)

    def metadata(self) -> dict[str, str]:
        return dict(self.facts)


class CheckpointRefused(LedgerError):
    """A checkpoint cannot be taken, or a verification cannot start from one: the tenant has
    no events, none since its last checkpoint, no checkpoint yet, or its checkpoints' chain
    is broken (a full verification says where). Nothing was written."""

    reason = "CHECKPOINT_REFUSED"


class StoreUnavailable(LedgerError):
    """The database cannot be reached; the call changed nothing and may be retried."""

    reason = "STORE_UNAVAILABLE"


class Conflict(StoreUnavailable):
    """The transaction lost a race with another writer (a serialization failure, a deadlock,
    a duplicate key). Nothing was written; the ledger retries the batch a few times, and a
    caller that still gets it may retry too."""
