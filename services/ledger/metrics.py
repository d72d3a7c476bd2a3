"""The ledger's instruments (OpenTelemetry) and the interceptor that counts refusals.

Ledger outcomes are counted from the events each committed transaction appended (the store's
observer), so a retry answered from its idempotency record counts nothing, and an expiry counts
whether the sweeper or a write on the tenant found it. Refusals are counted from the domain
error a call ends with. Held tokens come from the database, refreshed by a background task: an
observable callback cannot await, and runs on the scraper's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import structlog
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from psycopg_pool import AsyncConnectionPool

from ledger import errors
from ledger.application import Ledger
from ledger.model import (
    Event,
    ReservationCommitted,
    ReservationExpired,
    TokensReserved,
    UsageRecorded,
)
from services.platform.errors import TABLE
from services.platform.interceptors import UnaryBehavior, _Interceptor

log = structlog.get_logger("tokenledger.metrics")

LEDGER_METER = "tokenledger"
held_refresh_s_default = 5.0
"""How often the held-tokens gauge re-reads the database (one scan of the tenant rows)."""


class LedgerMetrics:
    """The ledger's instruments. `appended` is the store's event observer; `refused` counts a
    domain error; `refresh_held` re-reads the held tokens the gauge reports."""

    def __init__(
        self, pool: AsyncConnectionPool[Any], provider: MeterProvider | None = None
    ) -> None:
        meter = (provider or metrics.get_meter_provider()).get_meter(LEDGER_METER)
        self._pool = pool
        self.held: int | None = None  # None until first read: no gauge point rather than a 0
        self.reservations = meter.create_counter(
            "tokenledger.reservations",
            unit="{reservation}",
            description="Reservations placed, by outcome (granted in full, or partial)",
        )
        self.refusals = meter.create_counter(
            "tokenledger.refusals",
            unit="{call}",
            description="Calls refused with a domain error, by its ErrorInfo reason",
        )
        self.expiries = meter.create_counter(
            "tokenledger.expiries",
            unit="{reservation}",
            description="Holds expired (by the sweeper or by a later write on the tenant)",
        )
        self.overage = meter.create_counter(
            "tokenledger.overage.tokens",
            unit="{token}",
            description="Tokens used above their hold, at commit",
        )
        self.committed = meter.create_counter(
            "tokenledger.committed.tokens",
            unit="{token}",
            description="Tokens commits charged within their hold (all of a late commit's); "
            "with overage, every token commits reported",
        )
        meter.create_observable_gauge(
            "tokenledger.held.tokens",
            [self._observe_held],
            unit="{token}",
            description="Tokens held now by live reservations, all tenants (refreshed every "
            "few seconds)",
        )
        self._start_at_zero()
        for name, stat, what in (
            ("size", "pool_size", "Database connections open"),
            ("available", "pool_available", "Database connections idle in the pool"),
            ("waiting", "requests_waiting", "Requests waiting for a database connection"),
        ):
            meter.create_observable_gauge(
                f"tokenledger.db.pool.{name}",
                [self._observe_pool(stat)],
                unit="{connection}" if name != "waiting" else "{request}",
                description=what,
            )

    def _start_at_zero(self) -> None:
        """Every series exists from the start, so a rate over it reads 0, not "no data"."""
        for outcome in ("granted", "partial"):
            self.reservations.add(0, {"outcome": outcome})
        for reason in {e.reason for e in TABLE if issubclass(e, errors.LedgerError)}:
            self.refusals.add(0, {"reason": reason})
        for counter in (self.expiries, self.overage, self.committed):
            counter.add(0)

    def appended(self, events: Sequence[Event]) -> None:
        """Count what a committed transaction appended."""
        for event in events:
            match event:
                case TokensReserved():
                    partial = event.amount < event.requested
                    self.reservations.add(1, {"outcome": "partial" if partial else "granted"})
                case ReservationExpired():
                    self.expiries.add(1)
                case ReservationCommitted():
                    total = event.usage.total
                    self.committed.add(min(total, event.amount))
                    self.overage.add(max(0, total - event.amount))
                case UsageRecorded() if event.reservation_id:  # a late commit
                    self.committed.add(event.usage.total)

    def refused(self, exc: errors.LedgerError) -> None:
        self.refusals.add(1, {"reason": exc.reason})

    async def refresh_held(self, store: Ledger) -> int:
        self.held = await store.held_total()
        return self.held

    async def refresh_forever(self, store: Ledger, interval_s: float) -> None:
        while True:
            try:
                await self.refresh_held(store)
            except Exception as exc:  # the gauge keeps its last value; health says the rest
                log.debug("held tokens not refreshed", error=str(exc))
            await asyncio.sleep(interval_s)

    def _observe_held(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self.held is None else [Observation(self.held)]

    def _observe_pool(self, stat: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(self._pool.get_stats().get(stat, 0))]

        return callback


class RefusalInterceptor(_Interceptor):
    """Counts the domain errors calls end with. Innermost: it sees the servicer's errors, not
    the refusals of auth and guards (ErrorInterceptor, outside, turns both into statuses)."""

    def __init__(self, ledger_metrics: LedgerMetrics) -> None:
        self.metrics = ledger_metrics

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, context)
            except errors.LedgerError as exc:
                self.metrics.refused(exc)
                raise

        return counted
