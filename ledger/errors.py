"""Domain errors. The gRPC layer maps each class to one status code (services/errors.py)."""

from __future__ import annotations

from dataclasses import dataclass


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose."""

    reason = "LEDGER_ERROR"

    def metadata(self) -> dict[str, str]:
        """Machine-readable facts for ErrorInfo.metadata."""
        return {}


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


class BudgetExhausted(LedgerError):
    reason = "BUDGET_EXHAUSTED"

    def __init__(self, requested: int, level: RefusingLevel, reservable: int) -> None:
        self.requested = requested
        self.level = level
        self.reservable = reservable
        super().__init__(
            f"requested {requested} tokens but the {level.scope} {level.account} has "
            f"{level.available} available (limit {level.limit}, held {level.held}, "
            f"used {level.used}); reserve at most {reservable} tokens now, or wait for holds "
            f"to end or the period to reset"
        )

    def metadata(self) -> dict[str, str]:
        return {
            "requested": str(self.requested),
            "available": str(self.level.available),
            "limit": str(self.level.limit),
            "scope": self.level.scope,
            "reservable": str(self.reservable),
        }


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


class StoreUnavailable(LedgerError):
    """The database cannot be reached; the call changed nothing and may be retried."""

    reason = "STORE_UNAVAILABLE"
