"""The servers' one interceptor (services/platform/interceptors.py Pipeline), on a real
grpc.aio server: its layers run outermost first on every call, but are composed once per
method, not per call; a method nobody serves stays UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.platform.interceptors import Pipeline, UnaryBehavior, _Interceptor


class _Counting(_Interceptor):
    def __init__(self, name: str, trail: list[str]) -> None:
        self.name, self.trail = name, trail
        self.applied = 0

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        self.applied += 1

        async def counted(request: Any, context: Any) -> Any:
            self.trail.append(self.name)
            return await behavior(request, context)

        return counted


async def _serve_and_call(layers: list[_Interceptor], calls: int) -> grpc.StatusCode:
    server = grpc.aio.server(interceptors=[Pipeline(layers)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(calls):
                await stub.Check(health_pb2.HealthCheckRequest())
            unknown = channel.unary_unary("/no.Such/Method")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await unknown(b"")
            return refused.value.code()
    finally:
        await server.stop(0)


def test_layers_run_outermost_first_on_every_call_and_are_composed_once() -> None:
    trail: list[str] = []
    outer, inner = _Counting("outer", trail), _Counting("inner", trail)
    unknown = asyncio.run(_serve_and_call([outer, inner], calls=5))
    assert trail == ["outer", "inner"] * 5
    assert (outer.applied, inner.applied) == (1, 1)
    assert unknown is grpc.StatusCode.UNIMPLEMENTED
