"""Metrics (OpenTelemetry): a process's meter provider and its exporters (a Prometheus /metrics
endpoint, OTLP), the ledger's instruments, and the RPC duration interceptor of both servers.

Ledger outcomes are counted from the events each committed transaction appended (the store's
observer), so a retry answered from its idempotency record counts nothing, and an expiry counts
whether the sweeper or a write on the tenant found it. Refusals are counted from the domain
error a call ends with. Held tokens come from the database, refreshed by a background task: an
observable callback cannot await, and runs on the scraper's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
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
from services.errors import STATUS_BY_ERROR
from services.interceptors import UnaryBehavior, _code, _Interceptor

log = structlog.get_logger("tokenledger.metrics")

METRICS_EXPORTERS = ("none", "prometheus", "otlp", "prometheus+otlp")
LEDGER_METER = "tokenledger"
RPC_METER = "tokenledger.rpc"
held_refresh_s_default = 5.0
"""How often the held-tokens gauge re-reads the database (one scan of the tenant rows)."""
RPC_DURATION_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Seconds: OpenTelemetry's default buckets are made for milliseconds."""


# --- the process's provider ---------------------------------------------------------------


def exporter_parts(exporter: str) -> set[str]:
    """`prometheus+otlp` as {"prometheus", "otlp"}; `none` as the empty set."""
    return set(exporter.split("+")) - {"none"}


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port); ValueError when it is not one."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not (sep and host and port.isdigit() and int(port) <= 65_535):
        raise ValueError(f"{listen!r} is not host:port")
    return host, int(port)


@dataclass
class ProcessMetrics:
    """The meter provider of a process and the /metrics server, if any. `enabled` is False
    when nothing exports: then nothing need be measured."""

    provider: SdkMeterProvider
    enabled: bool
    http: WSGIServer | None = None

    def shutdown(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.provider.shutdown()


def configure_metrics(exporter: str, listen: str, service_name: str) -> ProcessMetrics:
    """The process's meter provider (also made the global one), exporting to a Prometheus
    endpoint on `listen` and/or by OTLP (the standard OTEL_EXPORTER_OTLP_* and
    OTEL_METRIC_EXPORT_INTERVAL variables apply)."""
    parts = exporter_parts(exporter)
    readers: list[MetricReader] = []
    http: WSGIServer | None = None
    if "prometheus" in parts:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import (
            CollectorRegistry,
            GCCollector,
            PlatformCollector,
            ProcessCollector,
            start_http_server,
        )

        # A registry of our own: a second provider in the process (tests) cannot clash with
        # the default one's names.
        registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        readers.append(PrometheusMetricReader(registry=registry))
        host, port = split_listen(listen)
        http, _ = start_http_server(port, host, registry=registry)
        log.info("metrics endpoint", address=listen, port=http.server_port, path="/metrics")
    if "otlp" in parts:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    provider = SdkMeterProvider(
        resource=Resource.create({"service.name": service_name}), metric_readers=readers
    )
    metrics.set_meter_provider(provider)
    return ProcessMetrics(provider, enabled=bool(readers), http=http)


# --- RPC duration (both servers) ----------------------------------------------------------


class RpcMetricsInterceptor(_Interceptor):
    """`tokenledger.rpc.duration` per method and status code. Outermost, so it times what a
    caller waits for, refusals by the other interceptors included."""

    def __init__(self, provider: MeterProvider | None = None) -> None:
        meter = (provider or metrics.get_meter_provider()).get_meter(RPC_METER)
        self.duration = meter.create_histogram(
            "tokenledger.rpc.duration",
            unit="s",
            description="Server time of an RPC, by method (rpc) and status code (code)",
            explicit_bucket_boundaries_advisory=RPC_DURATION_BUCKETS_S,
        )

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        rpc = method.rpartition("/")[2]

        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code: grpc.StatusCode | None = None
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = _code(context)
                if code is grpc.StatusCode.OK:  # raised without a status: gRPC says UNKNOWN
                    code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                self.duration.record(
                    time.perf_counter() - started,
                    {"rpc": rpc, "code": (code or _code(context)).name},
                )

        return timed


# --- the ledger's instruments -------------------------------------------------------------


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
        for error in STATUS_BY_ERROR:
            self.refusals.add(0, {"reason": error.reason})
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
    """Counts the domain errors calls end with. Innermost: it sees the error before
    ErrorInterceptor turns it into a status."""

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
