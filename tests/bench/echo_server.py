"""The transport's ceiling for `make bench`: a bare `grpc.aio` server in its own process, with
one unary method that returns the request's bytes, no interceptors, no protobuf and no
database. What a Python gRPC server on this machine can answer at most; the ledger's RPC/s are
divided by it.

`python -m tests.bench.echo_server PORT` serves until killed.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

METHOD = "/bench.Echo/Echo"


def _identity(data: bytes) -> bytes:
    return data


async def _echo(request: bytes, context: Any) -> bytes:
    return request


class _Handler(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self._echo = grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=_identity, response_serializer=_identity
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._echo if handler_call_details.method == METHOD else None


async def serve(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Handler(),))
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def echo_stub(channel: grpc.aio.Channel) -> Any:
    """The client side: a callable taking and returning bytes."""
    return channel.unary_unary(METHOD, request_serializer=_identity,
                               response_deserializer=_identity)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
