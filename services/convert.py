"""Between protobuf messages and ledger values. Parsing goes through ledger.validation, so a
malformed field is refused with the request's own field name."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from ledger import validation
from ledger.model import (
    Account,
    BalanceResult,
    Commit,
    CommitResult,
    Period,
    RecordUsage,
    Reservation,
    Reserve,
    ReserveResult,
    Rollback,
    RollbackResult,
    SetQuota,
    State,
    Usage,
)
from services._gen.tokenledger.v1 import ledger_pb2 as pb

_PERIOD_TO_PB = {
    Period.NONE: pb.PERIOD_NONE,
    Period.DAY: pb.PERIOD_DAY,
    Period.MONTH: pb.PERIOD_MONTH,
}
_PERIOD_FROM_PB = {v: k for k, v in _PERIOD_TO_PB.items()}
_STATE_TO_PB = {
    State.HELD: pb.RESERVATION_STATE_HELD,
    State.COMMITTED: pb.RESERVATION_STATE_COMMITTED,
    State.ROLLED_BACK: pb.RESERVATION_STATE_ROLLED_BACK,
    State.EXPIRED: pb.RESERVATION_STATE_EXPIRED,
}


# --- requests --------------------------------------------------------------------------------


def _usage(msg: pb.Usage) -> Usage:
    return Usage(msg.input_tokens, msg.output_tokens, msg.cached_input_tokens)


def reserve(req: pb.ReserveRequest) -> Reserve:
    return validation.reserve(
        idempotency_key=req.idempotency_key,
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        conversation_id=req.conversation_id,
        model=req.model,
        amount=req.amount,
        ttl_seconds=req.ttl_seconds,
        labels=dict(req.labels),
    )


def commit(req: pb.CommitRequest) -> Commit:
    return validation.commit(
        tenant_id=req.tenant_id,
        reservation_id=req.reservation_id,
        usage=_usage(req.usage) if req.HasField("usage") else None,
    )


def rollback(req: pb.RollbackRequest) -> Rollback:
    return validation.rollback(
        tenant_id=req.tenant_id, reservation_id=req.reservation_id, reason=req.reason
    )


def set_quota(req: pb.SetQuotaRequest) -> SetQuota:
    return validation.set_quota(
        idempotency_key=req.idempotency_key,
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        conversation_id=req.conversation_id,
        limit=req.limit if req.HasField("limit") else None,
        period=_PERIOD_FROM_PB.get(req.period),
    )


def record_usage(req: pb.RecordUsageRequest) -> RecordUsage:
    return validation.record_usage(
        idempotency_key=req.idempotency_key,
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        conversation_id=req.conversation_id,
        model=req.model,
        usage=_usage(req.usage) if req.HasField("usage") else None,
    )


# --- responses -------------------------------------------------------------------------------


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def balance(acc: Account) -> pb.Balance:
    msg = pb.Balance(
        tenant_id=acc.key.tenant_id,
        user_id=acc.key.user_id,
        conversation_id=acc.key.conversation_id,
        period=_PERIOD_TO_PB[acc.period],
        held=acc.held,
        used=acc.used,
        limit=acc.limit,
        available=acc.available,
    )
    bounds = acc.period_bounds()
    if bounds is not None:
        msg.period_start.CopyFrom(_timestamp(bounds[0]))
        msg.resets_at.CopyFrom(_timestamp(bounds[1]))
    return msg


def reservation(res: Reservation) -> pb.Reservation:
    msg = pb.Reservation(
        reservation_id=res.reservation_id,
        tenant_id=res.key.tenant_id,
        user_id=res.key.user_id,
        conversation_id=res.key.conversation_id,
        model=res.model,
        amount=res.amount,
        state=_STATE_TO_PB[res.state],
        created_at=_timestamp(res.created_at),
        expires_at=_timestamp(res.expires_at),
        labels=dict(res.labels),
    )
    if res.usage is not None:
        msg.usage.CopyFrom(
            pb.Usage(
                input_tokens=res.usage.input_tokens,
                output_tokens=res.usage.output_tokens,
                cached_input_tokens=res.usage.cached_input_tokens,
            )
        )
    return msg


def reserve_response(result: ReserveResult) -> pb.ReserveResponse:
    return pb.ReserveResponse(
        reservation=reservation(result.reservation), balance=balance(result.balance)
    )


def commit_response(result: CommitResult) -> pb.CommitResponse:
    return pb.CommitResponse(
        reservation=reservation(result.reservation),
        committed=result.committed,
        released=result.released,
        overage=result.overage,
        late=result.late,
        balance=balance(result.balance),
    )


def rollback_response(result: RollbackResult) -> pb.RollbackResponse:
    return pb.RollbackResponse(
        reservation=reservation(result.reservation),
        released=result.released,
        balance=balance(result.balance),
    )


def balance_response(result: BalanceResult) -> pb.GetBalanceResponse:
    return pb.GetBalanceResponse(
        balance=balance(result.balance),
        ancestors=[balance(a) for a in result.ancestors],
        reservable=result.reservable,
    )
