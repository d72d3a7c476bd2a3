"""The ledger gRPC server: the service, health checking, reflection, the expiry sweeper and a
graceful stop (in-flight calls finish within the grace period)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import MeterProvider
from psycopg_pool import AsyncConnectionPool

from ledger import limits
from ledger.application import Ledger, utc_now
from ledger.errors import CheckpointRefused, StoreUnavailable
from ledger.model import Event
from ledger.postgres import partitions
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.store import PostgresStore
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.ledger.alerts import AlertWebhook
from services.ledger.metrics import LedgerMetrics, RefusalInterceptor, held_refresh_s_default
from services.ledger.servicer import LedgerService
from services.platform.auth import Authenticator, warn_if_off
from services.platform.guards import Guards
from services.platform.interceptors import DrainInterceptor
from services.platform.serve import LIVENESS, call_path, server_options, set_ready

log = structlog.get_logger("tokenledger.server")

SERVICE = pb.DESCRIPTOR.services_by_name["LedgerService"]
SERVICE_NAME = SERVICE.full_name
message_bytes_max = 1 << 20
response_bytes_max = 4 << 20
"""A batch answers every item, echoing its labels: 100 items of the largest possible
reservation (16 labels of 256 four-byte characters) need about 2 MiB."""
SLOW_METHODS = ("VerifyAudit",)
"""Unary calls that may run for minutes (a whole tenant's log): the stream default deadline."""


KEY_PRUNE_INTERVAL_S = 60.0
"""How often the sweeper deletes expired idempotency keys (in batches; see Ledger.prune_keys)."""


@dataclass(frozen=True)
class CheckpointSchedule:
    """Take a checkpoint of each tenant with `every_events` events since its last one, or
    with any event and no checkpoint for `every_s` seconds (0: off), looking every `check_s`.
    Each is a verification from the last checkpoint first (README, Audit)."""

    every_events: int = 0
    every_s: float = 0.0
    check_s: float = 60.0

    @property
    def on(self) -> bool:
        return self.every_events > 0 or self.every_s > 0


async def _end(task: asyncio.Task[None]) -> None:
    """Cancel a background loop and wait for it. A cancel that lands in a database call can
    come out as a database error the loop handles (psycopg cancels the query and reports
    it), and the loop would then sleep its interval (an hour in some deployments) before
    stopping: so it is cancelled again until it ends."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.1)


class LedgerServer:
    """A running ledger server bound to one address; `port` is the one actually bound."""

    _audit_starter: asyncio.Task[None] | None = None

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        sweep_interval_s: float = 1.0,
        clock: Callable[[], datetime] = utc_now,
        cheaper_models: Mapping[str, str] | None = None,
        guards: Guards | None = None,
        meter_provider: MeterProvider | None = None,
        held_refresh_s: float = held_refresh_s_default,
        auth: Authenticator | None = None,
        credentials: grpc.ServerCredentials | None = None,
        read_pool: AsyncConnectionPool[Any] | None = None,
        audit_workers: int = 1,
        key_retention_s: int = limits.idempotency_retention_s_default,
        alert_webhook_url: str = "",
        checkpoints: CheckpointSchedule | None = None,
        start_audit_workers: bool = False,
    ) -> None:
        """Metrics go to `meter_provider` (default: the global one); only with one given is the
        held-tokens gauge kept fresh (a database read every `held_refresh_s`). Audit and usage
        reads go to `read_pool` (a read replica's) when given. Budget alerts this process
        appends are POSTed to `alert_webhook_url` when given (services/ledger/alerts.py).
        `start_audit_workers`: the audit's workers start with the server (`serve` does so)."""
        self.pool = pool
        self.metrics = LedgerMetrics(pool, meter_provider)
        self.held_refresh_s = held_refresh_s if meter_provider is not None else None
        self.alerts = AlertWebhook(alert_webhook_url) if alert_webhook_url else None
        self.store = Ledger(PostgresStore(pool), clock=clock, on_appended=self._appended,
                            key_retention_s=key_retention_s)  # fmt: skip
        self.sweep_interval_s, self.clock = sweep_interval_s, clock
        self.checkpoints = checkpoints or CheckpointSchedule()
        self._checkpointer: asyncio.Task[None] | None = None
        self.start_audit_workers = start_audit_workers
        self.health = health.aio.HealthServicer()
        self.drain = DrainInterceptor(f"/{SERVICE_NAME}/")
        self.server = grpc.aio.server(
            interceptors=[
                call_path(
                    SERVICE,
                    self.drain,
                    guards or Guards(),
                    meter_provider=meter_provider,
                    auth=auth,
                    slow_methods=SLOW_METHODS,
                    inner=[RefusalInterceptor(self.metrics)],
                )
            ],
            options=server_options(message_bytes_max, response_bytes_max),
        )
        self.stopping = asyncio.Event()
        self.audit = LedgerAudit(read_pool or pool, primary=pool, workers=audit_workers)
        service = LedgerService(
            self.store,
            self.audit,
            self.stopping,
            clock,
            cheaper_models,
        )
        pb_grpc.add_LedgerServiceServicer_to_server(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.auth = auth
        self.credentials = credentials  # TLS (and mTLS) for the port; None: plaintext
        self.port = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._held_refresher: asyncio.Task[None] | None = None

    async def start(self, address: str) -> int:
        self.port = (
            self.server.add_secure_port(address, self.credentials)
            if self.credentials
            else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        await self._set_serving(True)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="expiry-sweeper")
        if self.checkpoints.on:
            self._checkpointer = asyncio.create_task(self._checkpoint_forever(), name="checkpoints")
        if self.start_audit_workers:
            self._audit_starter = asyncio.create_task(
                self._start_audit_workers(), name="audit-workers"
            )
        if self.alerts is not None:
            self.alerts.start()
        if self.held_refresh_s is not None:
            self._held_refresher = asyncio.create_task(
                self.metrics.refresh_forever(self.store, self.held_refresh_s), name="held-gauge"
            )
        warn_if_off(self.auth, SERVICE_NAME, tls=self.credentials is not None, address=address)
        log.info("serving", address=address, port=self.port, tls=self.credentials is not None)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, refuse new calls with UNAVAILABLE, let calls in flight finish
        (up to `grace_s`; the rest are cancelled), then stop."""
        for task in (self._sweeper, self._held_refresher, self._checkpointer, self._audit_starter):
            if task is not None:
                await _end(task)
        await self._set_serving(False)
        self.stopping.set()
        if not await self.drain.drain(grace_s):
            log.warning("calls still in flight after the grace period are cancelled")
        await self.server.stop(0)
        self.audit.close()
        if self.auth is not None:
            await self.auth.close()
        if self.alerts is not None:
            await self.alerts.close()
        log.info("stopped")

    async def _start_audit_workers(self) -> None:
        """Best effort: a worker that cannot start now is started (or its failure reported)
        by the first verification."""
        try:
            pids = await self.audit.start_workers()
        except (OSError, RuntimeError, StoreUnavailable) as exc:
            log.warning("audit workers not started", error=str(exc))
        else:
            log.info("audit workers started", pids=pids)

    async def _set_serving(self, serving: bool) -> None:
        await set_ready(self.health, SERVICE_NAME, serving)

    def _appended(self, events: Sequence[Event]) -> None:
        """What a committed transaction appended: counted, and its alerts queued."""
        self.metrics.appended(events)
        if self.alerts is not None:
            self.alerts.observe(events)

    async def _checkpoint_forever(self) -> None:
        """Take the checkpoints that are due, one tenant at a time, in worker processes."""
        schedule = self.checkpoints
        while True:
            await asyncio.sleep(schedule.check_s)
            try:
                due = await self.audit.due_for_checkpoint(schedule.every_events, schedule.every_s)
                for tenant in due:
                    await self._take_checkpoint(tenant)
            except (CheckpointRefused, StoreUnavailable, OSError) as exc:
                log.warning("checkpoint not taken", error=str(exc))
            except Exception:
                log.exception("checkpoint failed")

    async def _take_checkpoint(self, tenant: str) -> None:
        report, made = await self.audit.checkpoint(tenant)
        if made is None:
            log.warning(
                "no checkpoint: the log does not verify",
                tenant=tenant,
                breaks=len(report.breaks),
                differences=len(report.differences),
            )
        else:
            log.info(
                "checkpoint taken",
                tenant=tenant,
                seq=made.seq,
                position=made.position,
                verified=report.events_checked,
            )

    async def _sweep_forever(self) -> None:
        """Expire overdue holds, and every KEY_PRUNE_INTERVAL_S prune expired idempotency keys
        and make the event partitions of the coming months; the health status follows whether
        the database answers."""
        next_prune = 0.0
        while True:
            try:
                expired = await self.store.expire_overdue()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + KEY_PRUNE_INTERVAL_S
                    if pruned := await self.store.prune_keys():
                        log.info("pruned expired idempotency keys", count=pruned)
                    if made := await partitions.create_ahead(self.pool, self.clock().date()):
                        log.info("made event partitions ahead", count=made)
            except (StoreUnavailable, OSError) as exc:
                log.warning("database unavailable", error=str(exc))
                await self._set_serving(False)
            except Exception:
                log.exception("expiry sweep failed")
            else:
                await self._set_serving(True)
                if expired:
                    log.info("expired overdue reservations", count=expired)
            await asyncio.sleep(self.sweep_interval_s)
