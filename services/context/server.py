"""The context gRPC server: ContextService, health checking, reflection and a graceful stop.
It reaches the ledger over gRPC (TOKENLEDGER_LEDGER_TARGET), as any other backend would."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import MeterProvider
from psycopg_pool import AsyncConnectionPool

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services.context.config import DEADLINE_S_DEFAULT, ContextSettings
from services.context.fitting import AllocationPolicy
from services.context.ledger_client import (
    LEDGER_TIMEOUT_S_DEFAULT,
    LedgerClient,
    MetadataProvider,
)
from services.context.memory_store import MemoryStore
from services.context.metrics import ContextMetrics
from services.context.output_hold import HOLD_DEFAULTS, OutputHoldConfig
from services.context.remote_summarizer import RemoteSummarizerConfig
from services.context.requests import request_bytes_max
from services.context.service import ContextService
from services.context.tokenizers import (
    COUNT_CACHE_ENTRIES_MAX_DEFAULT,
    DEFAULT_REGISTRY,
    ENCODINGS,
    POOL_MEMORY_BYTES_MAX_DEFAULT,
    ModelRegistry,
    TokenCounter,
    TokenizerPool,
)
from services.platform import db
from services.platform.auth import (
    Authenticator,
    make_authenticator,
    server_credentials,
    warn_if_off,
)
from services.platform.config import ConfigError
from services.platform.guards import Guards
from services.platform.interceptors import DrainInterceptor
from services.platform.metrics import configure_metrics
from services.platform.observability import configure_logging, configure_tracing
from services.platform.serve import (
    LIVENESS,
    STARTUP_FAILED_EXIT_CODE,
    StartupFailure,
    call_path,
    check_listen,
    serve_until_signalled,
    server_options,
    set_ready,
)

log = structlog.get_logger("tokenledger.context.server")

SERVICE = cpb.DESCRIPTOR.services_by_name["ContextService"]
SERVICE_NAME = SERVICE.full_name
COUNT_WORKERS_DEFAULT = 4
KEYS_POOL_SIZE_MAX = 4
LEDGER_CHECK_S_DEFAULT = 1.0
"""How often readiness asks the ledger's health (each check waits at most this long too)."""
"""Database connections for callers' key lookups and the memory table (short primary-key
reads and writes, one per call)."""


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
        guards: Guards | None = None,
        auth: Authenticator | None = None,
        credentials: grpc.ServerCredentials | None = None,
        ledger_credentials: grpc.ChannelCredentials | None = None,
        memory_pool: AsyncConnectionPool[Any] | None = None,
        ledger_check_s: float = LEDGER_CHECK_S_DEFAULT,
        output_hold: OutputHoldConfig | None = None,
    ) -> None:
        """`auth` authenticates callers (None: anyone may call), `credentials` make the port
        TLS; `ledger_metadata` and `ledger_credentials` are this service's own for the ledger;
        `memory_pool` reaches the memory table (None: the memory RPCs and use_memory refuse
        with MEMORY_UNAVAILABLE); readiness follows the ledger's health, asked every
        `ledger_check_s`."""
        self.pool = pool or TokenizerPool(pool_bytes_max)
        self.counter = TokenCounter(self.pool, cache_entries_max)
        self.metrics = ContextMetrics(self.counter.stats, meter_provider)
        self.ledger = LedgerClient(
            ledger_target,
            timeout_s=ledger_timeout_s,
            call_metadata=ledger_metadata,
            credentials=ledger_credentials,
        )
        self.executor = ThreadPoolExecutor(count_workers, thread_name_prefix="context-count")
        self.health = health.aio.HealthServicer()
        self.drain = DrainInterceptor(f"/{SERVICE_NAME}/")
        self.server = grpc.aio.server(
            interceptors=[
                call_path(
                    SERVICE,
                    self.drain,
                    guards or Guards(DEADLINE_S_DEFAULT),
                    meter_provider=meter_provider,
                    auth=auth,
                )
            ],
            options=server_options(request_bytes_max),
        )
        self.service = ContextService(
            self.counter,
            self.ledger,
            self.metrics,
            self.executor,
            registry=registry,
            policy=policy or AllocationPolicy(),
            remote_summarizer=remote_summarizer,
            memory_store=MemoryStore(memory_pool) if memory_pool is not None else None,
            hold=output_hold or HOLD_DEFAULTS,
        )
        self._register_services()
        self.auth = auth
        self.credentials = credentials
        self.ledger_check_s = ledger_check_s
        self._watcher: asyncio.Task[None] | None = None
        self.port = 0

    def _register_services(self) -> None:
        cpb_grpc.add_ContextServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    async def preload(self, encodings: Sequence[str]) -> None:
        """Load encodings before serving, so that no first request pays for it (~1 s each)."""
        loop = asyncio.get_running_loop()
        for name in encodings:
            await loop.run_in_executor(self.executor, self.pool.get, name)

    async def start(self, address: str) -> int:
        self.port = (
            self.server.add_secure_port(address, self.credentials)
            if self.credentials
            else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._check_ledger()
        self._watcher = asyncio.create_task(self._watch_ledger(), name="ledger-health")
        warn_if_off(self.auth, SERVICE_NAME, tls=self.credentials is not None, address=address)
        log.info(
            "serving",
            address=address,
            port=self.port,
            ledger=self.ledger.target,
            tls=self.credentials is not None,
        )
        return self.port

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, refuse new calls with UNAVAILABLE, let calls in flight finish (up to
        `grace_s`), then stop and close the ledger channel."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._set_ready(False)
        if not await self.drain.drain(grace_s):
            log.warning("calls still in flight after the grace period are cancelled")
        await self.server.stop(0)
        await self.service.aclose()
        await self.ledger.close()
        if self.auth is not None:
            await self.auth.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    async def _check_ledger(self) -> None:
        await self._set_ready(await self.ledger.serving(self.ledger_check_s))

    async def _watch_ledger(self) -> None:
        """Readiness ("" and the service's name) is whether the ledger serves: every call
        needs it. Liveness ("liveness") stays SERVING: a restart cannot bring a ledger back."""
        while True:
            await asyncio.sleep(self.ledger_check_s)
            await self._check_ledger()

    async def _set_ready(self, ready: bool) -> None:
        await set_ready(self.health, SERVICE_NAME, ready)


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


async def serve(
    settings: ContextSettings,
    preload: Sequence[str] = (),
    meter_provider: MeterProvider | None = None,
    database_url: str = "",
) -> None:
    """Serve until SIGTERM or SIGINT. The database at `database_url` holds the memory table
    and, with auth on, callers' keys (a small pool)."""
    keys_pool = None
    if database_url:
        keys_pool = db.make_pool(database_url, KEYS_POOL_SIZE_MAX)
        await keys_pool.open(wait=settings.auth.mode != "off", timeout=30)
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
        guards=settings.guards,
        meter_provider=meter_provider,
        auth=make_authenticator(settings.auth, keys_pool) if keys_pool else None,
        credentials=server_credentials(settings.auth),
        ledger_metadata=settings.ledger_auth.metadata,
        ledger_credentials=settings.ledger_auth.credentials(),
        memory_pool=keys_pool,
        output_hold=settings.output_hold,
    )
    await server.preload(preload)
    await serve_until_signalled(
        server,
        settings.listen,
        settings.shutdown_grace_s,
        what="context service",
        setting="TOKENLEDGER_CONTEXT_LISTEN",
    )
    if keys_pool is not None:
        await keys_pool.close()


