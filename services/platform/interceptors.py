"""Server interceptors: tracing (outermost), logging, the error boundary (every refusal raised
by the interceptors inside it or by a servicer becomes its status here), draining.

Each wraps the unary-unary and unary-stream behaviours of a handler; streaming-request
handlers (reflection) pass through untouched.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # ExecuteBatchError: not exported
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from services.platform.errors import InternalError, ShuttingDown, abort_arguments, refusal
from services.platform.observability import bind_call, log_rpc, unbind_call

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Wrapper = Callable[[UnaryBehavior, str], UnaryBehavior]
if TYPE_CHECKING:  # grpc's handler type is generic only in its stubs
    Continuation = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]

log = structlog.get_logger("tokenledger.rpc")
tracer = trace.get_tracer("tokenledger.rpc")
_ids = RandomIdGenerator()


def _wrap(handler: Any, method: str, wrap: Wrapper) -> Any:
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        stream = handler.unary_stream
        writer = stream
        if inspect.isasyncgenfunction(stream):
            # A servicer's async generator becomes a coroutine that writes each item, which
            # wrappers can await; an inner interceptor may already have done so.
            async def writer(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                async for item in stream(request, context):
                    await context.write(item)

        return grpc.unary_stream_rpc_method_handler(
            wrap(writer, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class _Interceptor:
    """One concern of the call path (a layer): `wrap` decorates a method's unary behaviour,
    `apply` its whole handler. A server runs its layers through one `Pipeline`, its only
    gRPC interceptor."""

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        raise NotImplementedError

    def apply(self, handler: Any, method: str) -> Any:
        return _wrap(handler, method, self.wrap)


class Pipeline(grpc.aio.ServerInterceptor):
    """The server's one interceptor: its layers (outermost first) composed once per method
    and kept, so that a call pays for what the layers do, not for building them. gRPC would
    otherwise run every interceptor and rebuild every wrapper on every call."""

    def __init__(self, layers: Sequence[_Interceptor]) -> None:
        self.layers = tuple(layers)
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        handler: Any = self._handlers.get(method)
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
                return handler  # type: ignore[return-value]
            for layer in reversed(self.layers):
                handler = layer.apply(handler, method)
            self._handlers[method] = handler
        return handler  # type: ignore[no-any-return]


def _code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class TracingInterceptor(_Interceptor):
    """A server span per RPC, continuing the caller's W3C trace context. While no span
    processor is configured (TOKENLEDGER_TRACE_EXPORTER=none) a span would be built only to be
    dropped: the call then carries the caller's trace context, or a new trace id, without a
    span, so that its log line and its events still name the trace."""

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        service, _, name = method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            if not _exporting_spans():
                token = otel_context.attach(_unrecorded(carrier))
                try:
                    return await behavior(request, context)
                finally:
                    otel_context.detach(token)
            with tracer.start_as_current_span(
                method.lstrip("/"),
                context=propagate.extract(carrier),
                kind=trace.SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await behavior(request, context)
                finally:
                    code = _code(context)
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code not in (grpc.StatusCode.OK,):
                        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))

        return traced


def _exporting_spans() -> bool:
    """Whether the SDK's tracer provider has a span processor (any provider that is not the
    SDK's counts as exporting). Read per call: a processor may be added at any time."""
    active = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    processors = getattr(active, "_span_processors", None)
    return processors is None or bool(processors)


def _unrecorded(carrier: dict[str, str]) -> otel_context.Context:
    """The caller's trace context, or a new trace with a random id, holding no span."""
    if "traceparent" in carrier:
        extracted = propagate.extract(carrier)
        if trace.get_current_span(extracted).get_span_context().is_valid:
            return extracted
    new = trace.SpanContext(
        trace_id=_ids.generate_trace_id(),
        span_id=_ids.generate_span_id(),
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(new))


class LoggingInterceptor(_Interceptor):
    """One structured line per RPC: rpc, tenant, status, duration, request and trace ids."""

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        async def logged(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = dict(context.invocation_metadata() or ())
            request_id = str(metadata.get("x-request-id") or os.urandom(16).hex())
            span_ctx = trace.get_current_span().get_span_context()
            token = bind_call(
                {
                    "request_id": request_id,
                    "trace_id": format(span_ctx.trace_id, "032x") if span_ctx.is_valid else "",
                    "rpc": method,
                    "tenant_id": getattr(request, "tenant_id", "")
                    or getattr(getattr(request, "query", None), "tenant_id", ""),
                }
            )
            started = time.perf_counter()
            try:
                return await behavior(request, context)
            finally:
                code = _code(context)
                fields = {
                    "status": code.name,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                }
                if code is grpc.StatusCode.OK:
                    log_rpc(log, logging.INFO, fields)
                else:
                    log_rpc(log, logging.WARNING, {**fields, "error": context.details()})
                unbind_call(token)

        return logged


class ErrorInterceptor(_Interceptor):
    """The one error boundary: a refusal raised anywhere inside it (draining, a request that
    does not parse, auth, guards, a servicer, the ledger) ends the call with its status from
    services/platform/errors.py TABLE. Anything unexpected ends INTERNAL with no internals in
    the message, and is logged with its traceback. Inside logging, tracing and the RPC
    metrics, so that they see the status it sets."""

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        async def mapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, context)
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as exc:
                if _ended_by_client(exc, context):
                    log.info("call ended by the client", reason="deadline or cancel")
                    return None
                refused = refusal(exc)
                if refused is None:
                    log.exception("unhandled error")
                    refused = InternalError("internal error; see server log")
                await context.abort(*abort_arguments(refused))

        return mapped


def _ended_by_client(exc: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """A write that failed because the client went away (its deadline passed, it cancelled):
    the call is over, nobody can be told, and no error happened on our side."""
    return isinstance(exc, cygrpc.ExecuteBatchError) or context.cancelled()


class DrainInterceptor(_Interceptor):
    """Counts calls in flight; once draining, new calls to `prefix` services are refused with
    UNAVAILABLE, reason SHUTTING_DOWN (retryable, unlike the CANCELLED gRPC gives calls arriving
    mid-shutdown) while those in flight finish. Health and reflection stay answered."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        if not method.startswith(self.prefix):
            return behavior

        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self.draining:
                raise ShuttingDown("server is shutting down; retry elsewhere")
            self._in_flight += 1
            self._idle.clear()
            try:
                return await behavior(request, context)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

        return counted

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new calls and wait for those in flight; False if some outlived `timeout_s`."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
