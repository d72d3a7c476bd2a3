"""A real gRPC server in front of the ledger that forwards every call as bytes and can make
the first attempts of chosen methods fail UNAVAILABLE: before forwarding them (the request
was lost) or after the ledger answered (the reply was lost, the write done). It records what
each attempt carried, so a test can prove a retry sent the very same request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

LOSE_REQUEST, LOSE_REPLY = "request", "reply"


class FlakyProxy(grpc.GenericRpcHandler):
    def __init__(
        self, upstream: str, failures: dict[str, int] | None = None, lose: str = ""
    ) -> None:
        """`failures`: method name (e.g. "Reserve") -> how many attempts to fail; `lose`:
        LOSE_REQUEST or LOSE_REPLY."""
        self.upstream = upstream
        self.failures = dict(failures or {})
        self.lose = lose or LOSE_REPLY
        self.attempts: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FlakyProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)
        self._channel.close()

    def sent(self, method: str) -> list[bytes]:
        """The bytes of every attempt of `method` that reached the proxy, in order."""
        return [body for name, body in self.attempts if name == method]

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        if method.endswith(("ReplayHistory", "ExportUsage", "SubscribeEvents")):
            return grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: self._stream(method, req, ctx)
            )
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(method, req, ctx))

    def _should_fail(self, name: str) -> bool:
        with self._lock:
            if self.failures.get(name, 0) > 0:
                self.failures[name] -= 1
                return True
            return False

    @staticmethod
    def _metadata(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in context.invocation_metadata() if not k.startswith("grpc-")]

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        name = method.rsplit("/", 1)[-1]
        with self._lock:
            self.attempts.append((name, request))
        fail = self._should_fail(name)
        if fail and self.lose == LOSE_REQUEST:
            context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: the request was lost")
        try:
            reply: bytes = self._channel.unary_unary(method)(
                request, timeout=context.time_remaining(), metadata=self._metadata(context)
            )
        except grpc.RpcError as exc:
            self._relay(exc, context)
        if fail:
            context.abort(
                grpc.StatusCode.UNAVAILABLE, "proxy: the ledger answered, the reply was lost"
            )
        return reply

    def _stream(
        self, method: str, request: bytes, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        try:
            yield from self._channel.unary_stream(method)(
                request, timeout=context.time_remaining(), metadata=self._metadata(context)
            )
        except grpc.RpcError as exc:
            self._relay(exc, context)

    @staticmethod
    def _relay(exc: grpc.RpcError, context: grpc.ServicerContext) -> Any:
        call: Any = exc
        context.set_trailing_metadata(call.trailing_metadata() or ())
        context.abort(call.code(), call.details() or "")
