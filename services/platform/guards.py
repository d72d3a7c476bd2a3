"""Guards against hostile or runaway callers: every call ends (a server default deadline when
the client set none) and no caller holds more than its share of the server (a cap on calls in
flight per caller). Both apply to the service's own methods; health and reflection stay
answered.

Who a caller is: `caller_of(context)`. Once callers authenticate, the auth interceptor (which
runs before these) sets `PRINCIPAL` to the key id for the call, and that is the caller. Until
then a caller names itself with the `x-caller` metadata (cooperative: it bounds runaway clients,
not malicious ones), and failing that it is its peer host (all connections of one host share
the cap; behind a proxy, the proxy's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from services.platform.errors import InvalidRequest, ServerDeadlineExceeded, TooManyCalls
from services.platform.interceptors import UnaryBehavior, _Interceptor, _wrap

Context = grpc.aio.ServicerContext[Any, Any]

PRINCIPAL: ContextVar[str] = ContextVar("tokenledger_principal", default="")
"""The authenticated key id of the current call; set by the auth interceptor, "" without."""
CALLER_METADATA_KEY = "x-caller"
caller_chars_max = 128
"""A caller's name as kept and reported; longer `x-caller` values are cut."""

deadline_s_default = 30.0
"""Unary calls without a client deadline."""
stream_deadline_s_default = 3_600.0
"""Server streams (and slow unary calls such as VerifyAudit) without a client deadline."""
caller_calls_max_default = 256
"""Calls in flight per caller; above every test's and bench's 64 concurrent clients."""
too_many_calls_retry_s = 0.2
"""RetryInfo of a TOO_MANY_CALLS refusal: about one short call's time."""


@dataclass(frozen=True)
class Guards:
    """Settings of the guard interceptors. `caller_calls_max` 0 turns the cap off."""

    deadline_s: float = deadline_s_default
    stream_deadline_s: float = stream_deadline_s_default
    caller_calls_max: int = caller_calls_max_default

    def interceptors(self, prefix: str, slow_methods: Collection[str] = ()) -> list[_Interceptor]:
        """The guards for the methods under `prefix` ("/pkg.Service/"), outermost first
        (a refused call never starts its deadline clock); after authentication, so that the
        caller is known. UndecodableRequestInterceptor goes before authentication."""
        return [
            ConcurrencyInterceptor(prefix, self.caller_calls_max),
            DeadlineInterceptor(prefix, self.deadline_s, self.stream_deadline_s, slow_methods),
        ]


def caller_of(context: Context) -> str:
    """Who the call counts against: `key:<id>` when authenticated, else `caller:<x-caller>`,
    else `peer:<host>` (the port is left out: it changes with every connection)."""
    principal = PRINCIPAL.get()
    if principal:
        return f"key:{principal}"[:caller_chars_max]
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_METADATA_KEY and isinstance(value, str) and value:
            return f"caller:{value}"[:caller_chars_max]
    peer = context.peer() or "unknown"  # e.g. ipv4:127.0.0.1:5000, ipv6:[::1]:5000, unix:/x
    host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return f"peer:{host}"[:caller_chars_max]


class Undecodable:
    """What the request deserializer yields for bytes that are not the method's message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # DecodeError mostly; whatever it is, the bytes are at fault
            return Undecodable(str(exc) or type(exc).__name__)

    return deserialize


class UndecodableRequestInterceptor(_Interceptor):
    """Bytes that do not parse as the request message (bad wire format, a string field that
    is not UTF-8) are INVALID_ARGUMENT. gRPC itself would answer UNKNOWN, quoting the
    exception. Every unary-request method, so health checks too."""

    def apply(self, handler: Any, method: str) -> Any:
        if handler is None or handler.request_streaming:
            return handler
        handler = handler._replace(request_deserializer=_safe(handler.request_deserializer))
        return _wrap(handler, method, self.wrap)

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        async def parsed(request: Any, context: Context) -> Any:
            if isinstance(request, Undecodable):
                raise InvalidRequest(
                    f"the request is not a valid message of {method}: {request.error}",
                    metadata={"method": method},
                    violations=[("", f"does not parse: {request.error}")],
                )
            return await behavior(request, context)

        return parsed


class ConcurrencyInterceptor(_Interceptor):
    """At most `calls_max` calls of one caller in flight (streams count while they run); the
    next is refused at once with RESOURCE_EXHAUSTED, reason TOO_MANY_CALLS, and RetryInfo.
    Other callers are unaffected. One event loop, so plain counters suffice."""

    def __init__(self, prefix: str, calls_max: int) -> None:
        self.prefix = prefix
        self.calls_max = calls_max
        self.in_flight: dict[str, int] = {}

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        if self.calls_max <= 0 or not method.startswith(self.prefix):
            return behavior

        async def capped(request: Any, context: Context) -> Any:
            caller = caller_of(context)
            count = self.in_flight.get(caller, 0)
            if count >= self.calls_max:
                raise TooManyCalls(
                    f"{caller} has {count} calls in flight, the most one caller may have; "
                    "wait for one to finish, then retry",
                    metadata={
                        "caller": caller,
                        "in_flight": str(count),
                        "calls_max": str(self.calls_max),
                    },
                    retry_after_s=too_many_calls_retry_s,
                )
            self.in_flight[caller] = count + 1
            try:
                return await behavior(request, context)
            finally:
                left = self.in_flight[caller] - 1
                if left:
                    self.in_flight[caller] = left
                else:
                    del self.in_flight[caller]

        return capped


class DeadlineInterceptor(_Interceptor):
    """A call whose client set no deadline gets the server's: `unary_s` for unary calls,
    `stream_s` for server streams and `slow_methods` (bare names, e.g. "VerifyAudit"). When it
    passes, the call is cancelled and ends DEADLINE_EXCEEDED, as a client deadline would end it
    (a write cancelled while queued has no effect; once its transaction started, all of it)."""

    def __init__(
        self, prefix: str, unary_s: float, stream_s: float, slow_methods: Collection[str] = ()
    ) -> None:
        self.prefix = prefix
        self.unary_s = unary_s
        self.stream_s = stream_s
        self.slow = frozenset(f"{prefix}{name}" for name in slow_methods)

    def apply(self, handler: Any, method: str) -> Any:
        if handler is None or not method.startswith(self.prefix):
            return handler
        long = bool(handler.unary_stream) or method in self.slow
        limit_s = self.stream_s if long else self.unary_s
        return _wrap(handler, method, lambda b, _m: self._bounded(b, limit_s))

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        return self._bounded(behavior, self.unary_s)

    @staticmethod
    def _bounded(behavior: UnaryBehavior, limit_s: float) -> UnaryBehavior:
        async def bounded(request: Any, context: Context) -> Any:
            if context.time_remaining() is not None:
                return await behavior(request, context)
            timeout = asyncio.timeout(limit_s)
            try:
                async with timeout:
                    return await behavior(request, context)
            except TimeoutError:
                if not timeout.expired():
                    raise
            raise ServerDeadlineExceeded(
                f"the call set no deadline and ran past the server's default of {limit_s:g} s; "
                "set a deadline (and retry with the same idempotency key)",
                metadata={"deadline_s": f"{limit_s:g}", "source": "server default"},
            )

        return bounded
