"""LedgerClient (blocking) and AsyncLedgerClient (asyncio): one typed method per RPC of
LedgerService, and `hold(...)`, the reserve → call → commit or rollback dance as a context
manager.

    from services.client import LedgerClient

    with LedgerClient("127.0.0.1:50051", api_key=KEY) as ledger:
        with ledger.hold(tenant_id="acme", user_id="alice", model="gpt-4o", amount=1500) as h:
            reply = call_the_model(max_tokens=h.granted - prompt_tokens)
            h.report(input_tokens=900, output_tokens=350)
        # committed on exit; rolled back if the block raised

Each method takes the request's fields as keyword arguments (`reserve(tenant_id=…,
amount=…)`), gives a write a fresh idempotency key unless one is passed, sends the call with
a deadline (`timeout_s`, else the client's default) and the API key, and returns the
response message; a refusal raises the typed exception of its ErrorInfo reason
(services.client.errors). gRPC retries UNAVAILABLE and DEADLINE_EXCEEDED itself, by the
service config (services.client.channel).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar, Unpack

import grpc

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.client import requests as rq
from services.client.channel import (
    MAX_ATTEMPTS_DEFAULT,
    STREAM_TIMEOUT_S_DEFAULT,
    TIMEOUT_S_DEFAULT,
    Settings,
)
from services.client.errors import from_rpc_error
from services.client.hold import AsyncHold, Hold

Reply = TypeVar("Reply")
H = TypeVar("H", Hold, AsyncHold)


class _Base(Generic[H]):
    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        client_certificate: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout_s: float = TIMEOUT_S_DEFAULT,
        stream_timeout_s: float = STREAM_TIMEOUT_S_DEFAULT,
        max_attempts: int = MAX_ATTEMPTS_DEFAULT,
        caller: str = "",
    ) -> None:
        """`target`: host:port or a gRPC URI. `api_key`: the `tlk_…` key the ledger issued
        (None when it runs without auth). `tls`: TLS with the system's roots;
        `root_certificates` (a PEM file) verifies a private CA, `client_certificate` and
        `client_key` (PEM files) add mTLS. `timeout_s`: the deadline of a unary call that
        names none; `stream_timeout_s` that of a stream. `max_attempts` (1-5): gRPC's tries
        of a call safe to repeat. `caller`: the `x-caller` name the ledger's per-caller cap
        counts, when it runs without auth."""
        self.settings = Settings(
            target,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            timeout_s=timeout_s,
            stream_timeout_s=stream_timeout_s,
            max_attempts=max_attempts,
            caller=caller,
        )
        self.target = target
        self._metadata = self.settings.metadata()
        self._open()

    def hold(
        self,
        *,
        tenant_id: str,
        user_id: str,
        model: str,
        amount: int,
        conversation_id: str = "",
        min_amount: int = 0,
        ttl_seconds: int = 0,
        labels: dict[str, str] | None = None,
        idempotency_key: str = "",
        timeout_s: float | None = None,
    ) -> H:
        """A reservation as a context manager (`with`, or `async with` on the asyncio client):
        reserved on enter (with one idempotency key, kept for every retry), committed on exit
        with the usage the block `report`ed, rolled back if the block raised or reported
        nothing."""
        fields: rq.ReserveFields = {
            "idempotency_key": idempotency_key or rq.new_idempotency_key(),
            "tenant_id": tenant_id, "user_id": user_id, "conversation_id": conversation_id,
            "model": model, "amount": amount, "min_amount": min_amount,
            "ttl_seconds": ttl_seconds, "labels": labels or {},
        }  # fmt: skip
        return self._new_hold(fields, timeout_s)

    def _open(self) -> None:
        raise NotImplementedError

    def _new_hold(self, fields: rq.ReserveFields, timeout_s: float | None) -> H:
        raise NotImplementedError


class LedgerClient(_Base[Hold]):
    """A blocking client of LedgerService; thread-safe, one channel for all calls."""

    channel: grpc.Channel

    def _open(self) -> None:
        self.channel = self.settings.channel()
        self._stub = pb_grpc.LedgerServiceStub(self.channel)

    def _new_hold(self, fields: rq.ReserveFields, timeout_s: float | None) -> Hold:
        return Hold(self, fields, timeout_s)

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(
        self,
        rpc: grpc.UnaryUnaryMultiCallable[Any, Reply],
        request: Any,
        timeout_s: float | None,
    ) -> Reply:
        timeout = self.settings.timeout(timeout_s)
        try:
            return rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from None

    def _stream(
        self, rpc: Callable[..., Iterator[Reply]], request: Any, timeout_s: float | None
    ) -> Iterator[Reply]:
        timeout = self.settings.timeout(timeout_s, stream=True)
        try:
            yield from rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from None

    # --- one method per RPC -------------------------------------------------------------------

    def reserve(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReserveFields]
    ) -> pb.ReserveResponse:
        return self._unary(self._stub.Reserve, rq.build(pb.ReserveRequest, fields), timeout_s)

    def commit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.CommitFields]
    ) -> pb.CommitResponse:
        return self._unary(self._stub.Commit, rq.build(pb.CommitRequest, fields), timeout_s)

    def rollback(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RollbackFields]
    ) -> pb.RollbackResponse:
        return self._unary(self._stub.Rollback, rq.build(pb.RollbackRequest, fields), timeout_s)

    def reserve_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReserveBatchFields]
    ) -> pb.ReserveBatchResponse:
        """Each item's `refused` decodes with services.client.errors.from_serialized_status."""
        request = rq.build(pb.ReserveBatchRequest, fields)
        return self._unary(self._stub.ReserveBatch, request, timeout_s)

    def commit_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.CommitBatchFields]
    ) -> pb.CommitBatchResponse:
        request = rq.build(pb.CommitBatchRequest, fields)
        return self._unary(self._stub.CommitBatch, request, timeout_s)

    def rollback_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RollbackBatchFields]
    ) -> pb.RollbackBatchResponse:
        request = rq.build(pb.RollbackBatchRequest, fields)
        return self._unary(self._stub.RollbackBatch, request, timeout_s)

    def get_reservation(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetReservationFields]
    ) -> pb.GetReservationResponse:
        request = rq.build(pb.GetReservationRequest, fields)
        return self._unary(self._stub.GetReservation, request, timeout_s)

    def get_balance(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetBalanceFields]
    ) -> pb.GetBalanceResponse:
        request = rq.build(pb.GetBalanceRequest, fields)
        return self._unary(self._stub.GetBalance, request, timeout_s)

    def set_quota(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetQuotaFields]
    ) -> pb.SetQuotaResponse:
        return self._unary(self._stub.SetQuota, rq.build(pb.SetQuotaRequest, fields), timeout_s)

    def set_rate_limit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetRateLimitFields]
    ) -> pb.SetRateLimitResponse:
        request = rq.build(pb.SetRateLimitRequest, fields)
        return self._unary(self._stub.SetRateLimit, request, timeout_s)

    def set_budget_alerts(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetBudgetAlertsFields]
    ) -> pb.SetBudgetAlertsResponse:
        request = rq.build(pb.SetBudgetAlertsRequest, fields)
        return self._unary(self._stub.SetBudgetAlerts, request, timeout_s)

    def grant_tokens(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GrantTokensFields]
    ) -> pb.GrantTokensResponse:
        request = rq.build(pb.GrantTokensRequest, fields)
        return self._unary(self._stub.GrantTokens, request, timeout_s)

    def adjust_balance(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.AdjustBalanceFields]
    ) -> pb.AdjustBalanceResponse:
        request = rq.build(pb.AdjustBalanceRequest, fields)
        return self._unary(self._stub.AdjustBalance, request, timeout_s)

    def record_usage(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RecordUsageFields]
    ) -> pb.RecordUsageResponse:
        request = rq.build(pb.RecordUsageRequest, fields)
        return self._unary(self._stub.RecordUsage, request, timeout_s)

    def set_prices(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetPricesFields]
    ) -> pb.SetPricesResponse:
        request = rq.build(pb.SetPricesRequest, fields)
        return self._unary(self._stub.SetPrices, request, timeout_s)

    def list_prices(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ListPricesFields]
    ) -> pb.ListPricesResponse:
        request = rq.build(pb.ListPricesRequest, fields)
        return self._unary(self._stub.ListPrices, request, timeout_s)

    def get_output_stats(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetOutputStatsFields]
    ) -> pb.GetOutputStatsResponse:
        request = rq.build(pb.GetOutputStatsRequest, fields)
        return self._unary(self._stub.GetOutputStats, request, timeout_s)

    def verify_audit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.VerifyAuditFields]
    ) -> pb.VerifyAuditResponse:
        request = rq.build(pb.VerifyAuditRequest, fields)
        return self._unary(self._stub.VerifyAudit, request, timeout_s)

    def query_usage(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.QueryUsageFields]
    ) -> pb.QueryUsageResponse:
        request = rq.build(pb.QueryUsageRequest, fields)
        return self._unary(self._stub.QueryUsage, request, timeout_s)

    def replay_history(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReplayHistoryFields]
    ) -> Iterator[pb.ReplayHistoryResponse]:
        request = rq.build(pb.ReplayHistoryRequest, fields)
        return self._stream(self._stub.ReplayHistory, request, timeout_s)

    def export_usage(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ExportUsageFields]
    ) -> Iterator[pb.ExportUsageResponse]:
        request = rq.build(pb.ExportUsageRequest, fields)
        return self._stream(self._stub.ExportUsage, request, timeout_s)

    def subscribe_events(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SubscribeEventsFields]
    ) -> Iterator[pb.SubscribeEventsResponse]:
        """Ends at `timeout_s` (else the stream default) with DeadlineExceeded: resume from
        the last cursor."""
        request = rq.build(pb.SubscribeEventsRequest, fields)
        return self._stream(self._stub.SubscribeEvents, request, timeout_s)


