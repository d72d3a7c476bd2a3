"""Typed exceptions from the ledger's google.rpc details.

Every refusal of the ledger carries an `ErrorInfo` (domain "tokenledger.dev") with a stable
reason and machine-readable metadata (README "Errors"). `from_rpc_error` reads the status
details from the call's trailers and raises the class of that reason, its figures parsed:
`BudgetExhausted.requested`, `.available`, `.reservable`, `.resets_at`, `.suggestion`;
`RateLimited.retry_after`; and so on. Misuse of the client itself (a hold committed twice, a
bad target) raises `ClientError` subclasses, which never reach the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "tokenledger.dev"
DETAILS_KEY = "grpc-status-details-bin"


class ClientError(Exception):
    """The client was used wrongly; nothing was sent."""


class BadTarget(ClientError, ValueError):
    """The target is not an address gRPC can dial."""


class BadCredentials(ClientError, ValueError):
    """An API key or TLS file that cannot be right (empty, malformed, unreadable)."""


class HoldError(ClientError):
    """A hold used out of order: reported or ended after it ended, ended twice."""


@dataclass(frozen=True)
class Suggestion:
    """What a refusal advises instead (ErrorInfo metadata of BUDGET_EXHAUSTED, RATE_LIMITED)."""

    max_amount_now: int | None
    cheaper_model: str
    compact_context: bool
    resets_at: datetime | None


class LedgerError(Exception):
    """The ledger (or gRPC on its way there) refused a call. `code` is the gRPC status code,
    `reason` the ErrorInfo reason ("" when the call never reached our server: gRPC's own
    UNAVAILABLE or DEADLINE_EXCEEDED), `metadata` the ErrorInfo metadata, `status` the whole
    google.rpc.Status with every detail as sent."""

    reason_name: ClassVar[str] = ""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.status = status or status_pb2.Status(code=code.value[0], message=message)

    def details(self, cls: type[Any]) -> list[Any]:
        """The details of one google.rpc type (e.g. QuotaFailure), unpacked."""
        found = []
        for detail in self.status.details:
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                found.append(message)
        return found

    @property
    def retry_delay(self) -> timedelta | None:
        """RetryInfo's delay, when the refusal says when to retry."""
        infos = self.details(error_details_pb2.RetryInfo)
        return infos[0].retry_delay.ToTimedelta() if infos else None

    def _int(self, key: str) -> int | None:
        value = self.metadata.get(key, "")
        return int(value) if value.lstrip("-").isdigit() else None

    def _time(self, key: str) -> datetime | None:
        value = self.metadata.get(key, "")
        return datetime.fromisoformat(value) if value else None

    def _suggestion(self) -> Suggestion:
        return Suggestion(
            max_amount_now=self._int("reservable"),
            cheaper_model=self.metadata.get("cheaper_model", ""),
            compact_context=self.metadata.get("compact_context", "") == "true",
            resets_at=self._time("resets_at"),
        )


class InvalidArgument(LedgerError):
    """A field is missing, malformed or out of bounds; `field_violations` names each."""

    reason_name = "INVALID_ARGUMENT"

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        return [
            (v.field, v.description)
            for bad in self.details(error_details_pb2.BadRequest)
            for v in bad.field_violations
        ]


class BudgetExhausted(LedgerError):
    """The amount (or min_amount) does not fit a limit: what was asked, what is there, the
    most that fits now, when the period resets, and what to do instead."""

    reason_name = "BUDGET_EXHAUSTED"

    @property
    def requested(self) -> int | None:
        return self._int("requested")

    @property
    def available(self) -> int | None:
        return self._int("available")

    @property
    def limit(self) -> int | None:
        return self._int("limit")

    @property
    def reservable(self) -> int | None:
        """The largest amount a Reserve would get now."""
        return self._int("reservable")

    @property
    def resets_at(self) -> datetime | None:
        return self._time("resets_at")

    @property
    def scope(self) -> str:
        """The level that refused: "tenant", "user" or "conversation"."""
        return self.metadata.get("scope", "")

    @property
    def account(self) -> str:
        return self.metadata.get("account", "")

    @property
    def suggestion(self) -> Suggestion:
        return self._suggestion()


