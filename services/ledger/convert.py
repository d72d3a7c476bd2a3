"""Between protobuf messages and ledger values. Parsing goes through ledger.validation, so a
malformed field is refused with the request's own field name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from ledger import codec, errors, limits, validation
from ledger.model import (
    Account,
    AccountKey,
    AdjustBalance,
    BalanceResult,
    Commit,
    CommitResult,
    GrantOrder,
    GrantTokens,
    Period,
    PriceEntry,
    RateLimit,
    RecordUsage,
    Reservation,
    Reserve,
    ReserveResult,
    Rollback,
    RollbackResult,
    SetBudgetAlerts,
    SetPrices,
    SetQuota,
    SetRateLimit,
    State,
    Usage,
)
from ledger.money import PricePoint, price_at
from ledger.reads import (
    LoggedEvent,
    OutputStats,
    OutputStatsQuery,
    Scope,
    UsageQuery,
    UsageRow,
    VerifyReport,
)
from ledger.usage import COUNTER_NAMES
from services._gen.tokenledger.v1 import ledger_pb2 as pb

USAGE_GROUP_NAMES = {
    pb.USAGE_DIMENSION_USER: "user",
    pb.USAGE_DIMENSION_CONVERSATION: "conversation",
    pb.USAGE_DIMENSION_MODEL: "model",
    pb.USAGE_DIMENSION_DAY: "day",
    pb.USAGE_DIMENSION_HOUR: "hour",
}

_PERIOD_TO_PB = {
    Period.NONE: pb.PERIOD_NONE,
    Period.DAY: pb.PERIOD_DAY,
    Period.MONTH: pb.PERIOD_MONTH,
    Period.ROLLING: pb.PERIOD_ROLLING,
}
_GRANT_ORDER_TO_PB = {
    GrantOrder.QUOTA_FIRST: pb.GRANT_ORDER_QUOTA_FIRST,
    GrantOrder.GRANTS_FIRST: pb.GRANT_ORDER_GRANTS_FIRST,
}
_GRANT_ORDER_FROM_PB = {
    pb.GRANT_ORDER_UNSPECIFIED: GrantOrder.QUOTA_FIRST,
    **{v: k for k, v in _GRANT_ORDER_TO_PB.items()},
}
_PERIOD_FROM_PB = {v: k for k, v in _PERIOD_TO_PB.items()}
_OUTPUT_STATS_SCOPE_TO_PB = {
    "user": pb.OUTPUT_STATS_SCOPE_USER,
    "tenant": pb.OUTPUT_STATS_SCOPE_TENANT,
    "none": pb.OUTPUT_STATS_SCOPE_NONE,
}
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
        min_amount=req.min_amount,
        prompt_tokens=req.prompt_tokens,
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
        window_hours=req.window_hours,
        time_zone=req.time_zone,
        soft_limit_percent=req.soft_limit_percent,
        grant_order=_GRANT_ORDER_FROM_PB.get(req.grant_order),
        money_limit=req.money_limit_micros if req.HasField("money_limit_micros") else None,
    )


def set_budget_alerts(req: pb.SetBudgetAlertsRequest) -> SetBudgetAlerts:
    return validation.set_budget_alerts(
        idempotency_key=req.idempotency_key,
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        conversation_id=req.conversation_id,
        thresholds_percent=list(req.thresholds_percent),
    )


def set_rate_limit(req: pb.SetRateLimitRequest) -> SetRateLimit:
    return validation.set_rate_limit(
        idempotency_key=req.idempotency_key,
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        conversation_id=req.conversation_id,
        model=req.model,
        tokens_per_minute=req.tokens_per_minute,
        requests_per_minute=req.requests_per_minute,
    )


def grant_tokens(req: pb.GrantTokensRequest) -> GrantTokens:
    return validation.grant_tokens(
        idempotency_key=req.idempotency_key,
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        conversation_id=req.conversation_id,
        amount=req.amount,
        expires_at=time_field(req, "expires_at"),
        reason=req.reason,
        money=req.money_micros,
    )


def adjust_balance(req: pb.AdjustBalanceRequest) -> AdjustBalance:
    return validation.adjust_balance(
        idempotency_key=req.idempotency_key,
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        conversation_id=req.conversation_id,
        tokens=req.tokens,
        reason=req.reason,
        money=req.money_micros,
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


def set_prices(req: pb.SetPricesRequest, now: datetime) -> SetPrices:
    entries = [
        PriceEntry(
            model=p.model,
            currency=p.currency,
            input_per_mtok=p.input_micros_per_mtok,
            output_per_mtok=p.output_micros_per_mtok,
            cached_input_per_mtok=p.cached_input_micros_per_mtok,
            effective_from=time_field(p, "effective_from", f"prices[{i}].effective_from"),
        )
        for i, p in enumerate(req.prices[: limits.prices_per_call_max + 1])
    ]
    return validation.set_prices(
        idempotency_key=req.idempotency_key, tenant_id=req.tenant_id, prices=entries, now=now
    )


# --- responses -------------------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    """As Timestamp.FromDatetime (a naive time is UTC), by one subtraction: a third of its
    cost, and a response carries a few."""
    since = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1_000
    )


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
        granted=acc.granted,
        grants=[
            pb.Grant(
                grant_id=g.grant_id,
                remaining=g.remaining,
                expires_at=_timestamp(g.expires_at) if g.expires_at else None,
            )
            for g in acc.grants
        ],
        window_hours=acc.window_hours,
        time_zone=acc.time_zone,
        soft_limit_percent=acc.soft_limit_percent,
        grant_order=_GRANT_ORDER_TO_PB[acc.grant_order],
        alert_thresholds_percent=acc.alert_thresholds,
        alerts_crossed_percent=acc.alerts_fired,
    )
    if acc.money is not None:
        m = acc.money
        msg.money.CopyFrom(
            pb.MoneyBalance(
                limit_micros=m.limit,
                held_micros=m.held,
                used_micros=m.used,
                available_micros=m.available,
                granted_micros=m.granted,
                used_total_micros=m.used_total,
                alerts_crossed_percent=m.alerts_fired,
            )
        )
    bounds = acc.period_bounds()
    if bounds is not None:
        msg.period_start.CopyFrom(_timestamp(bounds[0]))
        msg.resets_at.CopyFrom(_timestamp(bounds[1]))
    return msg


def usage_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
    )


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
        money_held_micros=res.money,
        cost_micros=res.cost,
    )
    if res.usage is not None:
        msg.usage.CopyFrom(usage_pb(res.usage))
    return msg


@dataclass(frozen=True)
class Advice:
    """What a Reserve caller may do besides asking for less or waiting: compact its context,
    or use a cheaper model. Given both with a refusal (ErrorInfo metadata) and with a partial
    or warned grant (the reply's Suggestion)."""

    cheaper_model: str
    compact_context: bool = True
    cheaper_price: PricePoint | None = None
    """The cheaper model's price in force now, when it has one."""

    def metadata(self) -> dict[str, str]:
        out = {"compact_context": "true"} if self.compact_context else {}
        if self.cheaper_model:
            out["cheaper_model"] = self.cheaper_model
        if self.cheaper_price is not None:
            p = self.cheaper_price
            out["cheaper_model_price"] = (
                f"{p.currency} micro-units per 1M tokens: input {p.price.input}, "
                f"output {p.price.output}, cached input {p.price.cached_input}"
            )
        return out


def advice(
    cheaper_models: Mapping[str, str],
    model: str,
    prices: Sequence[PricePoint] = (),
    now: datetime | None = None,
) -> Advice:
    """The one place advice is computed (TOKENLEDGER_CHEAPER_MODELS names the cheaper models;
    `prices` are the cheaper model's, and the one in force at `now` goes with it)."""
    cheaper = cheaper_models.get(model, "")
    in_force = price_at(prices, now) if cheaper and now is not None else None
    return Advice(cheaper_model=cheaper, cheaper_price=in_force)


def reserve_response(result: ReserveResult, advised: Advice) -> pb.ReserveResponse:
    msg = pb.ReserveResponse(
        reservation=reservation(result.reservation),
        balance=balance(result.balance),
        requested=result.requested,
        partial=result.partial,
        warnings=[
            pb.SoftLimitWarning(
                scope=w.scope,
                account=w.account,
                percent_used=w.percent_used,
                threshold_percent=w.threshold_percent,
                currency=w.currency,
            )
            for w in result.warnings
        ],
    )
    if result.partial or result.warnings:
        msg.suggestion.CopyFrom(
            pb.Suggestion(
                max_amount_now=result.reservable,
                cheaper_model=advised.cheaper_model,
                compact_context=advised.compact_context,
            )
        )
        if result.resets_at is not None:
            msg.suggestion.resets_at.CopyFrom(_timestamp(result.resets_at))
        if advised.cheaper_price is not None:
            msg.suggestion.cheaper_model_price.CopyFrom(price(advised.cheaper_price))
    return msg


def rate_limit(rl: RateLimit) -> pb.RateLimit:
    k = rl.key.account
    return pb.RateLimit(
        tenant_id=k.tenant_id,
        user_id=k.user_id,
        conversation_id=k.conversation_id,
        model=rl.key.model,
        tokens_per_minute=rl.tokens_per_minute,
        requests_per_minute=rl.requests_per_minute,
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
        currency=result.currency,
    )


def price(point: PricePoint) -> pb.Price:
    return pb.Price(
        model=point.model,
        effective_from=_timestamp(point.effective_from),
        currency=point.currency,
        input_micros_per_mtok=point.price.input,
        output_micros_per_mtok=point.price.output,
        cached_input_micros_per_mtok=point.price.cached_input,
    )


def time_field(msg: Any, name: str, path: str = "") -> datetime | None:
    """A Timestamp field as an aware datetime; None when unset. One that no datetime can hold
    (beyond year 9999, or nanos out of range) is refused naming the field (or `path`)."""
    if not msg.HasField(name):
        return None
    try:
        at: datetime = getattr(msg, name).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise errors.InvalidArgument(
            [errors.FieldViolation(path or name, "is not a valid timestamp (years 1 to 9999)")]
        ) from None
    return at


def replay(req: pb.ReplayHistoryRequest) -> tuple[Scope, int, datetime | None, int]:
    return validation.replay(
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        conversation_id=req.conversation_id,
        from_position=req.from_position,
        from_time=time_field(req, "from_time"),
        max_events=req.max_events,
    )


def usage_query(q: pb.UsageQuery) -> UsageQuery:
    return validation.usage_query(
        tenant_id=q.tenant_id,
        from_time=time_field(q, "from_time"),
        to_time=time_field(q, "to_time"),
        group_by=[USAGE_GROUP_NAMES.get(g) for g in q.group_by],
        user_id=q.user_id,
        conversation_id=q.conversation_id,
        model=q.model,
        time_zone=q.time_zone,
    )


def output_stats_query(req: pb.GetOutputStatsRequest) -> OutputStatsQuery:
    return validation.output_stats(
        tenant_id=req.tenant_id,
        user_id=req.user_id,
        model=req.model,
        window_hours=req.window_hours,
        min_samples=req.min_samples,
    )


def output_stats_response(stats: OutputStats, q: OutputStatsQuery) -> pb.GetOutputStatsResponse:
    return pb.GetOutputStatsResponse(
        scope=_OUTPUT_STATS_SCOPE_TO_PB[stats.scope],
        samples=stats.samples,
        p50_output_tokens=stats.p50,
        p95_output_tokens=stats.p95,
        max_output_tokens=stats.max,
        user_samples=stats.user_samples,
        window_hours=q.window_hours,
        min_samples=q.min_samples,
    )


def ledger_event(e: LoggedEvent) -> pb.LedgerEvent:
    return pb.LedgerEvent(
        position=e.position,
        tenant_id=e.key.tenant_id,
        user_id=e.key.user_id,
        conversation_id=e.key.conversation_id,
        version=e.version,
        event_type=e.event_type,
        occurred_at=_timestamp(e.occurred_at),
        recorded_at=_timestamp(e.recorded_at),
        model=e.model,
        reservation_id=e.reservation_id,
        amount=e.amount,
        usage=usage_pb(e.usage),
        idempotency_key=e.idempotency_key,
        actor=e.actor,
        trace_id=e.trace_id,
        data_json=codec.canonical_json(e.data).decode(),
        transaction_id=e.transaction_id,
        prev_hash=e.prev_hash,
        hash=e.hash,
    )


def stream_head(key: AccountKey, version: int, head: bytes) -> pb.StreamHead:
    return pb.StreamHead(
        tenant_id=key.tenant_id,
        user_id=key.user_id,
        conversation_id=key.conversation_id,
        version=version,
        hash=head,
    )


def usage_row(row: UsageRow) -> pb.UsageRow:
    counters = {name: getattr(row.counters, name) for name in COUNTER_NAMES}
    c = row.counters
    msg = pb.UsageRow(
        user_id=row.user_id,
        conversation_id=row.conversation_id,
        model=row.model,
        total_tokens=c.input_tokens + c.output_tokens + c.cached_input_tokens,
        **counters,
    )
    if row.period_start is not None:
        msg.period_start.CopyFrom(_timestamp(row.period_start))
    return msg


def verify_response(report: VerifyReport) -> pb.VerifyAuditResponse:
    return pb.VerifyAuditResponse(
        events_checked=report.events_checked,
        streams_checked=report.streams_checked,
        chains_ok=not report.breaks,
        breaks_total=len(report.breaks),
        differences_total=len(report.differences),
        breaks=[
            pb.ChainBreak(
                stream=stream_head(b.stream, b.version, b""), version=b.version, problem=b.problem
            )
            for b in report.breaks[: limits.verify_listed_max]
        ],
        projections_match=not [d for d in report.differences if d.kind != "checkpoint"],
        checkpoints_ok=not [d for d in report.differences if d.kind == "checkpoint"],
        from_checkpoint=report.from_checkpoint,
        from_position=report.from_position,
        checkpoints_checked=report.checkpoints_checked,
        differences=[
            pb.ProjectionDifference(
                kind=d.kind, key=d.key, field=d.field, live=d.live, rebuilt=d.rebuilt
            )
            for d in report.differences[: limits.verify_listed_max]
        ],
    )
