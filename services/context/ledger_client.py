"""The context service's client of the ledger: gRPC, as any other backend would call it.

Every call carries the caller's W3C trace context (so one trace spans both services), a deadline,
and whatever metadata `call_metadata` returns: the service's own API key (#6), over TLS with its
own client certificate when `credentials` are given. A failed call raises LedgerCallError with
the ledger's status code, message and google.rpc details, so they can be passed on unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import propagate, trace

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc

DETAILS_KEY = "grpc-status-details-bin"
LEDGER_TIMEOUT_S_DEFAULT = 5.0

MetadataProvider = Callable[[], Sequence[tuple[str, str]]]
Reply = TypeVar("Reply")

tracer = trace.get_tracer("tokenledger.context.ledger_client")


class LedgerCallError(Exception):
    """A ledger call failed; `status` is its google.rpc.Status (details included)."""

    def __init__(self, code: grpc.StatusCode, message: str, status: status_pb2.Status) -> None:
        self.code = code
        self.message = message
        self.status = status
        super().__init__(f"{code.name}: {message}")

    @property
    def reason(self) -> str:
        """The ErrorInfo reason the ledger gave, or "" if none."""
        for detail in self.status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason)
        return ""

    @classmethod
    def from_rpc_error(cls, exc: grpc.aio.AioRpcError) -> LedgerCallError:
        code, message = exc.code(), exc.details() or ""
        for key, value in exc.trailing_metadata() or ():
            if key == DETAILS_KEY and isinstance(value, bytes):
                return cls(code, message, status_pb2.Status.FromString(value))
        return cls(code, message, status_pb2.Status(code=code.value[0], message=message))


def _method_name(method: str | bytes) -> str:
    return (method.decode() if isinstance(method, bytes) else method).lstrip("/")


class _OutgoingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """A client span per call, its trace context injected into the metadata, and a deadline."""

    def __init__(self, timeout_s: float, call_metadata: MetadataProvider | None) -> None:
        self._timeout_s = timeout_s
        self._call_metadata = call_metadata

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        name = _method_name(client_call_details.method)
        service, _, method = name.partition("/")
        with tracer.start_as_current_span(
            name,
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        ) as span:
            metadata = list(client_call_details.metadata or ())
            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # traceparent (and tracestate) of this client span
            metadata.extend(carrier.items())
            if self._call_metadata is not None:
                metadata.extend(self._call_metadata())
            details = grpc.aio.ClientCallDetails(
                method=client_call_details.method,
                timeout=client_call_details.timeout or self._timeout_s,
                metadata=grpc.aio.Metadata(*metadata),
                credentials=client_call_details.credentials,
                wait_for_ready=client_call_details.wait_for_ready,
            )
            call = await continuation(details, request)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code().name))
                raise
            span.set_attribute("rpc.grpc.status_code", 0)
            return call


class LedgerClient:
    """An async client of LedgerService; create and use it on one event loop."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = LEDGER_TIMEOUT_S_DEFAULT,
        call_metadata: MetadataProvider | None = None,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        interceptors = [_OutgoingInterceptor(timeout_s, call_metadata)]
        self._channel = (
            grpc.aio.secure_channel(
                target, credentials, options=list(options), interceptors=interceptors
            )
            if credentials
            else grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
        )
        self._stub = pb_grpc.LedgerServiceStub(self._channel)

    async def _call(
        self, rpc: Callable[..., Awaitable[Reply]], request: Any, timeout_s: float | None
    ) -> Reply:
        """One call with a deadline: the client's timeout, or the caller's if it is sooner."""
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        try:
            return await rpc(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise LedgerCallError.from_rpc_error(exc) from None

    async def reserve(
        self, request: pb.ReserveRequest, timeout_s: float | None = None
    ) -> pb.ReserveResponse:
        return await self._call(self._stub.Reserve, request, timeout_s)

    async def commit(
        self, request: pb.CommitRequest, timeout_s: float | None = None
    ) -> pb.CommitResponse:
        return await self._call(self._stub.Commit, request, timeout_s)

    async def rollback(
        self, request: pb.RollbackRequest, timeout_s: float | None = None
    ) -> pb.RollbackResponse:
        return await self._call(self._stub.Rollback, request, timeout_s)

    async def record_usage(
        self, request: pb.RecordUsageRequest, timeout_s: float | None = None
    ) -> pb.RecordUsageResponse:
        return await self._call(self._stub.RecordUsage, request, timeout_s)

    async def close(self) -> None:
        await self._channel.close()
