"""The fields of every LedgerService request, as typed keyword arguments (one TypedDict per
RPC, shared by the blocking and the asyncio client), and how a request is built from them:
a write that takes an idempotency key gets a fresh one when the caller gives none, and keeps
it for every retry gRPC makes (the request is serialized once)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services._gen.tokenledger.v1 import ledger_pb2 as pb

KEY_PREFIX = "tlc-"
Request = TypeVar("Request", bound=Message)


def new_idempotency_key() -> str:
    """A fresh key: 128 random bits, within the ledger's key alphabet and length."""
    return KEY_PREFIX + uuid.uuid4().hex


def build(cls: type[Request], fields: Mapping[str, Any]) -> Request:
    """`cls(**fields)`, with a new idempotency key when the message has one and none is
    given (and new keys for the items of a batch of Reserves). A field the message does not
    have is a TypeError naming it."""
    values = dict(fields)
    if "idempotency_key" in cls.DESCRIPTOR.fields_by_name and not values.get("idempotency_key"):
        values["idempotency_key"] = new_idempotency_key()
    if cls is pb.ReserveBatchRequest and "items" in values:
        values["items"] = [_keyed(item) for item in values["items"]]
    unknown = sorted(set(values) - set(cls.DESCRIPTOR.fields_by_name))
    if unknown:
        raise TypeError(f"{cls.DESCRIPTOR.name} has no field {', '.join(unknown)}")
    return cls(**values)


def _keyed(item: pb.ReserveRequest) -> pb.ReserveRequest:
    if item.idempotency_key:
        return item
    copy = pb.ReserveRequest()
    copy.CopyFrom(item)
    copy.idempotency_key = new_idempotency_key()
    return copy


class ReserveFields(TypedDict, total=False):
    """ReserveRequest's fields."""

    idempotency_key: str
    tenant_id: str
    user_id: str
    conversation_id: str
    model: str
    amount: int
    ttl_seconds: int
    labels: Mapping[str, str]
    min_amount: int
    prompt_tokens: int


class CommitFields(TypedDict, total=False):
    """CommitRequest's fields."""

    tenant_id: str
    reservation_id: str
    usage: pb.Usage


class RollbackFields(TypedDict, total=False):
    """RollbackRequest's fields."""

    tenant_id: str
    reservation_id: str
    reason: str


class ReserveBatchFields(TypedDict, total=False):
    """ReserveBatchRequest's fields."""

    tenant_id: str
    items: Sequence[pb.ReserveRequest]


class CommitBatchFields(TypedDict, total=False):
    """CommitBatchRequest's fields."""

    tenant_id: str
    items: Sequence[pb.CommitRequest]


class RollbackBatchFields(TypedDict, total=False):
    """RollbackBatchRequest's fields."""

    tenant_id: str
    items: Sequence[pb.RollbackRequest]


class GetReservationFields(TypedDict, total=False):
    """GetReservationRequest's fields."""

    tenant_id: str
    reservation_id: str


class GetBalanceFields(TypedDict, total=False):
    """GetBalanceRequest's fields."""

    tenant_id: str
    user_id: str
    conversation_id: str
    as_of: Timestamp


class SetQuotaFields(TypedDict, total=False):
    """SetQuotaRequest's fields."""

    idempotency_key: str
    tenant_id: str
    user_id: str
    conversation_id: str
    limit: int
    period: pb.Period.ValueType
    window_hours: int
    time_zone: str
    soft_limit_percent: int
    grant_order: pb.GrantOrder.ValueType
    money_limit_micros: int


class SetRateLimitFields(TypedDict, total=False):
    """SetRateLimitRequest's fields."""

    idempotency_key: str
    tenant_id: str
    user_id: str
    conversation_id: str
    model: str
    tokens_per_minute: int
    requests_per_minute: int


class SetBudgetAlertsFields(TypedDict, total=False):
    """SetBudgetAlertsRequest's fields."""

    idempotency_key: str
    tenant_id: str
    user_id: str
    conversation_id: str
    thresholds_percent: Sequence[int]


class GrantTokensFields(TypedDict, total=False):
    """GrantTokensRequest's fields."""

    idempotency_key: str
    tenant_id: str
    user_id: str
    conversation_id: str
    amount: int
    expires_at: Timestamp
    reason: str
    money_micros: int


class AdjustBalanceFields(TypedDict, total=False):
    """AdjustBalanceRequest's fields."""

    idempotency_key: str
    tenant_id: str
    user_id: str
    conversation_id: str
    tokens: int
    reason: str
    money_micros: int


class RecordUsageFields(TypedDict, total=False):
    """RecordUsageRequest's fields."""

    idempotency_key: str
    tenant_id: str
    user_id: str
    conversation_id: str
    model: str
    usage: pb.Usage


class SetPricesFields(TypedDict, total=False):
    """SetPricesRequest's fields."""

    idempotency_key: str
    tenant_id: str
    prices: Sequence[pb.Price]


class ListPricesFields(TypedDict, total=False):
    """ListPricesRequest's fields."""

    tenant_id: str
    model: str


class GetOutputStatsFields(TypedDict, total=False):
    """GetOutputStatsRequest's fields."""

    tenant_id: str
    user_id: str
    model: str
    window_hours: int
    min_samples: int


class ReplayHistoryFields(TypedDict, total=False):
    """ReplayHistoryRequest's fields."""

    tenant_id: str
    user_id: str
    conversation_id: str
    from_position: int
    from_time: Timestamp
    max_events: int


class VerifyAuditFields(TypedDict, total=False):
    """VerifyAuditRequest's fields."""

    tenant_id: str
    user_id: str


class QueryUsageFields(TypedDict, total=False):
    """QueryUsageRequest's fields."""

    query: pb.UsageQuery
    page_size: int
    page_token: str


class ExportUsageFields(TypedDict, total=False):
    """ExportUsageRequest's fields."""

    query: pb.UsageQuery


class SubscribeEventsFields(TypedDict, total=False):
    """SubscribeEventsRequest's fields."""

    tenant_id: str
    after_cursor: str
    from_position: int
