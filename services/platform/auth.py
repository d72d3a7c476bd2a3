"""Who is calling, and may they (issue #6): API keys and mTLS client certificates, the roles
each RPC needs (declared beside the RPC in the protos: the `tokenledger.v1.access` method option
of proto/tokenledger/v1/options.proto), and the interceptor that enforces role and tenant on
every call of the services it is given. Health checking and reflection stay open.

Identities live in the `api_keys` table (migration 0005): an API key (`tlk_<id>_<secret>`,
stored as the sha256 of its secret) or a registered client certificate CN, each with a tenant
scope ('*' for all tenants) and roles. Each is read by primary key (or the live-CN index) on
its first call and then kept in a cache that every change to the table empties through
LISTEN/NOTIFY (services/platform/key_cache.py): a revoked identity is refused in every process
within `key_cache.revocation_bound_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import structlog
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.descriptor import ServiceDescriptor as Service
from psycopg_pool import AsyncConnectionPool

from ledger import errors
from ledger.postgres.errors import translated
from services._gen.tokenledger.v1 import options_pb2
from services.platform.config import AuthSettings, ConfigError
from services.platform.errors import CallRefused, PermissionDenied, Unauthenticated
from services.platform.guards import PRINCIPAL
from services.platform.interceptors import UnaryBehavior, _Interceptor
from services.platform.key_cache import KeyCache
from services.platform.observability import add_to_call

log = structlog.get_logger("tokenledger.auth")

Context = grpc.aio.ServicerContext[Any, Any]


def _role(value: options_pb2.Role.ValueType) -> str:
    """`ROLE_WRITER` of the proto as the `writer` of a key's roles."""
    return options_pb2.Role.Name(value).removeprefix("ROLE_").lower()


ROLES = tuple(_role(value) for value in options_pb2.Role.values() if value)
"""writer, reader, auditor, admin: the proto's Role enum."""
ALL_TENANTS = "*"
KEY_PREFIX = "tlk"
key_id_bytes = 8
"""The public half of a key: 16 hex characters, the primary key of its row."""
secret_bytes = 32
"""The secret half: 256 random bits, 64 hex characters."""
_TOKEN = re.compile(
    rf"{KEY_PREFIX}_([0-9a-f]{{{2 * key_id_bytes}}})_([0-9a-f]{{{2 * secret_bytes}}})"
)
AUTHORIZATION = "authorization"

stream_recheck_s_default = 5.0
"""How often an open server stream re-checks its key: a revoked key's stream ends by then."""


# --- keys ------------------------------------------------------------------------------------


class NewKey(NamedTuple):
    key_id: str
    token: str
    """What the caller sends: `tlk_<key_id>_<secret>`. Shown once, never stored."""
    secret_sha256: bytes


def new_key() -> NewKey:
    key_id, secret = secrets.token_hex(key_id_bytes), secrets.token_hex(secret_bytes)
    return NewKey(key_id, f"{KEY_PREFIX}_{key_id}_{secret}", secret_hash(secret))


def secret_hash(secret: str) -> bytes:
    """sha256 of the secret. Not a password hash on purpose: the secret is 256 random bits, so
    nobody can guess it whatever the hash costs, and a slow hash (bcrypt, argon2) would only
    add its tens of milliseconds to every call."""
    return hashlib.sha256(secret.encode()).digest()


