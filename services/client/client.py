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
from typing import Any, TypeVar, Unpack

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


class _Base:
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

    def _open(self) -> None:
        raise NotImplementedError


class LedgerClient(_Base):
    """A blocking client of LedgerService; thread-safe, one channel for all calls."""

    channel: grpc.Channel

    def _open(self) -> None:
        self.channel = self.settings.channel()
        self._stub = pb_grpc.LedgerServiceStub(self.channel)

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, rpc: Callable[..., Reply], request: Any, timeout_s: float | None) -> Reply:
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
    ) -> Hold:
        """A reservation as a context manager: reserved on enter (with one idempotency key,
        kept for every retry), committed on exit with the usage the block `report`ed, rolled
        back if the block raised or reported nothing."""
        fields: rq.ReserveFields = {
            "idempotency_key": idempotency_key or rq.new_idempotency_key(),
            "tenant_id": tenant_id, "user_id": user_id, "conversation_id": conversation_id,
            "model": model, "amount": amount, "min_amount": min_amount,
            "ttl_seconds": ttl_seconds, "labels": labels or {},
        }  # fmt: skip
        return Hold(self, fields, timeout_s)

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


class AsyncLedgerClient(_Base):
    """An asyncio client of LedgerService; create and use it on one event loop."""

    channel: grpc.aio.Channel

    def _open(self) -> None:
        self.channel = self.settings.aio_channel()
        self._stub = pb_grpc.LedgerServiceStub(self.channel)

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, rpc: Callable[..., Any], request: Any, timeout_s: float | None) -> Any:
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
    ) -> AsyncHold:
        """As LedgerClient.hold, with `async with`."""
        fields: rq.ReserveFields = {
            "idempotency_key": idempotency_key or rq.new_idempotency_key(),
            "tenant_id": tenant_id, "user_id": user_id, "conversation_id": conversation_id,
            "model": model, "amount": amount, "min_amount": min_amount,
            "ttl_seconds": ttl_seconds, "labels": labels or {},
        }  # fmt: skip
        return AsyncHold(self, fields, timeout_s)

    # --- one method per RPC -------------------------------------------------------------------

    async def reserve(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReserveFields]
    ) -> pb.ReserveResponse:
        request = rq.build(pb.ReserveRequest, fields)
        reply: pb.ReserveResponse = await self._unary(self._stub.Reserve, request, timeout_s)
        return reply

    async def commit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.CommitFields]
    ) -> pb.CommitResponse:
        request = rq.build(pb.CommitRequest, fields)
        reply: pb.CommitResponse = await self._unary(self._stub.Commit, request, timeout_s)
        return reply

    async def rollback(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RollbackFields]
    ) -> pb.RollbackResponse:
        request = rq.build(pb.RollbackRequest, fields)
        reply: pb.RollbackResponse = await self._unary(self._stub.Rollback, request, timeout_s)
        return reply

    async def reserve_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReserveBatchFields]
    ) -> pb.ReserveBatchResponse:
        request = rq.build(pb.ReserveBatchRequest, fields)
        reply: pb.ReserveBatchResponse = await self._unary(
            self._stub.ReserveBatch, request, timeout_s
        )
        return reply

    async def commit_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.CommitBatchFields]
    ) -> pb.CommitBatchResponse:
        request = rq.build(pb.CommitBatchRequest, fields)
        reply: pb.CommitBatchResponse = await self._unary(
            self._stub.CommitBatch, request, timeout_s
        )
        return reply

    async def rollback_batch(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RollbackBatchFields]
    ) -> pb.RollbackBatchResponse:
        request = rq.build(pb.RollbackBatchRequest, fields)
        reply: pb.RollbackBatchResponse = await self._unary(
            self._stub.RollbackBatch, request, timeout_s
        )
        return reply

    async def get_reservation(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetReservationFields]
    ) -> pb.GetReservationResponse:
        request = rq.build(pb.GetReservationRequest, fields)
        reply: pb.GetReservationResponse = await self._unary(
            self._stub.GetReservation, request, timeout_s
        )
        return reply

    async def get_balance(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetBalanceFields]
    ) -> pb.GetBalanceResponse:
        request = rq.build(pb.GetBalanceRequest, fields)
        reply: pb.GetBalanceResponse = await self._unary(self._stub.GetBalance, request, timeout_s)
        return reply

    async def set_quota(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetQuotaFields]
    ) -> pb.SetQuotaResponse:
        request = rq.build(pb.SetQuotaRequest, fields)
        reply: pb.SetQuotaResponse = await self._unary(self._stub.SetQuota, request, timeout_s)
        return reply

    async def set_rate_limit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetRateLimitFields]
    ) -> pb.SetRateLimitResponse:
        request = rq.build(pb.SetRateLimitRequest, fields)
        reply: pb.SetRateLimitResponse = await self._unary(
            self._stub.SetRateLimit, request, timeout_s
        )
        return reply

    async def set_budget_alerts(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetBudgetAlertsFields]
    ) -> pb.SetBudgetAlertsResponse:
        request = rq.build(pb.SetBudgetAlertsRequest, fields)
        reply: pb.SetBudgetAlertsResponse = await self._unary(
            self._stub.SetBudgetAlerts, request, timeout_s
        )
        return reply

    async def grant_tokens(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GrantTokensFields]
    ) -> pb.GrantTokensResponse:
        request = rq.build(pb.GrantTokensRequest, fields)
        reply: pb.GrantTokensResponse = await self._unary(
            self._stub.GrantTokens, request, timeout_s
        )
        return reply

    async def adjust_balance(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.AdjustBalanceFields]
    ) -> pb.AdjustBalanceResponse:
        request = rq.build(pb.AdjustBalanceRequest, fields)
        reply: pb.AdjustBalanceResponse = await self._unary(
            self._stub.AdjustBalance, request, timeout_s
        )
        return reply

    async def record_usage(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RecordUsageFields]
    ) -> pb.RecordUsageResponse:
        request = rq.build(pb.RecordUsageRequest, fields)
        reply: pb.RecordUsageResponse = await self._unary(
            self._stub.RecordUsage, request, timeout_s
        )
        return reply

    async def set_prices(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.SetPricesFields]
    ) -> pb.SetPricesResponse:
        request = rq.build(pb.SetPricesRequest, fields)
        reply: pb.SetPricesResponse = await self._unary(self._stub.SetPrices, request, timeout_s)
        return reply

    async def list_prices(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ListPricesFields]
    ) -> pb.ListPricesResponse:
        request = rq.build(pb.ListPricesRequest, fields)
        reply: pb.ListPricesResponse = await self._unary(self._stub.ListPrices, request, timeout_s)
        return reply

    async def get_output_stats(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.GetOutputStatsFields]
    ) -> pb.GetOutputStatsResponse:
        request = rq.build(pb.GetOutputStatsRequest, fields)
        reply: pb.GetOutputStatsResponse = await self._unary(
            self._stub.GetOutputStats, request, timeout_s
        )
        return reply

    async def verify_audit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.VerifyAuditFields]
    ) -> pb.VerifyAuditResponse:
        request = rq.build(pb.VerifyAuditRequest, fields)
        reply: pb.VerifyAuditResponse = await self._unary(
            self._stub.VerifyAudit, request, timeout_s
        )
        return reply

    async def query_usage(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.QueryUsageFields]
    ) -> pb.QueryUsageResponse:
        request = rq.build(pb.QueryUsageRequest, fields)
        reply: pb.QueryUsageResponse = await self._unary(self._stub.QueryUsage, request, timeout_s)
        return reply

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
