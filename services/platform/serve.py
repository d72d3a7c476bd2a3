"""The serve loop of both processes: the options every server of ours gets, and serving until
SIGTERM or SIGINT, then stopping gracefully."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Sequence
from typing import Protocol

import structlog
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry.metrics import MeterProvider

from services.platform.auth import Authenticator, AuthInterceptor
from services.platform.guards import Guards, UndecodableRequestInterceptor
from services.platform.interceptors import (
    DrainInterceptor,
    ErrorInterceptor,
    LoggingInterceptor,
    Pipeline,
    TracingInterceptor,
    _Interceptor,
)
from services.platform.metrics import RpcMetricsInterceptor

log = structlog.get_logger("tokenledger.server")


class _Serving(Protocol):
    async def start(self, address: str) -> int: ...
    async def stop(self, grace_s: float) -> None: ...


async def serve_until_signalled(server: _Serving, address: str, grace_s: float) -> None:
    """Start `server` on `address`, serve until SIGTERM or SIGINT, then stop it gracefully
    (calls in flight get up to `grace_s`)."""
    await server.start(address)
    # What start-up built (modules, descriptors, pools) lives as long as the process: moved out
    # of the collector's generations, a full collection no longer walks it.
    gc.freeze()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down", grace_s=grace_s)
    await server.stop(grace_s)


def call_path(
    service: ServiceDescriptor,
    drain: DrainInterceptor,
    guards: Guards,
    *,
    meter_provider: MeterProvider | None,
    auth: Authenticator | None,
    slow_methods: Sequence[str] = (),
    inner: Sequence[_Interceptor] = (),
) -> Pipeline:
    """What every call to a server of ours passes through, outermost first, as its one
    interceptor; `inner` layers go last, next to the servicer."""
    return Pipeline(
        [
            RpcMetricsInterceptor(meter_provider),
            TracingInterceptor(),
            LoggingInterceptor(),
            ErrorInterceptor(),  # the boundary: every refusal raised below ends here
            drain,
            UndecodableRequestInterceptor(),  # before auth, which reads the request
            *([AuthInterceptor(auth, [service])] if auth else []),
            *guards.interceptors(f"/{service.full_name}/", slow_methods),
            *inner,
        ]
    )


def server_options(
    message_bytes_max: int, response_bytes_max: int | None = None
) -> list[tuple[str, int]]:
    """Options of every server of ours: requests up to `message_bytes_max`, responses up to
    `response_bytes_max` (default the same). gRPC sets SO_REUSEPORT by default: a second
    server (another process, or a test's) could then bind the same port and take half the
    calls. One port, one server."""
    return [
        ("grpc.max_receive_message_length", message_bytes_max),
        ("grpc.max_send_message_length", response_bytes_max or message_bytes_max),
        ("grpc.so_reuseport", 0),
    ]