def parse_token(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its key id, the actor recorded in events, scope and roles."""

    key_id: str
    actor: str
    tenant_id: str
    roles: frozenset[str]

    def covers(self, tenant_id: str) -> bool:
        return self.tenant_id == ALL_TENANTS or tenant_id == self.tenant_id


current_principal: ContextVar[Principal | None] = ContextVar(
    "tokenledger_auth_principal", default=None
)


def current_actor() -> str:
    """The actor of the current call: `key:<id>` or `cert:<cn>`, "" when auth is off."""
    principal = current_principal.get()
    return principal.actor if principal else ""


class KeyStore:
    """Identities in `api_keys`, read through the service's pool (SELECT is all it needs), and
    kept in the process's KeyCache (services/platform/key_cache.py) while it listens for
    changes: a key is read once, not on every call, and a revocation still reaches every
    process within `key_cache.revocation_bound_s`. `cache=False` reads on every call."""

    _SELECT = "SELECT key_id, tenant_id, roles, secret_sha256, cert_cn, revoked_at FROM api_keys"

    def __init__(self, pool: AsyncConnectionPool[Any], *, cache: bool = True) -> None:
        self.pool = pool
        self.cache: KeyCache | None = None
        if cache:
            conninfo = pool.conninfo
            assert isinstance(conninfo, str), "pools here are made from a URL"
            self.cache = KeyCache(conninfo)

    async def by_key_id(self, key_id: str) -> dict[str, Any] | None:
        return await self._cached(("key", key_id), self._SELECT + " WHERE key_id = %s", key_id)

    async def by_cert_cn(self, cn: str) -> dict[str, Any] | None:
        sql = self._SELECT + " WHERE cert_cn = %s AND revoked_at IS NULL"
        return await self._cached(("cn", cn), sql, cn)

    async def _cached(self, slot: tuple[str, str], sql: str, arg: str) -> dict[str, Any] | None:
        if self.cache is None:
            return await self._one(sql, arg)
        return await self.cache.lookup(slot, lambda: self._one(sql, arg))

    async def _one(self, sql: str, arg: str) -> dict[str, Any] | None:
        with translated():  # an unreachable database is StoreUnavailable, as for the ledger
            async with self.pool.connection() as conn:
                cur = await conn.execute(sql, (arg,))
                row: dict[str, Any] | None = await cur.fetchone()
                return row

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()


# --- which RPC needs what ----------------------------------------------------------------------


@dataclass(frozen=True)
class RpcPolicy:
    """The roles any one of which allows an RPC, and where its request names the tenant
    (None: the RPC touches no tenant's data). `empty_is_all`: an empty tenant means every
    tenant, which only a '*' key may ask for."""

    roles: frozenset[str]
    tenant: Callable[[Any], str] | None
    empty_is_all: bool = False


def method_path(method: MethodDescriptor) -> str:
    """`/tokenledger.v1.LedgerService/Reserve`: how gRPC names the method of a call."""
    return f"/{method.containing_service.full_name}/{method.name}"


def _tenant_of(request_type: Descriptor, path: str) -> Callable[[Any], str]:
    """A reader of the string field at `path` (e.g. "query.tenant_id") of a request; a path
    that names no such field fails here, when the server starts, not on a call."""
    message: Descriptor | None = request_type
    names = path.split(".")
    for i, name in enumerate(names):
        field = message.fields_by_name.get(name) if message else None
        last = i == len(names) - 1
        wanted = FieldDescriptor.TYPE_STRING if last else FieldDescriptor.TYPE_MESSAGE
        if field is None or field.type != wanted:
            raise ValueError(f"{request_type.full_name} has no string field {path!r}")
        message = field.message_type

    def tenant(request: Any) -> str:
        for name in names:
            request = getattr(request, name)
        return str(request)

    return tenant


def policy_of(method: MethodDescriptor) -> RpcPolicy | None:
    """The RPC's `(tokenledger.v1.access)` option as a policy; None when it declares none."""
    options = method.GetOptions()
    if not options.HasExtension(options_pb2.access):
        return None
    access = options.Extensions[options_pb2.access]
    return RpcPolicy(
        frozenset(_role(role) for role in access.roles),
        _tenant_of(method.input_type, access.tenant_field) if access.tenant_field else None,
        access.empty_tenant_is_all,
    )


def policies(*services: Service) -> dict[str, RpcPolicy]:
    """Every declared policy of the services' RPCs, by method path."""
    return {
        method_path(method): policy
        for service in services
        for method in service.methods
        if (policy := policy_of(method)) is not None
    }


def unguarded_methods(*services: Service) -> list[str]:
    """Methods of the services that declare no policy; a server with one does not start."""
    return [
        method_path(method)
        for service in services
        for method in service.methods
        if policy_of(method) is None
    ]


# --- authentication --------------------------------------------------------------------------


def _principal(row: Mapping[str, Any], actor: str) -> Principal:
    return Principal(row["key_id"], actor, row["tenant_id"], frozenset(row["roles"]))


class Authenticator:
    """Finds the principal of a call: from its bearer API key (modes api_key, mtls+api_key;
    under mtls+api_key the verified client certificate only admits the connection) or from
    its client certificate's CN registered as an identity (mode mtls)."""

    def __init__(
        self, mode: str, keys: KeyStore, stream_recheck_s: float = stream_recheck_s_default
    ) -> None:
        if mode not in ("api_key", "mtls", "mtls+api_key"):
            raise ValueError(f"no authenticator for auth mode {mode!r}")
        self.mode = mode
        self.keys = keys
        self.stream_recheck_s = stream_recheck_s

    async def close(self) -> None:
        await self.keys.close()

    async def authenticate(self, context: Context) -> Principal:
        if self.mode == "api_key":
            return await self._by_api_key(context)
        cn = _client_cn(context)
        if self.mode == "mtls+api_key":
            return await self._by_api_key(context)
        row = await self.keys.by_cert_cn(cn)
        if row is None:
            raise Unauthenticated(
                f"client certificate CN={cn!r} is not registered: "
                "`tokenledger keys create --cert-cn …`"
            )
        return _principal(row, f"cert:{cn}")

    async def _by_api_key(self, context: Context) -> Principal:
        return await key_principal(self.keys, _bearer(context))


async def key_principal(keys: KeyStore, token: str) -> Principal:
    """The principal of an API key (`tlk_<id>_<secret>`); Unauthenticated when the key is
    malformed, unknown, wrong or revoked. The gRPC servers and the web page both ask this."""
    parsed = parse_token(token)
    if parsed is None:
        raise Unauthenticated("malformed API key: expected tlk_<key id>_<secret>")
    key_id, secret = parsed
    row = await keys.by_key_id(key_id)
    # Unknown id and wrong secret read the same; the hash comparison takes constant time.
    if row is None or row["secret_sha256"] is None:
        raise Unauthenticated("invalid API key")
    if not hmac.compare_digest(bytes(row["secret_sha256"]), secret_hash(secret)):
        raise Unauthenticated("invalid API key")
    if row["revoked_at"] is not None:
        raise Unauthenticated(f"API key {key_id} was revoked")
    return _principal(row, f"key:{key_id}")


def _bearer(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must be `Bearer <API key>`")
            return token.strip()
    raise Unauthenticated("no API key: send metadata `authorization: Bearer tlk_…`")


def _client_cn(context: Context) -> str:
    """The verified client certificate's subject CN. The TLS handshake already refused a
    connection without a certificate signed by the client CA; this refuses a plaintext one."""
    auth = context.auth_context() or {}
    names = list(auth.get("x509_common_name") or ())
    if not names:
        raise Unauthenticated("no verified client certificate on this connection")
    return names[0].decode()


# --- the interceptor -------------------------------------------------------------------------


def authorize(principal: Principal, policy: RpcPolicy, request: Any, rpc: str) -> None:
    """Raise PERMISSION_DENIED unless the principal has a role of the RPC and covers its
    tenant."""
    if not principal.roles & policy.roles:
        needed = ", ".join(sorted(policy.roles))
        raise PermissionDenied(
            f"{rpc} needs the role {needed}; key {principal.key_id} has "
            f"{', '.join(sorted(principal.roles))}",
            metadata={"rpc": rpc, "required_roles": needed},
        )
    if policy.tenant is None:
        return
    tenant = policy.tenant(request)
    if tenant == "" and policy.empty_is_all:
        tenant = ALL_TENANTS
    if not principal.covers(tenant):
        shown = "every tenant" if tenant == ALL_TENANTS else f"tenant {tenant!r}"
        raise PermissionDenied(
            f"key {principal.key_id} is scoped to tenant {principal.tenant_id!r} and may not "
            f"act on {shown}",
            metadata={"rpc": rpc, "tenant_id": tenant, "key_tenant_id": principal.tenant_id},
        )


class AuthInterceptor(_Interceptor):
    """Authenticates every call to the given services, then checks the RPC's role and tenant
    (its declared policy); the principal is then `current_principal` (the actor of the events
    it appends) and `guards.PRINCIPAL`. A refused call reaches nothing behind it: the refusal is
    raised, and the error boundary (outside) ends the call with it. Other services (health,
    reflection) pass. It refuses to be built for a service with an RPC that declares no policy.

    A server stream (SubscribeEvents never ends by itself) re-authenticates every
    `authenticator.stream_recheck_s`: once its key is revoked, it ends with UNAUTHENTICATED."""

    def __init__(self, authenticator: Authenticator, services: Sequence[Service]) -> None:
        missing = unguarded_methods(*services)
        if missing:
            raise RuntimeError(f"RPCs without an auth policy: {', '.join(missing)}")
        self.authenticator = authenticator
        self.policies = policies(*services)
        self._streaming = frozenset(
            method_path(m) for s in services for m in s.methods if m.server_streaming
        )

    def wrap(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        policy = self.policies.get(method)
        if policy is None:
            return behavior
        rpc = method.rsplit("/", 1)[-1]
        streaming = method in self._streaming

        async def guarded(request: Any, context: Context) -> Any:
            principal = await self.authenticator.authenticate(context)
            add_to_call(actor=principal.actor)
            authorize(principal, policy, request, rpc)
            token = current_principal.set(principal)
            key_token = PRINCIPAL.set(principal.key_id)
            try:
                if streaming:
                    return await self._watched(behavior, request, context)
                return await behavior(request, context)
            finally:
                PRINCIPAL.reset(key_token)
                current_principal.reset(token)

        return guarded

    async def _watched(self, behavior: UnaryBehavior, request: Any, context: Context) -> Any:
        """Run a stream while its caller stays authenticated; a database hiccup during a
        re-check lets the stream go on (the next re-check decides)."""
        stream = asyncio.ensure_future(behavior(request, context))
        try:
            while True:
                recheck_s = self.authenticator.stream_recheck_s
                done, _ = await asyncio.wait({stream}, timeout=recheck_s)
                if done:
                    return stream.result()
                try:
                    await self.authenticator.authenticate(context)
                except errors.LedgerError:
                    continue
                except CallRefused:
                    stream.cancel()
                    await asyncio.gather(stream, return_exceptions=True)
                    raise
        finally:
            if not stream.done():
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)


_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "[::1]", "localhost")


def warn_if_off(
    authenticator: Authenticator | None, service: str, *, tls: bool, address: str
) -> None:
    """The loud line a server logs at start when anyone may call it, or when bearer keys
    would cross a network in cleartext."""
    if authenticator is None:
        log.warning(
            "AUTHENTICATION IS OFF: any caller may call any RPC on any tenant; "
            "set TOKENLEDGER_AUTH=api_key, mtls or mtls+api_key outside local development",
            service=service,
            auth="off",
        )
    elif not tls and address.rpartition(":")[0] not in _LOOPBACK_HOSTS:
        log.warning(
            "API KEYS IN CLEARTEXT: this port is not loopback and has no TLS, so bearer keys "
            "can be read on the network; set TOKENLEDGER_TLS_CERT and TOKENLEDGER_TLS_KEY",
            service=service,
            auth="cleartext",
            address=address,
        )


# --- TLS credentials -------------------------------------------------------------------------


def server_credentials(settings: AuthSettings) -> grpc.ServerCredentials | None:
    """TLS for the listening port when a certificate is configured; client certificates
    signed by TOKENLEDGER_TLS_CLIENT_CA are required and verified under the mtls modes."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=settings.client_certs,
    )


def make_authenticator(
    settings: AuthSettings, pool: AsyncConnectionPool[Any]
) -> Authenticator | None:
    return None if settings.mode == "off" else Authenticator(settings.mode, KeyStore(pool))


# --- the client side: how a process calls the ledger -------------------------------------------


@dataclass(frozen=True)
class ClientAuth:
    """A ledger client's credentials (TOKENLEDGER_LEDGER_API_KEY, TOKENLEDGER_LEDGER_TLS_CA,
    _CERT, _KEY): the API key it sends, the CA that verifies the ledger's certificate (TLS when
    set) and its own client certificate."""

    api_key: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClientAuth:
        api_key = env.get("TOKENLEDGER_LEDGER_API_KEY", "").strip()
        if api_key and parse_token(api_key) is None:
            raise ConfigError("TOKENLEDGER_LEDGER_API_KEY is not a tlk_<id>_<secret> key")
        paths = []
        for name in ("CA", "CERT", "KEY"):
            raw = env.get(f"TOKENLEDGER_LEDGER_TLS_{name}", "").strip()
            if raw and not Path(raw).is_file():
                raise ConfigError(f"TOKENLEDGER_LEDGER_TLS_{name}={raw!r}: no such file")
            paths.append(Path(raw) if raw else None)
        ca, cert, key = paths
        if (cert is None) != (key is None):
            raise ConfigError("TOKENLEDGER_LEDGER_TLS_CERT and _KEY go together")
        if cert is not None and ca is None:
            raise ConfigError("a client certificate needs TOKENLEDGER_LEDGER_TLS_CA (TLS)")
        return cls(api_key, ca, cert, key)

    def metadata(self) -> Sequence[tuple[str, str]]:
        return [(AUTHORIZATION, f"Bearer {self.api_key}")] if self.api_key else []

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes(),
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
        )

    def channel(self, target: str) -> grpc.Channel:
        """A blocking channel to `target` that sends these credentials on every call."""
        creds = self.credentials()
        channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        metadata = list(self.metadata())
        if not metadata:
            return channel
        return grpc.intercept_channel(channel, _MetadataInterceptor(metadata))


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata (the bearer key) to every unary and server-streaming call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = list(metadata)

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self._metadata],
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)
