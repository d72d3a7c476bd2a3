"""The one table from domain errors to gRPC status codes, and the google.rpc details each
status carries (ErrorInfo always; QuotaFailure, BadRequest, RetryInfo where they apply)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ledger import errors

ERROR_DOMAIN = "tokenledger.dev"

# reason (ErrorInfo.reason) -> status code. Reasons are stable API; see README "Errors".
STATUS_BY_ERROR: dict[type[errors.LedgerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.BudgetExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ReservationNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ReservationEnded: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyKeyReused: grpc.StatusCode.ALREADY_EXISTS,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}

STORE_RETRY_DELAY_S = 1


def pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(seconds * 1e9))
    return pack(error_details_pb2.RetryInfo(retry_delay=delay))


MESSAGE_CHARS_MAX = 256
VIOLATIONS_BYTES_MAX = 2_048
"""Error texts and lists are bounded: gRPC refuses trailers over 16 KiB (the message goes
percent-encoded, up to 12 bytes a character, and again in the base64 status details), and a
client would then get RESOURCE_EXHAUSTED with no details at all. Inputs may be echoed in
errors, so a long input must not make its own error unreadable."""


def clip(text: str, chars_max: int = MESSAGE_CHARS_MAX) -> str:
    return text if len(text) <= chars_max else text[: chars_max - 1] + "…"


def error_info(reason: str, metadata: dict[str, str]) -> any_pb2.Any:
    """ErrorInfo of our domain, packed, its metadata values clipped (they may echo input)."""
    clipped = {k: clip(v, 512) for k, v in metadata.items()}
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


def to_status(exc: errors.LedgerError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and google.rpc.Status (with details) for a domain error."""
    code = STATUS_BY_ERROR[type(exc)]
    details = [error_info(exc.reason, exc.metadata())]
    if isinstance(exc, errors.InvalidArgument):
        details.append(pack(bad_request([(v.field, v.description) for v in exc.violations])))
    elif isinstance(exc, errors.BudgetExhausted):
        details.append(
            pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=f"{exc.level.scope}:{exc.level.account}",
                            description=str(exc),
                        )
                    ]
                )
            )
        )
    elif isinstance(exc, errors.RateLimited):
        details.append(
            pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=f"rate:{exc.account}:{exc.model or '*'}:{exc.kind}",
                            description=str(exc),
                        )
                    ]
                )
            )
        )
        if exc.retry_after_s is not None:
            details.append(_retry_info(exc.retry_after_s))
    elif isinstance(exc, errors.StoreUnavailable):
        details.append(_retry_info(STORE_RETRY_DELAY_S))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=clip(str(exc)), details=details
    )
    return code, status
