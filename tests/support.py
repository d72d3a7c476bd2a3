"""Test infrastructure: a database per test run, a real ledger server on port 0 in a
background thread, a settable clock, and helpers to read gRPC error details."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import grpc
import psycopg
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from ledger.batch import EXPIRY_ACTOR
from ledger.postgres.audit import LedgerAudit
from ledger.reads import Scope, VerifyReport
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.ledger.server import LedgerServer
from services.platform import db
from services.platform.auth import Authenticator, KeyStore, new_key

SERVER_START_TIMEOUT_S = 60
TOKENLEDGER = Path(sys.executable).parent / "tokenledger"


@contextmanager
def scratch_database(tmp_root: Path) -> Iterator[str]:
    """A fresh, migrated database for this run, dropped afterwards. On DATABASE_URL's server
    when set, else on an embedded PostgreSQL under `tmp_root`."""
    base = os.environ.get("DATABASE_URL", "")
    if not base:
        base = db.embedded_url(tmp_root)
    name = f"tokenledger_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(base, dbname=name)
    try:
        db.migrate(url)
        yield url
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Clock:
    """A clock tests can move; starts at the real time."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class _LoopThread:
    """A server running on its own event loop in a daemon thread; subclasses say how to start
    it (`_start`, which sets `self.server` and `self.port`) and what to close after it."""

    what = "server"
    server: Any

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        if not self._ready.wait(SERVER_START_TIMEOUT_S) or self._error:
            raise RuntimeError(f"{self.what} did not start: {self._error}")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        """What to close once the server has stopped (its pools)."""

    def run(self, coro: Any, timeout_s: float = 30) -> Any:
        """Run a coroutine on the server's event loop (e.g. one of its store's) and return
        its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self, grace_s: float = 1) -> None:
        async def shutdown() -> None:
            await self.server.stop(grace_s)
            await self._close()

        self.run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


class ServerThread(_LoopThread):
    """A real LedgerServer on 127.0.0.1:0, running its own event loop in a thread."""

    what = "ledger server"

    def __init__(
        self,
        url: str,
        *,
        clock: Any = None,
        sweep_interval_s: float = 0.05,
        wait_for_database: bool = True,
        cheaper_models: dict[str, str] | None = None,
        meter_provider: Any = None,
        auth_mode: str = "off",
        credentials: grpc.ServerCredentials | None = None,
        stream_recheck_s: float = 5.0,
        read_url: str = "",
        audit_workers: int = 2,
        alert_webhook_url: str = "",
        listen: str = "127.0.0.1:0",
    ) -> None:
        """`listen`: a fixed address, for a test that stops and starts a ledger where its
        clients expect it. `auth_mode` other than "off" authenticates callers against the
        api_keys table (services/platform/auth.py), re-checking open streams every
        `stream_recheck_s`; `credentials` make the port TLS (mTLS with a client CA);
        `read_url` is the database audit and usage reads go to (a read replica's). With
        `audit_workers` > 1 (the default), every verification runs in parts
        (ledger/verify.py)."""
        self.url = url
        self.read_url = read_url
        self.auth_mode = auth_mode
        self.stream_recheck_s = stream_recheck_s
        self.credentials = credentials
        self.cheaper_models = cheaper_models
        self.meter_provider = meter_provider
        self.wait_for_database = wait_for_database
        self.clock = clock
        self.sweep_interval_s = sweep_interval_s
        self.audit_workers = audit_workers
        self.alert_webhook_url = alert_webhook_url
        self.listen = listen
        super().__init__()

    async def _start(self) -> None:
        self.pool = db.make_pool(self.url, 10)
        await self.pool.open(wait=self.wait_for_database, timeout=10)
        kwargs: dict[str, Any] = {"clock": self.clock} if self.clock else {}
        if self.meter_provider is not None:
            kwargs["meter_provider"] = self.meter_provider
        if self.auth_mode != "off":
            kwargs["auth"] = Authenticator(
                self.auth_mode, KeyStore(self.pool), self.stream_recheck_s
            )
        if self.credentials is not None:
            kwargs["credentials"] = self.credentials
        if self.read_url:
            kwargs["read_pool"] = self.read_pool = db.make_pool(self.read_url, 4)
            await self.read_pool.open(wait=True, timeout=10)
        self.server = LedgerServer(
            self.pool,
            sweep_interval_s=self.sweep_interval_s,
            audit_workers=self.audit_workers,
            cheaper_models=self.cheaper_models,
            alert_webhook_url=self.alert_webhook_url,
            **kwargs,
        )
        self.port = await self.server.start(self.listen)

    async def _close(self) -> None:
        await self.pool.close()
        if self.read_url:
            await self.read_pool.close()

    @contextmanager
    def stub(self) -> Iterator[pb_grpc.LedgerServiceStub]:
        with grpc.insecure_channel(self.target) as channel:
            yield pb_grpc.LedgerServiceStub(channel)


@dataclass
class RpcFailure:
    """What a failed call said: code, message and its google.rpc details."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    quota_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_delay_s: float | None = None


def failure(exc: grpc.RpcError) -> RpcFailure:
    call: Any = exc
    out = RpcFailure(code=call.code(), message=call.details())
    status = rpc_status.from_call(call)
    for detail in status.details if status else ():
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                if isinstance(msg, error_details_pb2.ErrorInfo):
                    out.reason, out.metadata = msg.reason, dict(msg.metadata)
                elif isinstance(msg, error_details_pb2.BadRequest):
                    out.field_violations = [(v.field, v.description) for v in msg.field_violations]
                elif isinstance(msg, error_details_pb2.QuotaFailure):
                    out.quota_violations = [(v.subject, v.description) for v in msg.violations]
                else:
                    out.retry_delay_s = msg.retry_delay.ToTimedelta().total_seconds()
    return out


def call_fails(fn: Any, request: Any) -> RpcFailure:
    """Call `fn(request)`, which must fail, and return how."""
    try:
        fn(request)
    except grpc.RpcError as exc:
        return failure(exc)
    raise AssertionError(f"{request.__class__.__name__} succeeded but should have failed")


def verify_tenant(url: str, tenant: str, workers: int = 1, handoff: bool = True) -> VerifyReport:
    """VerifyAudit of a tenant, without a server: chains, and projections rebuilt from the
    log, on `workers` processes (by the design before the handoff with `handoff=False`)."""

    async def run() -> VerifyReport:
        async with db.make_pool(url, 2) as pool:
            with closing(LedgerAudit(pool, workers=workers, before_handoff=not handoff)) as audit:
                return await audit.verify(Scope(tenant))

    return asyncio.run(run())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LedgerProcess:
    """`tokenledger serve` on a fixed address, so a restart keeps it."""

    def __init__(self, url: str, log_path: Path, **env: str) -> None:
        self.target = f"127.0.0.1:{free_port()}"
        self.env = (
            os.environ
            | {
                "DATABASE_URL": url,
                "TOKENLEDGER_LISTEN": self.target,
                "TOKENLEDGER_LOG_FORMAT": "json",
            }
            | env
        )
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(TOKENLEDGER), "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_health(self.target, health_pb2.HealthCheckResponse.SERVING, SERVER_START_TIMEOUT_S)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def exits_within(pid: int, timeout_s: float) -> bool:
    """Whether process `pid` is gone (or a zombie: it has exited) within the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # gone while being read
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def health_status(target: str, service: str = "") -> int | None:
    """The health of `service` ("" is the whole server); None when the server does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.RpcError:
            return None
        return int(reply.status)


def wait_health(target: str, status: int, timeout_s: float) -> float:
    """Wait until the health check reports `status`; returns how long that took."""
    started = time.monotonic()
    while health_status(target) != status:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{target} did not report health status {status}")
        time.sleep(0.1)
    return time.monotonic() - started


def event_count(url: str) -> int:
    """Events in the log, not counting the expiry sweeper's: the suite's shared server may
    expire holds other tests left at any moment, and those events (actor EXPIRY_ACTOR) must
    not make a before/after comparison flaky. A refused request appends no event at all."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM events WHERE actor <> %s", (EXPIRY_ACTOR,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def stamp(at: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def cycle(
    stub: pb_grpc.LedgerServiceStub, tenant: str, user: str, conv: str, amount: int, used: int
) -> str:
    r = stub.Reserve(
        pb.ReserveRequest(
            idempotency_key=new_id("k"),
            tenant_id=tenant,
            user_id=user,
            conversation_id=conv,
            model="gpt-4o" if amount % 2 else "llama-3",
            amount=amount,
        )
    )
    rid = r.reservation.reservation_id
    if used < 0:
        stub.Rollback(pb.RollbackRequest(tenant_id=tenant, reservation_id=rid))
    else:
        stub.Commit(
            pb.CommitRequest(
                tenant_id=tenant,
                reservation_id=rid,
                usage=pb.Usage(input_tokens=used, output_tokens=1),
            )
        )
    return rid


class ContextServerThread(_LoopThread):
    """A real ContextServer on 127.0.0.1:0 that calls the ledger at `ledger_target` over gRPC,
    running its own event loop in a thread. `kwargs` go to ContextServer (e.g. a shared
    tokenizer `pool`, a `meter_provider`, a `remote_summarizer`)."""

    what = "context server"

    def __init__(
        self,
        ledger_target: str,
        *,
        auth_mode: str = "off",
        keys_url: str = "",
        memory_url: str = "",
        **kwargs: Any,
    ) -> None:
        """`auth_mode` other than "off" authenticates callers against the api_keys table of
        the database at `keys_url`; `memory_url` (or `keys_url`) gives the memory table."""
        self.ledger_target = ledger_target
        self.auth_mode = auth_mode
        self.keys_url = keys_url
        self.memory_url = memory_url or keys_url
        self.keys_pool: Any = None
        self.kwargs = kwargs
        super().__init__()

    async def _start(self) -> None:
        from services.context.server import ContextServer

        kwargs = dict(self.kwargs)
        if self.memory_url:
            self.keys_pool = db.make_pool(self.memory_url, 2)
            await self.keys_pool.open(wait=True, timeout=10)
            kwargs["memory_pool"] = self.keys_pool
        if self.auth_mode != "off":
            kwargs["auth"] = Authenticator(self.auth_mode, KeyStore(self.keys_pool))
        self.server = ContextServer(self.ledger_target, **kwargs)
        self.port = await self.server.start("127.0.0.1:0")

    async def _close(self) -> None:
        if self.keys_pool is not None:
            await self.keys_pool.close()

    @contextmanager
    def stub(self) -> Iterator[Any]:
        from services._gen.tokenledger.v1 import context_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            yield context_pb2_grpc.ContextServiceStub(channel)


@dataclass(frozen=True)
class ApiKey:
    """A key made for a test: its id, the token a caller sends, and that as call metadata."""

    key_id: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token}"),)


def create_key(url: str, tenant: str, *roles: str, name: str = "test") -> ApiKey:
    """An API key in the api_keys table, as `tokenledger keys create` makes one."""
    key = new_key()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO api_keys (key_id, tenant_id, roles, name, secret_sha256)"
            " VALUES (%s, %s, %s, %s, %s)",
            (key.key_id, tenant, list(roles), name, key.secret_sha256),
        )
    return ApiKey(key.key_id, key.token)


def register_cert(url: str, cn: str, tenant: str, *roles: str) -> str:
    """A client certificate identity (mTLS mode); returns its key id."""
    key = new_key()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO api_keys (key_id, tenant_id, roles, name, cert_cn)"
            " VALUES (%s, %s, %s, %s, %s)",
            (key.key_id, tenant, list(roles), f"cert {cn}", cn),
        )
    return key.key_id


def committed_calls(
    stub: pb_grpc.LedgerServiceStub,
    tenant: str,
    user: str,
    outputs: Sequence[int],
    model: str = "gpt-4o",
    **fields: Any,
) -> list[str]:
    """One hold of 4,096 tokens per output, each committed with 10 input and that many output
    tokens (a batch of reserves, then one of commits); returns the reservation ids."""
    asked = {"user_id": user, "model": model, "amount": 4096} | fields
    reserves = [pb.ReserveRequest(idempotency_key=new_id("k"), **asked) for _ in outputs]
    held = stub.ReserveBatch(pb.ReserveBatchRequest(tenant_id=tenant, items=reserves))
    ids = [r.reserved.reservation.reservation_id for r in held.results]
    commits = [
        pb.CommitRequest(reservation_id=rid, usage=pb.Usage(input_tokens=10, output_tokens=out))
        for rid, out in zip(ids, outputs, strict=True)
    ]
    done = stub.CommitBatch(pb.CommitBatchRequest(tenant_id=tenant, items=commits))
    assert all(r.HasField("committed") for r in done.results), done
    return ids


def run_cli(argv: list[str], env: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    """`tokenledger ARGV` in this process, as the entry point would run it, with `env`
    overriding the environment (None: unset) for the call. A new interpreter costs two
    seconds of imports a call; one test per command goes through TOKENLEDGER instead."""
    from services.cli import main  # here: importing every command's module is slow

    out, err = io.StringIO(), io.StringIO()
    saved = {name: os.environ.get(name) for name in env}
    for name, value in env.items():
        _set_env(name, value)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse refuses bad arguments by exiting
                code = int(exc.code or 0)
    finally:
        for name, value in saved.items():
            _set_env(name, value)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
