"""The serve loop of both processes: the options every server of ours gets, and serving until
SIGTERM or SIGINT, then stopping gracefully."""

from __future__ import annotations

import asyncio
import errno
import gc
import signal
import socket
from collections.abc import Sequence
from typing import Protocol

import structlog
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
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

LIVENESS = "liveness"
"""A health service name that says only that the process serves, for liveness probes: "" and
the service's own name (readiness) go NOT_SERVING while what it depends on is away (the
ledger's database, the context service's ledger), which a restart cannot fix."""


gc_young_threshold = 10_000
"""Container allocations (net of frees) between two collections of the youngest generation,
once serving (Python's default: 700). A call's objects are mostly freed by reference counting
when it ends; at 700 the collector ran about every eighth call, walking the objects of every
call in flight. Under the 64-client bench (gc.callbacks timing the collections, serving only)
that was 31-32 µs of collection per RPC; at 10,000, 2-12 µs in 5-6 collections a run. Cyclic
garbage waits that much longer to be freed: a few MB at most."""


class StartupFailure(Exception):
    """A server cannot start; the message is one line saying why and which setting to change.
    Its process prints it and exits with STARTUP_FAILED_EXIT_CODE, no traceback."""


STARTUP_FAILED_EXIT_CODE = 2
_BIND_ERRORS = {
    errno.EADDRINUSE: "is taken",
    errno.EADDRNOTAVAIL: "is not an address of this machine",
    errno.EACCES: "needs privileges (a port below 1024)",
}


def bind_problem(address: str) -> str | None:
    """Why a server could not listen on `address` (host:port) now, or None if it could. It
    binds as gRPC does (SO_REUSEADDR: a port in TIME_WAIT is free, one with a listener is
    not) and lets go at once."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError):
        return "is not a host:port this machine can resolve"
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                return _BIND_ERRORS.get(exc.errno or 0, f"cannot be bound ({exc.strerror})")
    return None


def check_listen(what: str, address: str, setting: str) -> None:
    """StartupFailure naming `setting` when `what` (e.g. "ledger") cannot listen on `address`."""
    problem = bind_problem(address)
    if problem is not None:
        raise StartupFailure(f"{what}: {address} {problem}; set {setting} to a free host:port")


class _Serving(Protocol):
    async def start(self, address: str) -> int: ...
    async def stop(self, grace_s: float) -> None: ...


async def serve_until_signalled(
    server: _Serving, address: str, grace_s: float, *, what: str, setting: str
) -> None:
    """Start `server` on `address`, serve until SIGTERM or SIGINT, then stop it gracefully
    (calls in flight get up to `grace_s`). StartupFailure, naming `setting`, when it cannot
    listen there."""
    check_listen(what, address, setting)  # gRPC's own refusal says neither why nor what to do
    try:
        await server.start(address)
    except (OSError, RuntimeError) as exc:  # taken in the moment since the check
        raise StartupFailure(f"{what}: cannot listen on {address} ({exc}); set {setting}") from exc
    # What start-up built (modules, descriptors, pools) lives as long as the process: moved out
    # of the collector's generations, a full collection no longer walks it.
    gc.freeze()
    gc.set_threshold(gc_young_threshold, *gc.get_threshold()[1:])
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


async def set_ready(checks: health.aio.HealthServicer, service_name: str, ready: bool) -> None:
    """Readiness, as the server ("") and its service report it: SERVING or NOT_SERVING.
    Liveness (LIVENESS) is set apart: a server not ready is still alive."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if ready
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", service_name):
        await checks.set(name, status)
