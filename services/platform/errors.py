"""The one error boundary: every refusal either server ends a call with, as a value with no
gRPC in it, and the one table from each kind of refusal to its status code and google.rpc
details (ErrorInfo always; BadRequest, QuotaFailure, RetryInfo where the table says). The
interceptor that applies it is `interceptors.ErrorInterceptor`; everything else raises.

Refusals come from three places: the ledger's domain (`ledger/errors.py`), the servers' shared
stack (auth, guards, shutdown) and the context service; the last two are declared here, so
that the table names every kind a caller of either service can see (README "Errors").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ledger import errors

ERROR_DOMAIN = "tokenledger.dev"
STORE_RETRY_DELAY_S = 1
"""RetryInfo of STORE_UNAVAILABLE: a failover or a lost race is over in about that time."""
MESSAGE_CHARS_MAX = 256
RELAYED_MESSAGE_CHARS_MAX = 2 * MESSAGE_CHARS_MAX
"""What was asked, then another service's message (itself at most MESSAGE_CHARS_MAX)."""
METADATA_VALUE_CHARS_MAX = 512
VIOLATIONS_BYTES_MAX = 2_048
"""Error texts and lists are bounded: gRPC refuses trailers over 16 KiB (the message goes
percent-encoded, up to 12 bytes a character, and again in the base64 status details), and a
client would then get RESOURCE_EXHAUSTED with no details at all. Inputs may be echoed in
errors, so a long input must not make its own error unreadable."""


class Code(enum.Enum):
    """gRPC status codes by name: refusals name theirs without importing gRPC."""

    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class Detail(enum.Flag):
    """The google.rpc details a kind of refusal may carry besides its ErrorInfo."""

    NONE = 0
    BAD_REQUEST = enum.auto()
    """The field violations."""
    QUOTA_FAILURE = enum.auto()
    """The quota violations."""
    RETRY_INFO = enum.auto()
    """When to retry (left out when the refusal has no retry_after_s: retrying cannot help)."""
    RELAYED = enum.auto()
    """Another service's details, ErrorInfo included, as it sent them."""


# --- refusals of the servers and of the context service -------------------------------------