class AsyncLedgerClient(_Base[AsyncHold]):
    """An asyncio client of LedgerService; create and use it on one event loop."""

    channel: grpc.aio.Channel

    def _open(self) -> None:
        self.channel = self.settings.aio_channel()
        self._stub = pb_grpc.LedgerServiceStub(self.channel)

    def _new_hold(self, fields: rq.ReserveFields, timeout_s: float | None) -> AsyncHold:
        return AsyncHold(self, fields, timeout_s)

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[Any, Reply],
        request: Any,
        timeout_s: float | None,
    ) -> Reply:
        timeout = self.settings.timeout(timeout_s)
        try:
            return await rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from None

    async def _stream(
        self, rpc: Callable[..., Any], request: Any, timeout_s: float | None
    ) -> AsyncIterator[Any]:
        timeout = self.settings.timeout(timeout_s, stream=True)
        try:
            async for reply in rpc(request, timeout=timeout, metadata=self._metadata):
                yield reply
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from None

    # --- one method per RPC -------------------------------------------------------------------

    async def reserve(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReserveFields]
    ) -> pb.ReserveResponse:
        request = rq.build(pb.ReserveRequest, fields)
        return await self._unary(self._stub.Reserve, request, timeout_s)

    async def commit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.CommitFields]
    ) -> pb.CommitResponse:
        request = rq.build(pb.CommitRequest, fields)
        return await self._unary(self._stub.Commit, request, timeout_s)

    async def rollback(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RollbackFields]
    ) -> pb.RollbackResponse:
        request = rq.build(pb.RollbackRequest, fields)
        return await self._unary(self._stub.Rollback, request, timeout_s)

    async def reserve_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReserveBatchFields]
    ) -> pb.ReserveBatchResponse:
        request = rq.build(pb.ReserveBatchRequest, fields)
        return await self._unary(self._stub.ReserveBatch, request, timeout_s)

    async def commit_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.CommitBatchFields]
    ) -> pb.CommitBatchResponse:
        request = rq.build(pb.CommitBatchRequest, fields)
        return await self._unary(self._stub.CommitBatch, request, timeout_s)

    async def rollback_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RollbackBatchFields]
    ) -> pb.RollbackBatchResponse:
        request = rq.build(pb.RollbackBatchRequest, fields)
        return await self._unary(self._stub.RollbackBatch, request, timeout_s)

    async def get_reservation(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetReservationFields]
    ) -> pb.GetReservationResponse:
        request = rq.build(pb.GetReservationRequest, fields)
        return await self._unary(self._stub.GetReservation, request, timeout_s)

    async def get_balance(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetBalanceFields]
    ) -> pb.GetBalanceResponse:
        request = rq.build(pb.GetBalanceRequest, fields)
        return await self._unary(self._stub.GetBalance, request, timeout_s)

    async def set_quota(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetQuotaFields]
    ) -> pb.SetQuotaResponse:
        request = rq.build(pb.SetQuotaRequest, fields)
        return await self._unary(self._stub.SetQuota, request, timeout_s)

    async def set_rate_limit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetRateLimitFields]
    ) -> pb.SetRateLimitResponse:
        request = rq.build(pb.SetRateLimitRequest, fields)
        return await self._unary(self._stub.SetRateLimit, request, timeout_s)

    async def set_budget_alerts(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetBudgetAlertsFields]
    ) -> pb.SetBudgetAlertsResponse:
        request = rq.build(pb.SetBudgetAlertsRequest, fields)
        return await self._unary(self._stub.SetBudgetAlerts, request, timeout_s)

    async def grant_tokens(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GrantTokensFields]
    ) -> pb.GrantTokensResponse:
        request = rq.build(pb.GrantTokensRequest, fields)
        return await self._unary(self._stub.GrantTokens, request, timeout_s)

    async def adjust_balance(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.AdjustBalanceFields]
    ) -> pb.AdjustBalanceResponse:
        request = rq.build(pb.AdjustBalanceRequest, fields)
        return await self._unary(self._stub.AdjustBalance, request, timeout_s)

    async def record_usage(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RecordUsageFields]
    ) -> pb.RecordUsageResponse:
        request = rq.build(pb.RecordUsageRequest, fields)
        return await self._unary(self._stub.RecordUsage, request, timeout_s)

    async def set_prices(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetPricesFields]
    ) -> pb.SetPricesResponse:
        request = rq.build(pb.SetPricesRequest, fields)
        return await self._unary(self._stub.SetPrices, request, timeout_s)

    async def list_prices(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ListPricesFields]
    ) -> pb.ListPricesResponse:
        request = rq.build(pb.ListPricesRequest, fields)
        return await self._unary(self._stub.ListPrices, request, timeout_s)

    async def get_output_stats(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetOutputStatsFields]
    ) -> pb.GetOutputStatsResponse:
        request = rq.build(pb.GetOutputStatsRequest, fields)
        return await self._unary(self._stub.GetOutputStats, request, timeout_s)

    async def verify_audit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.VerifyAuditFields]
    ) -> pb.VerifyAuditResponse:
        request = rq.build(pb.VerifyAuditRequest, fields)
        return await self._unary(self._stub.VerifyAudit, request, timeout_s)

    async def query_usage(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.QueryUsageFields]
    ) -> pb.QueryUsageResponse:
        request = rq.build(pb.QueryUsageRequest, fields)
        return await self._unary(self._stub.QueryUsage, request, timeout_s)

    def replay_history(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReplayHistoryFields]
    ) -> AsyncIterator[pb.ReplayHistoryResponse]:
        request = rq.build(pb.ReplayHistoryRequest, fields)
        return self._stream(self._stub.ReplayHistory, request, timeout_s)

    def export_usage(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ExportUsageFields]
    ) -> AsyncIterator[pb.ExportUsageResponse]:
        request = rq.build(pb.ExportUsageRequest, fields)
        return self._stream(self._stub.ExportUsage, request, timeout_s)

    def subscribe_events(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SubscribeEventsFields]
    ) -> AsyncIterator[pb.SubscribeEventsResponse]:
        request = rq.build(pb.SubscribeEventsRequest, fields)
        return self._stream(self._stub.SubscribeEvents, request, timeout_s)
