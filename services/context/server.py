"""The context gRPC server: ContextService, health checking, reflection and a graceful stop.
It reaches the ledger over gRPC (TOKENLEDGER_LEDGER_TARGET), as any other backend would."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry.metrics import MeterProvider

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services.config import ConfigError
from services.context.config import ContextSettings
from services.context.fitting import AllocationPolicy
from services.context.ledger_client import (
    LEDGER_TIMEOUT_S_DEFAULT,
    LedgerCallError,
    LedgerClient,
    MetadataProvider,
)
from services.context.metrics import ContextMetrics
from services.context.registry import DEFAULT_REGISTRY, ModelRegistry
from services.context.remote_summarizer import RemoteSummarizerConfig
from services.context.service import ContextError, ContextService, request_bytes_max
from services.context.tokenizers import (
    COUNT_CACHE_ENTRIES_MAX_DEFAULT,
    ENCODINGS,
    POOL_MEMORY_BYTES_MAX_DEFAULT,
    TokenCounter,
    TokenizerPool,
)
from services.interceptors import (
    DrainInterceptor,
    ErrorInterceptor,
    LoggingInterceptor,
    TracingInterceptor,
    UnaryBehavior,
    _Interceptor,
)
from services.observability import configure_logging, configure_tracing
from services.server import server_options

log = structlog.get_logger("tokenledger.context.server")

SERVICE_NAME = cpb.DESCRIPTOR.services_by_name["ContextService"].full_name
COUNT_WORKERS_DEFAULT = 4


class ContextErrorInterceptor(_Interceptor):
    """Context refusals and ledger errors passed on become their status with google.rpc
    details. Innermost: anything else goes on to ErrorInterceptor (INTERNAL)."""

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        async def mapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, context)
            except ContextError as exc:
                code, status = exc.code, exc.status()
            except LedgerCallError as exc:
                code, status = exc.code, exc.status
            rich = rpc_status.to_status(status)
            await context.abort(code, status.message, rich.trailing_metadata)

        return mapped


class ContextServer:
    """A running context server bound to one address; `port` is the one actually bound.
    Construct it on the event loop that will run it (the gRPC server and channel bind to it)."""

    def __init__(
        self,
        ledger_target: str,
        *,
        pool: TokenizerPool | None = None,
        pool_bytes_max: int = POOL_MEMORY_BYTES_MAX_DEFAULT,
        cache_entries_max: int = COUNT_CACHE_ENTRIES_MAX_DEFAULT,
        policy: AllocationPolicy | None = None,
        remote_summarizer: RemoteSummarizerConfig | None = None,
        ledger_timeout_s: float = LEDGER_TIMEOUT_S_DEFAULT,
        ledger_metadata: MetadataProvider | None = None,
        count_workers: int = COUNT_WORKERS_DEFAULT,
        meter_provider: MeterProvider | None = None,
        registry: ModelRegistry = DEFAULT_REGISTRY,
    ) -> None:
        self.pool = pool or TokenizerPool(pool_bytes_max)
        self.counter = TokenCounter(self.pool, cache_entries_max)
        self.metrics = ContextMetrics(self.counter.stats, meter_provider)
        self.ledger = LedgerClient(
            ledger_target, timeout_s=ledger_timeout_s, call_metadata=ledger_metadata
        )
        self.executor = ThreadPoolExecutor(count_workers, thread_name_prefix="context-count")
        self.health = health.aio.HealthServicer()
        self.drain = DrainInterceptor(f"/{SERVICE_NAME}/")
        self.server = grpc.aio.server(
            interceptors=[
                TracingInterceptor(),
                LoggingInterceptor(),
                self.drain,
                ErrorInterceptor(),
                ContextErrorInterceptor(),
            ],
            options=server_options(request_bytes_max),
        )
        service = ContextService(
            self.counter,
            self.ledger,
            self.metrics,
            self.executor,
            registry=registry,
            policy=policy or AllocationPolicy(),
            remote_summarizer=remote_summarizer,
        )
        cpb_grpc.add_ContextServiceServicer_to_server(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def preload(self, encodings: Sequence[str]) -> None:
        """Load encodings before serving, so that no first request pays for it (~1 s each)."""
        loop = asyncio.get_running_loop()
        for name in encodings:
            await loop.run_in_executor(self.executor, self.pool.get, name)

    async def start(self, address: str) -> int:
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", address=address, port=self.port, ledger=self.ledger.target)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, refuse new calls with UNAVAILABLE, let calls in flight finish (up to
        `grace_s`), then stop and close the ledger channel."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if not await self.drain.drain(grace_s):
            log.warning("calls still in flight after the grace period are cancelled")
        await self.server.stop(0)
        await self.ledger.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")


def _preload_names(raw: str) -> list[str]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if names == ["all"]:
        return list(ENCODINGS)
    unknown = sorted(set(names) - set(ENCODINGS))
    if unknown:
        raise ConfigError(
            f"CONTEXT_PRELOAD_ENCODINGS: unknown {', '.join(unknown)}; "
            f"known: all, {', '.join(ENCODINGS)}"
        )
    return names


async def serve(settings: ContextSettings, preload: Sequence[str] = ()) -> None:
    remote = (
        RemoteSummarizerConfig(
            settings.summarizer_url,
            settings.summarizer_model,
            settings.summarizer_api_key,
            settings.summarizer_timeout_s,
        )
        if settings.summarizer_url
        else None
    )
    server = ContextServer(
        settings.ledger_target,
        pool_bytes_max=settings.pool_bytes_max,
        cache_entries_max=settings.cache_entries_max,
        policy=settings.policy,
        remote_summarizer=remote,
        ledger_timeout_s=settings.ledger_timeout_s,
        count_workers=settings.count_workers,
    )
    await server.preload(preload)
    await server.start(settings.listen)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down", grace_s=settings.shutdown_grace_s)
    await server.stop(settings.shutdown_grace_s)


def main(env: dict[str, str] | None = None) -> int:
    """`tokenledger context-serve`: settings from the environment, then serve until a signal."""
    environ = os.environ if env is None else env
    try:
        settings = ContextSettings.from_env(environ)
        preload = _preload_names(environ.get("CONTEXT_PRELOAD_ENCODINGS", ""))
    except ConfigError as exc:
        print(f"tokenledger context-serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    provider = configure_tracing(settings.trace_exporter, "tokenledger-context")
    try:
        asyncio.run(serve(settings, preload))
    finally:
        provider.shutdown()
    return 0