def main(env: dict[str, str] | None = None) -> int:
    """`tokenledger context-serve`: settings from the environment, then serve until a signal."""
    environ = os.environ if env is None else env
    try:
        settings = ContextSettings.from_env(environ)
        preload = _preload_names(environ.get("CONTEXT_PRELOAD_ENCODINGS", ""))
    except ConfigError as exc:
        print(f"tokenledger context-serve: {exc}", file=sys.stderr)
        return 2
    try:
        _serve_checked(settings, preload)
    except StartupFailure as exc:
        print(f"tokenledger context-serve: {exc}", file=sys.stderr)
        return STARTUP_FAILED_EXIT_CODE
    return 0


def _serve_checked(settings: ContextSettings, preload: Sequence[str]) -> None:
    # The ports first: before the embedded database, which takes seconds to start.
    check_listen("context service", settings.listen, "TOKENLEDGER_CONTEXT_LISTEN")
    if settings.metrics.listen:
        check_listen("metrics", settings.metrics.listen, "TOKENLEDGER_CONTEXT_METRICS_LISTEN")
    configure_logging(settings.log_format, settings.log_level)
    provider = configure_tracing(settings.trace_exporter, "tokenledger-context")
    meters = configure_metrics(
        settings.metrics.exporter, settings.metrics.listen, "tokenledger-context"
    )
    url = settings.database_url or db.embedded_url(settings.data_dir)
    try:
        asyncio.run(serve(settings, preload, meters.provider, url))
    finally:
        meters.shutdown()
        provider.shutdown()