class CallRefused(Exception):
    """A call refused on purpose by a server of ours. What was asked, what is available and
    what to do go in the message; machine-readable facts in `metadata`, `violations` (field,
    description), `quota_violations` (subject, description) and `retry_after_s`. Each
    subclass is one kind with its stable ErrorInfo `reason`; TABLE gives its code and which
    details it carries."""

    reason: ClassVar[str]
    message_chars_max: ClassVar[int] = MESSAGE_CHARS_MAX
    """Where the message is clipped."""

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[tuple[str, str]] = (),
        quota_violations: Sequence[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.quota_violations = tuple(quota_violations)
        self.retry_after_s = retry_after_s


class Unauthenticated(CallRefused):
    """Who are you? No key, a bad one, a revoked one, an unregistered certificate."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(CallRefused):
    """Not you, not this: a role or a tenant the caller's key lacks."""

    reason = "PERMISSION_DENIED"


class TooManyCalls(CallRefused):
    """The caller already has as many calls in flight as one caller may."""

    reason = "TOO_MANY_CALLS"


class ServerDeadlineExceeded(CallRefused):
    """A call without a client deadline ran past the server's default one."""

    reason = "DEADLINE_EXCEEDED"


class InvalidRequest(CallRefused):
    """A request the server's own checks refuse (bytes that do not parse, the context
    service's fields); the ledger's domain validation is `ledger.errors.InvalidArgument`."""

    reason = "INVALID_ARGUMENT"


class ShuttingDown(CallRefused):
    """The server is draining before it stops; another instance can take the call."""

    reason = "SHUTTING_DOWN"


class InternalError(CallRefused):
    """Anything not refused on purpose: a bug, logged with its traceback, no internals told."""

    reason = "INTERNAL"


class UnknownModel(CallRefused):
    """The context service has no tokenizer for the model (and no `encoding` was named)."""

    reason = "UNKNOWN_MODEL"


class ContextOverWindow(CallRefused):
    """What the conversation cannot do without exceeds the model's context window."""

    reason = "CONTEXT_DOES_NOT_FIT"


class ContextOverGrant(CallRefused):
    """What the conversation cannot do without exceeds what the ledger granted."""

    reason = "CONTEXT_DOES_NOT_FIT"


class LedgerUnavailable(CallRefused):
    """The context service could not reach the ledger (or not within the call's deadline)."""

    reason = "LEDGER_UNAVAILABLE"
    message_chars_max = RELAYED_MESSAGE_CHARS_MAX  # what was asked, then what gRPC said


class TokenizerUnavailable(CallRefused):
    """A tokenizer's data is missing or corrupt: the service cannot count, and says so."""

    reason = "TOKENIZER_UNAVAILABLE"


class TokenizationFailed(CallRefused):
    """The tokenizer failed on the input."""

    reason = "TOKENIZATION_FAILED"


class MemoryFull(CallRefused):
    """A SetMemory would take a conversation over its bound of facts; nothing was written."""

    reason = "MEMORY_FULL"


class MemoryUnavailable(CallRefused):
    """The context service was started without a database for its memory."""

    reason = "MEMORY_UNAVAILABLE"


class Relayed(CallRefused):
    """Another service's refusal passed on (the ledger's, to a context service caller): its
    code and its details as they came, under a message that says what was being asked.
    `status` is the other service's google.rpc.Status, serialized, as it arrived."""

    reason = ""
    message_chars_max = RELAYED_MESSAGE_CHARS_MAX

    def __init__(self, code: Code, message: str, status: bytes) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A kind's status code (None: the relayed one) and the details it carries."""

    code: Code | None
    details: Detail = Detail.NONE


BAD_REQUEST, QUOTA_FAILURE, RETRY_INFO = Detail.BAD_REQUEST, Detail.QUOTA_FAILURE, Detail.RETRY_INFO

TABLE: dict[type[Exception], Row] = {
    # the ledger's domain (ledger/errors.py)
    errors.InvalidArgument: Row(Code.INVALID_ARGUMENT, BAD_REQUEST),
    errors.BudgetExhausted: Row(Code.RESOURCE_EXHAUSTED, QUOTA_FAILURE),
    errors.RateLimited: Row(Code.RESOURCE_EXHAUSTED, QUOTA_FAILURE | RETRY_INFO),
    errors.ReservationNotFound: Row(Code.NOT_FOUND),
    errors.ReservationEnded: Row(Code.FAILED_PRECONDITION),
    errors.CheckpointRefused: Row(Code.FAILED_PRECONDITION),
    errors.PriceMissing: Row(Code.FAILED_PRECONDITION),
    errors.PriceRefused: Row(Code.FAILED_PRECONDITION),
    errors.IdempotencyKeyReused: Row(Code.ALREADY_EXISTS),
    errors.StoreUnavailable: Row(Code.UNAVAILABLE, RETRY_INFO),
    errors.Conflict: Row(Code.UNAVAILABLE, RETRY_INFO),
    # the servers' shared stack (auth.py, guards.py, interceptors.py)
    Unauthenticated: Row(Code.UNAUTHENTICATED),
    PermissionDenied: Row(Code.PERMISSION_DENIED),
    TooManyCalls: Row(Code.RESOURCE_EXHAUSTED, RETRY_INFO),
    ServerDeadlineExceeded: Row(Code.DEADLINE_EXCEEDED),
    InvalidRequest: Row(Code.INVALID_ARGUMENT, BAD_REQUEST),
    ShuttingDown: Row(Code.UNAVAILABLE),
    InternalError: Row(Code.INTERNAL),
    # the context service's
    UnknownModel: Row(Code.INVALID_ARGUMENT, BAD_REQUEST),
    ContextOverWindow: Row(Code.FAILED_PRECONDITION),
    ContextOverGrant: Row(Code.RESOURCE_EXHAUSTED),
    LedgerUnavailable: Row(Code.UNAVAILABLE, RETRY_INFO),
    TokenizerUnavailable: Row(Code.FAILED_PRECONDITION),
    TokenizationFailed: Row(Code.INVALID_ARGUMENT),
    MemoryFull: Row(Code.FAILED_PRECONDITION),
    MemoryUnavailable: Row(Code.FAILED_PRECONDITION),
    Relayed: Row(None, Detail.RELAYED),
}
"""Exactly one row per class: a subclass does not inherit its parent's (tests hold every
refusal class of ledger/errors.py and of this module to a row, and every row to the README)."""


# --- from a refusal to its status ----------------------------------------------------------------


def clip(text: str, chars_max: int = MESSAGE_CHARS_MAX) -> str:
    return text if len(text) <= chars_max else text[: chars_max - 1] + "…"


@dataclass(frozen=True)
class Facts:
    """What any refusal says, read off a ledger error or a CallRefused alike."""

    reason: str
    message: str
    metadata: Mapping[str, str]
    violations: Sequence[tuple[str, str]] = ()
    quota_violations: Sequence[tuple[str, str]] = ()
    retry_after_s: float | None = None
    message_chars_max: int = MESSAGE_CHARS_MAX


def facts(exc: errors.LedgerError | CallRefused) -> Facts:
    """The ledger's errors keep their facts in their own fields; ours carry them as they are."""
    if isinstance(exc, CallRefused):
        return Facts(exc.reason, exc.message, exc.metadata, exc.violations,
                     exc.quota_violations, exc.retry_after_s, exc.message_chars_max)  # fmt: skip
    violations: list[tuple[str, str]] = []
    quota: list[tuple[str, str]] = []
    retry: float | None = None
    if isinstance(exc, errors.InvalidArgument):
        violations = [(v.field, v.description) for v in exc.violations]
    elif isinstance(exc, errors.BudgetExhausted):
        quota = [(f"{exc.level.scope}:{exc.level.account}", str(exc))]
    elif isinstance(exc, errors.RateLimited):
        quota = [(f"rate:{exc.account}:{exc.model or '*'}:{exc.kind}", str(exc))]
        retry = exc.retry_after_s
    elif isinstance(exc, errors.StoreUnavailable):
        retry = STORE_RETRY_DELAY_S
    return Facts(exc.reason, str(exc), exc.metadata(), violations, quota, retry)


def pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def error_info(reason: str, metadata: Mapping[str, str]) -> any_pb2.Any:
    """ErrorInfo of our domain, packed, its metadata values clipped (they may echo input)."""
    clipped = {k: clip(v, METADATA_VALUE_CHARS_MAX) for k, v in metadata.items()}
    return pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=clipped))


