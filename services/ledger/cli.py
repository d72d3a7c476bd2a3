"""`tokenledger serve`, `migrate` and `demo`: the ledger's own commands."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import uuid

import psycopg
import sqlalchemy.exc
import structlog
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.metrics import MeterProvider

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import LedgerClient, LedgerError
from services.ledger.cli_admin import CliError, balance_line, connect, describe_limit
from services.ledger.config import Settings
from services.platform import db
from services.platform.metrics import configure_metrics
from services.platform.observability import configure_tracing
from services.platform.serve import STARTUP_FAILED_EXIT_CODE, StartupFailure, check_listen

log = structlog.get_logger("tokenledger")

DEFAULT_TARGET = "127.0.0.1:50051"


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
        start_audit_workers=True,
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


DEMO_TENANT, DEMO_CONVERSATION, DEMO_MODEL = "demo", "chat-1", "gpt-4o"
DEMO_LIMIT, DEMO_HOLD, DEMO_INPUT, DEMO_OUTPUT, DEMO_TOO_MUCH = 10_000, 1_500, 900, 350, 50_000
DEMO_TTL_S = 60
TRANSCRIPT_WIDTH = 100


class _Transcript:
    """What the demo prints: a step and the ledger's answer on one line, wrapped under the
    step's name; with `as_json`, each answer as a JSON line instead."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def step(self, name: str, asked: str, answer: str, reply: Message | dict[str, str]) -> None:
        if self.as_json:
            body = reply if isinstance(reply, dict) else json_format.MessageToDict(reply)
            print(json.dumps({"step": name, **body}))
            return
        print(
            textwrap.fill(
                f"{name:<10} {asked} -> {answer}",
                TRANSCRIPT_WIDTH,
                subsequent_indent=" " * 11,
                break_on_hyphens=False,
            )
        )


def cmd_demo(target: str, as_json: bool = False) -> int:
    """Quota → reserve → commit → the user's balance → a refused reserve, against a running
    ledger, printed as README "A round trip" shows it. Exit 1 if a figure is not as expected."""
    try:
        with connect(target) as client:
            problem = _demo(client, _Transcript(as_json))
    except CliError as exc:
        print(f"tokenledger demo: {exc}", file=sys.stderr)
        return 2
    if problem:
        print(f"tokenledger demo: FAILED: {problem}", file=sys.stderr)
        return 1
    return 0


def _demo(client: LedgerClient, out: _Transcript) -> str:
    """The round trip; what was not as expected, or ""."""
    # A user of its own for each run: its day quota starts unused however often it runs.
    user = f"alice-{uuid.uuid4().hex[:8]}"
    quota = client.set_quota(
        tenant_id=DEMO_TENANT, user_id=user, limit=DEMO_LIMIT, period=pb.PERIOD_DAY
    )
    out.step("SetQuota", f"{DEMO_TENANT}/{user}", describe_limit(quota.balance), quota)
    held = client.reserve(
        tenant_id=DEMO_TENANT, user_id=user, conversation_id=DEMO_CONVERSATION,
        model=DEMO_MODEL, amount=DEMO_HOLD, ttl_seconds=DEMO_TTL_S,
    )  # fmt: skip
    rsv = held.reservation
    asked = f"{DEMO_HOLD} tokens for {DEMO_MODEL} in conversation {DEMO_CONVERSATION}"
    state = pb.ReservationState.Name(rsv.state).removeprefix("RESERVATION_STATE_")
    out.step("Reserve", asked, f"{rsv.reservation_id}, {state}, expires in {DEMO_TTL_S} s", held)
    usage = pb.Usage(input_tokens=DEMO_INPUT, output_tokens=DEMO_OUTPUT)
    done = client.commit(tenant_id=DEMO_TENANT, reservation_id=rsv.reservation_id, usage=usage)
    settled = f"committed {done.committed}, released {done.released}, overage {done.overage}"
    out.step("Commit", f"{DEMO_INPUT} input + {DEMO_OUTPUT} output tokens", settled, done)
    balance = client.get_balance(tenant_id=DEMO_TENANT, user_id=user)
    out.step("GetBalance", "the user", balance_line(balance.balance), balance)
    try:
        client.reserve(tenant_id=DEMO_TENANT, user_id=user, model=DEMO_MODEL, amount=DEMO_TOO_MUCH)
    except LedgerError as exc:
        refusal = {"code": exc.code.name, "reason": exc.reason, "message": exc.message}
        out.step("Reserve", f"{DEMO_TOO_MUCH} tokens", f"{exc.code.name}: {exc.message}", refusal)
        refused = exc.reason == "BUDGET_EXHAUSTED"
    else:
        refused = False
    expected = DEMO_HOLD - DEMO_INPUT - DEMO_OUTPUT
    if done.released != expected or balance.balance.used != DEMO_INPUT + DEMO_OUTPUT:
        return f"released {done.released} (expected {expected}), used {balance.balance.used}"
    return "" if refused else f"a reservation of {DEMO_TOO_MUCH} over the limit was not refused"