class RateLimited(LedgerError):
    """A tokens- or requests-per-minute limit refused the call; `retry_after` is when it fits
    (None: never, the request is larger than a minute's worth)."""

    reason_name = "RATE_LIMITED"

    @property
    def retry_after(self) -> timedelta | None:
        return self.retry_delay

    @property
    def kind(self) -> str:
        """ "tokens" or "requests"."""
        return self.metadata.get("kind", "")

    @property
    def per_minute(self) -> int | None:
        return self._int("per_minute")

    @property
    def reservable(self) -> int | None:
        return self._int("reservable")

    @property
    def suggestion(self) -> Suggestion:
        return self._suggestion()


class ReservationNotFound(LedgerError):
    reason_name = "RESERVATION_NOT_FOUND"


class ReservationEnded(LedgerError):
    """The reservation already ended in a way the call cannot follow; `state` says how."""

    reason_name = "RESERVATION_ENDED"

    @property
    def state(self) -> str:
        return self.metadata.get("state", "")


class IdempotencyKeyReused(LedgerError):
    """The key was first used with a different request; `field` is the first difference."""

    reason_name = "IDEMPOTENCY_KEY_REUSED"

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class Unauthenticated(LedgerError):
    reason_name = "UNAUTHENTICATED"


class PermissionDenied(LedgerError):
    reason_name = "PERMISSION_DENIED"


class TooManyCalls(LedgerError):
    reason_name = "TOO_MANY_CALLS"


class LedgerUnavailable(LedgerError):
    """The ledger could not be reached, or its database could not (STORE_UNAVAILABLE), or it
    is shutting down (SHUTTING_DOWN), after gRPC's retries. Retrying with the same
    idempotency key is safe."""


class DeadlineExceeded(LedgerError):
    """The call's deadline passed: the write has its whole effect or none; retry with the
    same idempotency key."""


class Internal(LedgerError):
    reason_name = "INTERNAL"


_BY_REASON: dict[str, type[LedgerError]] = {
    cls.reason_name: cls
    for cls in (
        InvalidArgument,
        BudgetExhausted,
        RateLimited,
        ReservationNotFound,
        ReservationEnded,
        IdempotencyKeyReused,
        Unauthenticated,
        PermissionDenied,
        TooManyCalls,
        Internal,
    )
}
_BY_CODE: dict[grpc.StatusCode, type[LedgerError]] = {
    grpc.StatusCode.UNAVAILABLE: LedgerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: ReservationNotFound,
    grpc.StatusCode.INTERNAL: Internal,
}


def _status(code: grpc.StatusCode, message: str, trailers: Any) -> status_pb2.Status:
    for key, value in trailers or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=code.value[0], message=message)


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                return info
    return None


def from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status) -> LedgerError:
    """The typed exception of a status: by its ErrorInfo reason, else by its code."""
    info = _error_info(status)
    reason = info.reason if info else ""
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, LedgerError)
    metadata = dict(info.metadata) if info else {}
    return cls(code, message, reason=reason, metadata=metadata, status=status)


def from_rpc_error(exc: grpc.RpcError, target: str = "") -> LedgerError:
    """The typed exception of a failed call (sync or asyncio). gRPC's own transport failures
    name the target, so that "nothing listens there" reads as such."""
    call: Any = exc
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    status = _status(code, message, call.trailing_metadata())
    if _error_info(status) is None and code is grpc.StatusCode.UNAVAILABLE and target:
        message = f"the ledger at {target} cannot be reached: {message}"
    return from_status(code, message, status)


def from_serialized_status(data: bytes) -> LedgerError:
    """The typed exception of a batch item's `refused` (a serialized google.rpc.Status)."""
    status = status_pb2.Status.FromString(data)
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return from_status(code, status.message, status)
