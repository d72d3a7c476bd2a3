"""`tokenledger serve`, `migrate` and `demo`: the ledger's own commands."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import grpc
import psycopg
import sqlalchemy.exc
import structlog
from opentelemetry.metrics import MeterProvider

from services.ledger.config import Settings
from services.platform import db
from services.platform.config import ConfigError
from services.platform.metrics import configure_metrics
from services.platform.observability import configure_tracing
from services.platform.serve import STARTUP_FAILED_EXIT_CODE, StartupFailure, check_listen

log = structlog.get_logger("tokenledger")

DEFAULT_TARGET = "127.0.0.1:50051"
DEMO_READY_TIMEOUT_S = 30.0


def _database_url(settings: Settings) -> str:
    return settings.database_url or db.embedded_url(settings.data_dir)


async def _serve(settings: Settings, url: str, meter_provider: MeterProvider | None = None) -> None:
    from services.ledger.server import CheckpointSchedule, LedgerServer
    from services.platform.auth import make_authenticator, server_credentials
    from services.platform.serve import serve_until_signalled

    pool = db.make_pool(url, settings.pool_size_max)
    await pool.open(wait=True, timeout=30)
    read_pool = None
    if settings.database_url_readonly:
        read_pool = db.make_pool(settings.database_url_readonly, settings.pool_size_max)
        await read_pool.open(wait=True, timeout=30)
    server = LedgerServer(
        pool,
        read_pool=read_pool,
        sweep_interval_s=settings.sweep_interval_s,
        cheaper_models=settings.cheaper_models,
        guards=settings.guards,
        meter_provider=meter_provider,
        auth=make_authenticator(settings.auth, pool),
        credentials=server_credentials(settings.auth),
        audit_workers=settings.audit_workers,
        key_retention_s=settings.key_retention_s,
        alert_webhook_url=settings.alert_webhook_url,
        checkpoints=CheckpointSchedule(
            settings.checkpoint_every_events,
            settings.checkpoint_every_h * 3600,
            settings.checkpoint_check_s,
        ),
    )
    await serve_until_signalled(
        server,
        settings.listen,
        settings.shutdown_grace_s,
        what="ledger",
        setting="TOKENLEDGER_LISTEN",
    )
    await pool.close()
    if read_pool is not None:
        await read_pool.close()


def cmd_serve(settings: Settings) -> int:
    """Serve until a signal; a server that cannot start says why in one line, exit code 2."""
    try:
        _serve_checked(settings)
    except StartupFailure as exc:
        print(f"tokenledger serve: {exc}", file=sys.stderr)
        return STARTUP_FAILED_EXIT_CODE
    return 0


def _serve_checked(settings: Settings) -> None:
    # The ports first: before the embedded database and the migrations, which take seconds.
    check_listen("ledger", settings.listen, "TOKENLEDGER_LISTEN")
    if settings.metrics.listen:
        check_listen("ledger metrics", settings.metrics.listen, "TOKENLEDGER_METRICS_LISTEN")
    provider = configure_tracing(settings.trace_exporter, "tokenledger-ledger")
    meters = configure_metrics(
        settings.metrics.exporter, settings.metrics.listen, "tokenledger-ledger"
    )
    try:
        url = _database_url(settings)
        _prepare_schema(settings, url)
        asyncio.run(_serve(settings, url, meters.provider if meters.enabled else None))
    finally:
        meters.shutdown()
        provider.shutdown()


def _prepare_schema(settings: Settings, url: str) -> None:
    """Migrate, or in production (a migration job runs as the owner; the service role only
    checks) refuse a schema at another revision."""
    try:
        if settings.migrate_on_start:
            db.migrate(url)
        else:
            db.check_schema(url)
    except db.SchemaError as exc:
        raise StartupFailure(f"ledger: {exc}") from exc
    except (psycopg.OperationalError, sqlalchemy.exc.OperationalError) as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StartupFailure(
            f"ledger: cannot reach the database ({first}); check DATABASE_URL"
        ) from exc


def cmd_migrate(settings: Settings) -> int:
    db.migrate(_database_url(settings))
    log.info("migrated")
    return 0


def _demo_refusal(stub: Any, tenant: str, user: str, run: str) -> bool:
    """Whether a Reserve far over the limit is refused (and say how)."""
    from services._gen.tokenledger.v1 import ledger_pb2 as pb

    too_much = pb.ReserveRequest(
        idempotency_key=f"demo-too-much-{run}",
        tenant_id=tenant,
        user_id=user,
        model="gpt-4o",
        amount=50_000,
    )
    try:
        stub.Reserve(too_much)
    except grpc.RpcError as exc:
        print(f"--- Reserve 50000 tokens is refused\n{exc.code().name}: {exc.details()}")
        return True
    return False


def cmd_demo(target: str) -> int:
    """Reserve → commit → balance against a running server, printing each step."""
    from google.protobuf import json_format

    from services._gen.tokenledger.v1 import ledger_pb2 as pb
    from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc

    def show(title: str, msg: object) -> None:
        body = json_format.MessageToJson(msg, indent=2, always_print_fields_with_no_presence=True)  # type: ignore[arg-type]
        print(f"--- {title}\n{body}")

    from services.platform.auth import ClientAuth

    try:
        # With auth on: TOKENLEDGER_LEDGER_API_KEY, a key with roles admin, writer and reader.
        client = ClientAuth.from_env()
    except ConfigError as exc:
        print(f"tokenledger demo: {exc}", file=sys.stderr)
        return 2
    run = uuid.uuid4().hex[:8]
    with client.channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=DEMO_READY_TIMEOUT_S)
        stub = pb_grpc.LedgerServiceStub(channel)
        tenant, user, conversation = "demo", f"alice-{run}", "chat-1"
        quota = stub.SetQuota(
            pb.SetQuotaRequest(
                idempotency_key=f"demo-quota-{run}",
                tenant_id=tenant,
                user_id=user,
                limit=10_000,
                period=pb.PERIOD_DAY,
            )
        )
        show(f"SetQuota {tenant}/{user}: 10000 tokens a day", quota)
        reserved = stub.Reserve(
            pb.ReserveRequest(
                idempotency_key=f"demo-reserve-{run}",
                tenant_id=tenant,
                user_id=user,
                conversation_id=conversation,
                model="gpt-4o",
                amount=1_500,
                ttl_seconds=60,
            )
        )
        show("Reserve 1500 tokens", reserved)
        committed = stub.Commit(
            pb.CommitRequest(
                tenant_id=tenant,
                reservation_id=reserved.reservation.reservation_id,
                usage=pb.Usage(input_tokens=900, output_tokens=350, cached_input_tokens=0),
            )
        )
        show("Commit 1250 used (900 in, 350 out)", committed)
        balance = stub.GetBalance(
            pb.GetBalanceRequest(tenant_id=tenant, user_id=user, conversation_id=conversation)
        )
        show("GetBalance", balance)
        if not _demo_refusal(stub, tenant, user, run):
            print("error: a reservation over the limit was granted", file=sys.stderr)
            return 1
    ok = committed.released == 250 and balance.ancestors[1].used == 1_250
    print("demo ok" if ok else "demo FAILED: unexpected figures")
    return 0 if ok else 1