def bad_request(violations: Sequence[tuple[str, str]]) -> error_details_pb2.BadRequest:
    """BadRequest with as many violations (each clipped) as fit VIOLATIONS_BYTES_MAX, then a
    count of the rest."""
    listed: list[error_details_pb2.BadRequest.FieldViolation] = []
    size = 0
    for f, d in violations:
        field, description = clip(f, 128), clip(d, 256)
        size += len(field.encode()) + len(description.encode())
        if size > VIOLATIONS_BYTES_MAX:
            break
        listed.append(
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        )
    if len(listed) < len(violations):
        more = f"{len(violations) - len(listed)} more"
        listed.append(error_details_pb2.BadRequest.FieldViolation(field="…", description=more))
    return error_details_pb2.BadRequest(field_violations=listed)


def quota_failure(violations: Sequence[tuple[str, str]]) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
            for subject, description in violations
        ]
    )


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def refusal(exc: BaseException) -> errors.LedgerError | CallRefused | None:
    """`exc` if the table has its row, else None: an error no one meant (a bug)."""
    if isinstance(exc, errors.LedgerError | CallRefused) and type(exc) in TABLE:
        return exc
    return None


def to_status(exc: errors.LedgerError | CallRefused) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and google.rpc.Status (with details) of a refusal in TABLE."""
    row = TABLE[type(exc)]
    if isinstance(exc, Relayed):
        code = exc.code
        status = status_pb2.Status.FromString(exc.status)
        message = clip(exc.message, exc.message_chars_max)
        details: Sequence[Any] = status.details
    else:
        assert row.code is not None
        code, said = row.code, facts(exc)
        message = clip(said.message, said.message_chars_max)
        details = [error_info(said.reason, said.metadata)]
        if row.details & BAD_REQUEST and said.violations:
            details.append(pack(bad_request(said.violations)))
        if row.details & QUOTA_FAILURE and said.quota_violations:
            details.append(pack(quota_failure(said.quota_violations)))
        if row.details & RETRY_INFO and said.retry_after_s is not None:
            details.append(pack(retry_info(said.retry_after_s)))
    grpc_code = grpc.StatusCode[code.value]
    return grpc_code, status_pb2.Status(
        code=getattr(code_pb2, code.value), message=message, details=details
    )


def abort_arguments(
    exc: errors.LedgerError | CallRefused,
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]]:
    """What `context.abort` takes for a refusal: code, message, and the trailing metadata
    that carries the status details."""
    code, status = to_status(exc)
    return code, status.message, rpc_status.to_status(status).trailing_metadata
