"""How the client reaches the ledger: the target, the credentials, default deadlines and the
retry policy, which is gRPC's own (a service config), not a loop of ours.

Retries: a call that ends `UNAVAILABLE` or `DEADLINE_EXCEEDED` (the server's, not the
client's own deadline, which bounds every attempt together) is sent again by gRPC with
exponential backoff — the same bytes, so the same idempotency key — up to `max_attempts`
times. Only calls that are safe to repeat get the policy: the writes that carry an
idempotency key (one key, one outcome: a repeat writes nothing and returns the first answer),
`Commit` and `Rollback` (idempotent on the reservation) and the unary reads. Streams are not
retried by gRPC: a broken `SubscribeEvents` resumes from its cursor, a replay from its
position.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services.client.errors import BadCredentials, BadTarget, from_rpc_error

SERVICE = "tokenledger.v1.LedgerService"
CONTEXT_SERVICE = "tokenledger.v1.ContextService"
KEYED_METHODS = (
    "Reserve",
    "ReserveBatch",
    "RecordUsage",
    "SetQuota",
    "SetRateLimit",
    "SetBudgetAlerts",
    "GrantTokens",
    "AdjustBalance",
)
"""Writes that carry an idempotency key (every item of ReserveBatch carries its own)."""
IDEMPOTENT_METHODS = ("Commit", "Rollback", "CommitBatch", "RollbackBatch")
"""Idempotent on the reservation: a repeat returns the first response."""
READ_METHODS = ("GetReservation", "GetBalance", "QueryUsage", "VerifyAudit")
CONTEXT_METHODS = ("CountTokens", "PrepareContext")
"""A count is a read; PrepareContext carries an idempotency key (one key, one hold)."""
RETRYABLE_STATUS_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")

TIMEOUT_S_DEFAULT = 10.0
"""Deadline of a unary call when the caller gives none."""
STREAM_TIMEOUT_S_DEFAULT = 3600.0
"""Deadline of a server stream (the server ends its own at TOKENLEDGER_STREAM_DEADLINE_S)."""
MAX_ATTEMPTS_DEFAULT = 4
MAX_ATTEMPTS_MAX = 5
"""gRPC caps maxAttempts at 5 whatever the service config says."""
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
MESSAGE_BYTES_MAX = 4 * 1024 * 1024
"""The largest response the client accepts (a batch of 100 with balances fits)."""

_API_KEY = re.compile(r"tlk_[0-9a-f]{16}_[0-9a-f]{64}")
_HOST_PORT = re.compile(r"(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def service_config(max_attempts: int = MAX_ATTEMPTS_DEFAULT) -> str:
    """The service config JSON: the retry policy on every method safe to repeat."""
    if not 1 <= max_attempts <= MAX_ATTEMPTS_MAX:
        raise ValueError(f"max_attempts must be 1 to {MAX_ATTEMPTS_MAX}, got {max_attempts}")
    names = [
        {"service": SERVICE, "method": m}
        for m in (*KEYED_METHODS, *IDEMPOTENT_METHODS, *READ_METHODS)
    ]
    names += [{"service": CONTEXT_SERVICE, "method": m} for m in CONTEXT_METHODS]
    config: dict[str, Any] = {"methodConfig": [{"name": names}]}
    if max_attempts > 1:
        config["methodConfig"][0]["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": f"{INITIAL_BACKOFF_S}s",
            "maxBackoff": f"{MAX_BACKOFF_S}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": list(RETRYABLE_STATUS_CODES),
        }
    return json.dumps(config)


class ContextChannels:
    """The context service's clients: their settings, and a blocking and an asyncio channel,
    each opened on first use."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        """`kwargs`: api_key, tls, root_certificates, client_certificate, client_key,
        timeout_s, max_attempts — as LedgerClient takes them."""
        self.settings = Settings(target, **kwargs)
        self._sync: grpc.Channel | None = None
        self._async: grpc.aio.Channel | None = None

    def _channel(self) -> grpc.Channel:
        if self._sync is None:
            self._sync = self.settings.channel()
        return self._sync

    def _achannel(self) -> grpc.aio.Channel:
        if self._async is None:
            self._async = self.settings.aio_channel()
        return self._async

    def _unary(self, method: str, request: Any) -> Any:
        """ContextService.`method`(request) with the settings' deadline and credentials; its
        failure as a LedgerError subclass."""
        rpc = getattr(cpb_grpc.ContextServiceStub(self._channel()), method)
        try:
            return rpc(request, timeout=self.settings.timeout_s, metadata=self.settings.metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.settings.target) from None

    async def _aunary(self, method: str, request: Any) -> Any:
        """`_unary` on asyncio."""
        rpc = getattr(cpb_grpc.ContextServiceStub(self._achannel()), method)
        try:
            return await rpc(
                request, timeout=self.settings.timeout_s, metadata=self.settings.metadata()
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.settings.target) from None

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.close()


def check_target(target: str) -> str:
    """`host:port`, `[v6]:port` or a gRPC URI (`dns:`, `unix:`, …); anything else is refused
    here rather than failing later as an unreachable server."""
    if not isinstance(target, str) or not target.strip():
        raise BadTarget("the ledger target is empty: give host:port, e.g. 127.0.0.1:50051")
    if any(c.isspace() for c in target):
        raise BadTarget(f"the ledger target {target!r} contains whitespace")
    if target.startswith(_SCHEMES):
        return target
    match = _HOST_PORT.fullmatch(target)
    if match is None or not 0 < int(match.group(1)) < 65536:
        raise BadTarget(
            f"the ledger target {target!r} is not host:port (port 1-65535) or a gRPC URI "
            f"({', '.join(_SCHEMES)})"
        )
    return target


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadCredentials(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from None


@dataclass(frozen=True)
class Settings:
    """Everything a client needs to dial: see LedgerClient for each field."""

    target: str
    api_key: str | None = None
    tls: bool = False
    root_certificates: str | Path | None = None
    client_certificate: str | Path | None = None
    client_key: str | Path | None = None
    timeout_s: float = TIMEOUT_S_DEFAULT
    stream_timeout_s: float = STREAM_TIMEOUT_S_DEFAULT
    max_attempts: int = MAX_ATTEMPTS_DEFAULT
    caller: str = ""

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.api_key is not None and not _API_KEY.fullmatch(self.api_key):
            shown = "empty" if not self.api_key else "malformed"
            raise BadCredentials(
                f"the API key is {shown}: expected tlk_<16 hex>_<64 hex> as `tokenledger keys "
                "create` prints it (or api_key=None when the ledger runs without auth)"
            )
        if (self.client_certificate is None) != (self.client_key is None):
            raise BadCredentials("client_certificate and client_key go together (mTLS)")
        if self.timeout_s <= 0 or self.stream_timeout_s <= 0:
            raise ValueError("timeouts must be positive seconds")
        service_config(self.max_attempts)  # refuses a bad count now

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None or self.client_certificate is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates, "root_certificates"),
            private_key=_read(self.client_key, "client_key"),
            certificate_chain=_read(self.client_certificate, "client_certificate"),
        )

    def options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(self.max_attempts)),
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
        ]

    def channel(self) -> grpc.Channel:
        """A blocking channel to the target as these settings say."""
        if self.secure:
            return grpc.secure_channel(self.target, self.credentials(), options=self.options())
        return grpc.insecure_channel(self.target, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel to the target as these settings say."""
        if self.secure:
            return grpc.aio.secure_channel(self.target, self.credentials(), options=self.options())
        return grpc.aio.insecure_channel(self.target, options=self.options())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        if self.api_key:
            out.append(("authorization", f"Bearer {self.api_key}"))
        if self.caller:
            out.append(("x-caller", self.caller))
        return tuple(out)

    def timeout(self, timeout_s: float | None, stream: bool = False) -> float:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        return timeout_s or (self.stream_timeout_s if stream else self.timeout_s)
