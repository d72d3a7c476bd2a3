"""LedgerService: parse the request, call the ledger, map the result. Nothing else — logging,
tracing and error mapping are interceptors."""

from __future__ import annotations

from typing import Any

import grpc

from ledger import validation
from ledger.store import CallMeta, LedgerStore
from services import convert
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.observability import current_trace_id

Context = grpc.aio.ServicerContext[Any, Any]


def _meta() -> CallMeta:
    # The actor becomes the authenticated principal once callers authenticate.
    return CallMeta(actor="", trace_id=current_trace_id())


class LedgerService(pb_grpc.LedgerServiceServicer):
    def __init__(self, store: LedgerStore) -> None:
        self._store = store

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        result = await self._store.reserve(convert.reserve(request), _meta())
        return convert.reserve_response(result)

    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        result = await self._store.commit(convert.commit(request), _meta())
        return convert.commit_response(result)

    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.RollbackResponse:
        result = await self._store.rollback(convert.rollback(request), _meta())
        return convert.rollback_response(result)

    async def GetReservation(
        self, request: pb.GetReservationRequest, context: Context
    ) -> pb.GetReservationResponse:
        ref = validation.reservation_ref(
            tenant_id=request.tenant_id, reservation_id=request.reservation_id
        )
        res = await self._store.get_reservation(*ref)
        return pb.GetReservationResponse(reservation=convert.reservation(res))

    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: Context
    ) -> pb.GetBalanceResponse:
        key = validation.account(
            tenant_id=request.tenant_id,
            user_id=request.user_id,
            conversation_id=request.conversation_id,
        )
        return convert.balance_response(await self._store.get_balance(key))

    async def SetQuota(self, request: pb.SetQuotaRequest, context: Context) -> pb.SetQuotaResponse:
        balance = await self._store.set_quota(convert.set_quota(request), _meta())
        return pb.SetQuotaResponse(balance=convert.balance(balance))

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: Context
    ) -> pb.RecordUsageResponse:
        balance = await self._store.record_usage(convert.record_usage(request), _meta())
        return pb.RecordUsageResponse(balance=convert.balance(balance))
