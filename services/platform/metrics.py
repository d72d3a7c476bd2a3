"""Metrics (OpenTelemetry) both processes set up alike: a process's meter provider and its
exporters (a Prometheus /metrics endpoint, OTLP), and the RPC duration interceptor of both
servers. Each service's own instruments live beside it (services/ledger/metrics.py,
services/context/metrics.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

from services.platform.interceptors import UnaryBehavior, _code, _Interceptor

log = structlog.get_logger("tokenledger.metrics")

METRICS_EXPORTERS = ("none", "prometheus", "otlp", "prometheus+otlp")
RPC_METER = "tokenledger.rpc"
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
