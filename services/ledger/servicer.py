"""LedgerService: parse the request, call the ledger, map the result. Nothing else — logging,
tracing and error mapping are interceptors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from ledger import errors, validation
from ledger import model as lm
from ledger.application import CallMeta, Ledger
from ledger.model import AccountKey
from ledger.postgres.audit import LedgerAudit
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.ledger import convert
from services.platform.auth import current_actor
from services.platform.errors import refusal, to_status
from services.platform.observability import current_trace_id

Context = grpc.aio.ServicerContext[Any, Any]
# Each under the 1 MiB message cap: an event is at most a few KiB, a head about 100 bytes.
REPLAY_EVENTS_PER_MESSAGE = 200
REPLAY_HEADS_PER_MESSAGE = 1_000


Item = TypeVar("Item")
Cmd = TypeVar("Cmd")
Result = TypeVar("Result", bound=Message)


async def _each(
    request: Any,
    parse: Callable[[Item], Cmd],
    run: Callable[[list[Cmd]], Awaitable[Sequence[Message | errors.LedgerError]]],
) -> list[Message | errors.LedgerError]:
    """Every item of a batch parsed as its single call parses it, and the valid ones run
    together as one entry of the tenant's queue (`run`): they share its transactions (group
    commit) and each gets the outcome its own call would have had. An item refused, here or
    by the ledger, is refused alone; a bad batch (no items, too many, a bad tenant) fails the
    call whole, before anything is done."""
    tenant = validation.batch(tenant_id=request.tenant_id, items=len(request.items))
    outcomes: list[Message | errors.LedgerError | None] = []
    valid: list[int] = []
    cmds: list[Cmd] = []
    for index, item in enumerate(request.items):
        try:
            item.tenant_id = validation.batch_item_tenant(index, tenant, item.tenant_id)
            cmds.append(parse(item))
        except errors.LedgerError as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)
            valid.append(index)
    for index, outcome in zip(valid, await run(cmds) if cmds else [], strict=True):
        outcomes[index] = outcome
    return [o for o in outcomes if o is not None]


def _results(
    result: Callable[..., Result], field: str, outcomes: list[Message | errors.LedgerError]
) -> list[Result]:
    """A batch's results: each item's response in `field`, or its refusal as a serialized
    google.rpc.Status. An error that is no refusal (the store unavailable) fails the call."""
    results = []
    for outcome in outcomes:
        if isinstance(outcome, errors.LedgerError):
            if refusal(outcome) is None:
                raise outcome
            results.append(result(refused=to_status(outcome)[1].SerializeToString()))
        else:
            results.append(result(**{field: outcome}))
    return results


def _mapped(
    outcome: Any | errors.LedgerError, response: Callable[[Any], Result]
) -> Result | errors.LedgerError:
    return outcome if isinstance(outcome, errors.LedgerError) else response(outcome)


def _meta() -> CallMeta:
    # The authenticated principal (services/platform/auth.py): who did it, in every event appended.
    return CallMeta(actor=current_actor(), trace_id=current_trace_id())


class LedgerService(pb_grpc.LedgerServiceServicer):
    def __init__(
        self,
        store: Ledger,
        audit: LedgerAudit,
        stopping: asyncio.Event,
        clock: Callable[[], datetime],
        cheaper_models: Mapping[str, str] | None = None,
    ) -> None:
        self._store = store
        self._cheaper_models = dict(cheaper_models or {})
        self._audit = audit
        self._stopping = stopping  # ends the never-ending streams on shutdown
        self._clock = clock

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        return await self._reserve(request)

    async def _reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        cmd = convert.reserve(request)
        try:
            result = await self._store.reserve(cmd, _meta())
        except errors.Refusal as exc:
            await self._advise(cmd, exc)
            raise
        return await self._reserve_response(cmd, result)

    async def _reserve_batch(
        self, cmds: list[lm.Reserve]
    ) -> list[pb.ReserveResponse | errors.LedgerError]:
        outcomes: list[pb.ReserveResponse | errors.LedgerError] = []
        for cmd, outcome in zip(cmds, await self._store.reserve_batch(cmds, _meta()), strict=True):
            if isinstance(outcome, errors.LedgerError):
                if isinstance(outcome, errors.Refusal):
                    await self._advise(cmd, outcome)
                outcomes.append(outcome)
            else:
                outcomes.append(await self._reserve_response(cmd, outcome))
        return outcomes

    async def _advise(self, cmd: lm.Reserve, refused: errors.Refusal) -> None:
        refused.advise((await self._advice(cmd.key.tenant_id, cmd.model)).metadata())

    async def _reserve_response(
        self, cmd: lm.Reserve, result: lm.ReserveResult
    ) -> pb.ReserveResponse:
        if result.partial or result.warnings:
            advice = await self._advice(cmd.key.tenant_id, cmd.model)
        else:  # no suggestion is sent: no price to read
            advice = convert.advice(self._cheaper_models, cmd.model)
        return convert.reserve_response(result, advice)

    async def _advice(self, tenant_id: str, model: str) -> convert.Advice:
        """Advice with the cheaper model's price in force now (one read, off the grant path)."""
        cheaper = self._cheaper_models.get(model, "")
        prices = await self._store.prices(tenant_id, cheaper) if cheaper else []
        return convert.advice(self._cheaper_models, model, prices, self._clock())

    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        return await self._commit(request)

    async def _commit(self, request: pb.CommitRequest) -> pb.CommitResponse:
        result = await self._store.commit(convert.commit(request), _meta())
        return convert.commit_response(result)

    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.RollbackResponse:
        return await self._rollback(request)

    async def _rollback(self, request: pb.RollbackRequest) -> pb.RollbackResponse:
        result = await self._store.rollback(convert.rollback(request), _meta())
        return convert.rollback_response(result)

    async def ReserveBatch(
        self, request: pb.ReserveBatchRequest, context: Context
    ) -> pb.ReserveBatchResponse:
        outcomes = await _each(request, convert.reserve, self._reserve_batch)
        return pb.ReserveBatchResponse(
            results=_results(pb.ReserveBatchResult, "reserved", outcomes)
        )

    async def CommitBatch(
        self, request: pb.CommitBatchRequest, context: Context
    ) -> pb.CommitBatchResponse:
        async def run(cmds: list[lm.Commit]) -> list[pb.CommitResponse | errors.LedgerError]:
            outcomes = await self._store.commit_batch(cmds, _meta())
            return [_mapped(o, convert.commit_response) for o in outcomes]

        outcomes = await _each(request, convert.commit, run)
        return pb.CommitBatchResponse(results=_results(pb.CommitBatchResult, "committed", outcomes))

    async def RollbackBatch(
        self, request: pb.RollbackBatchRequest, context: Context
    ) -> pb.RollbackBatchResponse:
        async def run(cmds: list[lm.Rollback]) -> list[pb.RollbackResponse | errors.LedgerError]:
            outcomes = await self._store.rollback_batch(cmds, _meta())
            return [_mapped(o, convert.rollback_response) for o in outcomes]

        outcomes = await _each(request, convert.rollback, run)
        return pb.RollbackBatchResponse(
            results=_results(pb.RollbackBatchResult, "rolled_back", outcomes)
        )

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
        if request.HasField("as_of"):
            as_of = convert.time_field(request, "as_of")
            assert as_of is not None
            validation.balance_at(as_of, self._clock())
            return convert.balance_response(await self._audit.balance_at(key, as_of))
        return convert.balance_response(await self._store.get_balance(key))

    async def SetQuota(self, request: pb.SetQuotaRequest, context: Context) -> pb.SetQuotaResponse:
        balance = await self._store.set_quota(convert.set_quota(request), _meta())
        return pb.SetQuotaResponse(balance=convert.balance(balance))

    async def SetRateLimit(
        self, request: pb.SetRateLimitRequest, context: Context
    ) -> pb.SetRateLimitResponse:
        limit = await self._store.set_rate_limit(convert.set_rate_limit(request), _meta())
        return pb.SetRateLimitResponse(rate_limit=convert.rate_limit(limit))

    async def SetBudgetAlerts(
        self, request: pb.SetBudgetAlertsRequest, context: Context
    ) -> pb.SetBudgetAlertsResponse:
        balance = await self._store.set_budget_alerts(convert.set_budget_alerts(request), _meta())
        return pb.SetBudgetAlertsResponse(balance=convert.balance(balance))

    async def GrantTokens(
        self, request: pb.GrantTokensRequest, context: Context
    ) -> pb.GrantTokensResponse:
        cmd = convert.grant_tokens(request)
        return pb.GrantTokensResponse(
            balance=convert.balance(await self._store.grant_tokens(cmd, _meta()))
        )

    async def AdjustBalance(
        self, request: pb.AdjustBalanceRequest, context: Context
    ) -> pb.AdjustBalanceResponse:
        cmd = convert.adjust_balance(request)
        return pb.AdjustBalanceResponse(
            balance=convert.balance(await self._store.adjust_balance(cmd, _meta()))
        )

    async def SetPrices(
        self, request: pb.SetPricesRequest, context: Context
    ) -> pb.SetPricesResponse:
        points = await self._store.set_prices(convert.set_prices(request, self._clock()), _meta())
        return pb.SetPricesResponse(prices=[convert.price(p) for p in points])

    async def ListPrices(
        self, request: pb.ListPricesRequest, context: Context
    ) -> pb.ListPricesResponse:
        tenant_id, model = validation.price_list(tenant_id=request.tenant_id, model=request.model)
        points = await self._store.prices(tenant_id, model)
        return pb.ListPricesResponse(
            prices=[convert.price(p) for p in points],
            currency=await self._store.currency(tenant_id),
        )

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: Context
    ) -> pb.RecordUsageResponse:
        balance = await self._store.record_usage(convert.record_usage(request), _meta())
        return pb.RecordUsageResponse(balance=convert.balance(balance))

    async def ReplayHistory(
        self, request: pb.ReplayHistoryRequest, context: Context
    ) -> AsyncIterator[pb.ReplayHistoryResponse]:
        scope, from_position, from_time, max_events = convert.replay(request)
        heads: dict[AccountKey, tuple[int, bytes]] = {}
        chunk: list[pb.LedgerEvent] = []
        sent, last, complete = 0, 0, True
        rows = self._audit.events(scope, from_position, from_time, max_events + 1)
        async with aclosing(rows):  # returns its connection even when the client leaves
            async for event in rows:
                if sent == max_events:
                    complete = False
                    break
                chunk.append(convert.ledger_event(event))
                heads[event.key] = (event.version, event.hash)
                sent, last = sent + 1, event.position
                if len(chunk) == REPLAY_EVENTS_PER_MESSAGE:
                    yield pb.ReplayHistoryResponse(events=chunk)
                    chunk = []
        if chunk:
            yield pb.ReplayHistoryResponse(events=chunk)
        ordered = [convert.stream_head(k, v, h) for k, (v, h) in sorted(heads.items())]
        for i in range(0, len(ordered), REPLAY_HEADS_PER_MESSAGE):
            yield pb.ReplayHistoryResponse(heads=ordered[i : i + REPLAY_HEADS_PER_MESSAGE])
        end = pb.ReplayEnd(events=sent, last_position=last, complete=complete, streams=len(heads))
        yield pb.ReplayHistoryResponse(end=end)

    async def VerifyAudit(
        self, request: pb.VerifyAuditRequest, context: Context
    ) -> pb.VerifyAuditResponse:
        scope = validation.verify(
            tenant_id=request.tenant_id,
            user_id=request.user_id,
            from_checkpoint=request.from_checkpoint,
        )
        report = await self._audit.verify(scope, from_checkpoint=request.from_checkpoint)
        return convert.verify_response(report)

    async def QueryUsage(
        self, request: pb.QueryUsageRequest, context: Context
    ) -> pb.QueryUsageResponse:
        query = convert.usage_query(request.query)
        offset, limit = validation.page(
            page_size=request.page_size, page_token=request.page_token, query=query
        )
        rows = await self._audit.query_usage(query, offset, limit + 1)
        more = len(rows) > limit
        return pb.QueryUsageResponse(
            rows=[convert.usage_row(r) for r in rows[:limit]],
            next_page_token=validation.page_token(query, offset + limit) if more else "",
            currency=await self._store.currency(query.tenant_id),
        )

    async def GetOutputStats(
        self, request: pb.GetOutputStatsRequest, context: Context
    ) -> pb.GetOutputStatsResponse:
        query = convert.output_stats_query(request)
        stats = await self._audit.output_stats(query, self._clock())
        return convert.output_stats_response(stats, query)

    async def ExportUsage(
        self, request: pb.ExportUsageRequest, context: Context
    ) -> AsyncIterator[pb.ExportUsageResponse]:
        query = convert.usage_query(request.query)
        currency = await self._store.currency(query.tenant_id)
        rows = self._audit.export_usage(query)
        async with aclosing(rows):
            async for row in rows:
                yield pb.ExportUsageResponse(row=convert.usage_row(row), currency=currency)

    async def SubscribeEvents(
        self, request: pb.SubscribeEventsRequest, context: Context
    ) -> AsyncIterator[pb.SubscribeEventsResponse]:
        after = validation.subscription(
            tenant_id=request.tenant_id,
            after_cursor=request.after_cursor,
            from_position=request.from_position,
        )
        follow = self._audit.follow(request.tenant_id, after, request.from_position, self._stopping)
        async with aclosing(follow):
            async for event in follow:
                yield pb.SubscribeEventsResponse(
                    event=convert.ledger_event(event),
                    cursor=validation.cursor(event.transaction_id, event.position),
                )
