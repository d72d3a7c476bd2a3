"""The ledger gRPC server: the service, health checking, reflection, the expiry sweeper and a
graceful stop (in-flight calls finish within the grace period)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from psycopg_pool import AsyncConnectionPool

from ledger.audit import LedgerAudit
from ledger.errors import StoreUnavailable
from ledger.store import LedgerStore, utc_now
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.interceptors import (
    DrainInterceptor,
    ErrorInterceptor,
    LoggingInterceptor,
    TracingInterceptor,
)
from services.ledger_service import LedgerService

log = structlog.get_logger("tokenledger.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LedgerService"].full_name
message_bytes_max = 1 << 20


def server_options(message_bytes_max: int) -> list[tuple[str, int]]:
    """Options of every server of ours. gRPC sets SO_REUSEPORT by default: a second server
    (another process, or a test's) could then bind the same port and take half the calls.
    One port, one server."""
    return [
        ("grpc.max_receive_message_length", message_bytes_max),
        ("grpc.max_send_message_length", message_bytes_max),
        ("grpc.so_reuseport", 0),
    ]


class LedgerServer:
    """A running ledger server bound to one address; `port` is the one actually bound."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        sweep_interval_s: float = 1.0,
        clock: Callable[[], datetime] = utc_now,
        cheaper_models: Mapping[str, str] | None = None,
    ) -> None:
        self.pool = pool
        self.store = LedgerStore(pool, clock=clock)
        self.sweep_interval_s = sweep_interval_s
        self.health = health.aio.HealthServicer()
        self.drain = DrainInterceptor(f"/{SERVICE_NAME}/")
        self.server = grpc.aio.server(
            interceptors=[
                TracingInterceptor(),
                LoggingInterceptor(),
                self.drain,
                ErrorInterceptor(),
            ],
            options=server_options(message_bytes_max),
        )
        self.stopping = asyncio.Event()
        service = LedgerService(self.store, LedgerAudit(pool), self.stopping, clock, cheaper_models)
        pb_grpc.add_LedgerServiceServicer_to_server(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, address: str) -> int:
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        await self._set_serving(True)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="expiry-sweeper")
        log.info("serving", address=address, port=self.port)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, refuse new calls with UNAVAILABLE, let calls in flight finish
        (up to `grace_s`; the rest are cancelled), then stop."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self._set_serving(False)
        self.stopping.set()
        if not await self.drain.drain(grace_s):
            log.warning("calls still in flight after the grace period are cancelled")
        await self.server.stop(0)
        log.info("stopped")

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _sweep_forever(self) -> None:
        """Expire overdue holds; the health status follows whether the database answers."""
        while True:
            try:
                expired = await self.store.expire_overdue()
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
