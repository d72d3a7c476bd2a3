"""`tokenledger audit …`, `tokenledger usage` and `tokenledger top`: the ledger's read RPCs
for auditors and finance, as tables, CSV or JSON."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo

from google.protobuf import json_format, timestamp_pb2
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ledger.application import Ledger
from ledger.checkpoints import Checkpoint
from ledger.errors import CheckpointRefused, StoreUnavailable
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.store import PostgresStore
from ledger.reads import RebuildReport, Scope, VerifyReport
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.ledger import cli_archive, reports
from services.ledger.config import Settings
from services.ledger.reports import Record
from services.platform import db
from services.platform.auth import ClientAuth

Dimension: TypeAlias = pb.UsageDimension.ValueType
DIMENSIONS: dict[str, Dimension] = {
    "user": pb.USAGE_DIMENSION_USER,
    "conversation": pb.USAGE_DIMENSION_CONVERSATION,
    "model": pb.USAGE_DIMENSION_MODEL,
    "day": pb.USAGE_DIMENSION_DAY,
    "hour": pb.USAGE_DIMENSION_HOUR,
}
WIDTH_MIN = 40
OPTIONAL_COLUMNS = ("input_tokens", "output_tokens")
"""Default columns a narrow table leaves out (and says so) rather than cut ids to nothing."""
CALL_TIMEOUT_S = 600
err = Console(stderr=True)


def add_commands(sub: Any, target_default: str) -> None:
    def parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("--target", default=target_default, help="the ledger's address")
        p.add_argument("--tenant", required=True)
        return p

    audit = sub.add_parser("audit", help="replay, verify, or read a past balance").add_subparsers(
        dest="audit_command", required=True
    )

    def audit_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = audit.add_parser(name, help=help_text)
        p.add_argument("--target", default=target_default, help="the ledger's address")
        p.add_argument("--tenant", required=True)
        p.add_argument("--user", default="")
        p.add_argument("--json", action="store_true", help="JSON output")
        return p

    verify = audit_parser("verify", "check every hash chain and rebuild the projections")
    verify.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="start from the tenant's last checkpoint: read only the events after it",
    )
    verify.set_defaults(run=cmd_verify)
    checkpoint = audit.add_parser(
        "checkpoint",
        help="verify a tenant from its last checkpoint (the first time: its whole log) and, "
        "if everything verifies, record a new one at its last event (connects to DATABASE_URL)",
    )
    checkpoint.add_argument("--tenant", required=True)
    checkpoint.add_argument("--json", action="store_true", help="JSON output")
    checkpoint.set_defaults(run=cmd_checkpoint)
    replay = audit_parser("replay", "print the events in log order")
    replay.add_argument("--conversation", default="")
    replay.add_argument("--from-position", type=int, default=0)
    replay.add_argument("--since", type=_time, help="ISO time")
    replay.set_defaults(run=cmd_replay)
    balance = audit_parser("balance-at", "the balance as it stood at an instant")
    balance.add_argument("--conversation", default="")
    balance.add_argument("--at", type=_time, required=True, help="ISO time")
    balance.set_defaults(run=cmd_balance_at)
    rebuild = audit.add_parser(
        "rebuild",
        help="rewrite a tenant's projections from its log, then verify (connects to "
        "DATABASE_URL as a role that may delete projection rows, e.g. the owner)",
    )
    rebuild.add_argument("--tenant", required=True)
    rebuild.add_argument("--json", action="store_true", help="JSON output")
    rebuild.set_defaults(run=cmd_rebuild)
    cli_archive.add_commands(audit, _print_event)

    _add_usage_commands(parser)


def _add_usage_commands(parser: Callable[[str, str], argparse.ArgumentParser]) -> None:
    for name, help_text, run in (
        ("usage", "usage totals, grouped", cmd_usage),
        ("top", "the heaviest users or conversations", cmd_top),
    ):
        p = parser(name, help_text)
        p.add_argument("--since", type=_time, help="ISO time (default: 30 days ago)")
        p.add_argument("--until", type=_time, help="ISO time (default: now)")
        p.add_argument("--user", default="")
        p.add_argument("--model", default="")
        p.add_argument("--tz", default="", help="IANA time zone of --by day (default: UTC)")
        p.add_argument("--format", choices=("table", "csv", "json"), default="table")
        p.add_argument(
            "--columns",
            default="",
            help="the table's columns, comma-separated, or `all` (default: the ones that "
            "matter; csv and json carry every column)",
        )
        p.add_argument(
            "--width",
            type=int,
            default=shutil.get_terminal_size((80, 24)).columns,
            help="the table's width in characters (default: the terminal's, else 80)",
        )
        p.set_defaults(run=run)
        if name == "usage":
            p.add_argument("--by", default="", help="comma-separated: " + ",".join(DIMENSIONS))
        else:
            p.add_argument("--by", choices=("user", "conversation"), default="user")
            p.add_argument("--limit", type=int, default=10)


def _time(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _stamp(at: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out


@contextmanager
def _stub(target: str) -> Iterator[pb_grpc.LedgerServiceStub]:
    """A stub sending the caller's credentials (TOKENLEDGER_LEDGER_API_KEY, _TLS_*)."""
    with ClientAuth.from_env().channel(target) as channel:
        yield pb_grpc.LedgerServiceStub(channel)


def _progress(label: str) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn(label + " {task.completed:,}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def cmd_verify(args: argparse.Namespace) -> int:
    with _stub(args.target) as stub, _progress("verifying; events") as progress:
        progress.add_task("verify", total=None)
        request = pb.VerifyAuditRequest(
            tenant_id=args.tenant, user_id=args.user, from_checkpoint=args.from_checkpoint
        )
        report = stub.VerifyAudit(request, timeout=CALL_TIMEOUT_S)
    ok = report.chains_ok and report.projections_match and report.checkpoints_ok
    if args.json:
        print(json_format.MessageToJson(report, always_print_fields_with_no_presence=True))
        return 0 if ok else 1
    if report.from_checkpoint:
        print(f"from checkpoint {report.from_checkpoint} (position {report.from_position:,})")
    print(f"events checked {report.events_checked:,} in {report.streams_checked:,} streams")
    print(f"checkpoints checked {report.checkpoints_checked:,}: "
          + ("ok" if report.checkpoints_ok else "DIFFER"))  # fmt: skip
    print("chains: ok" if report.chains_ok else "chains: BROKEN")
    for b in report.breaks:
        stream = "/".join(p for p in (b.stream.tenant_id, b.stream.user_id,
                                      b.stream.conversation_id) if p)  # fmt: skip
        print(f"  {stream} at version {b.version}: {b.problem}")
    print("projections: match the log" if report.projections_match else "projections: DIFFER")
    for d in report.differences:
        if d.kind == "checkpoint":  # what is stored, and what the log or the chain says
            print(
                f"  checkpoint {d.key} {d.field}: {d.live}"
                + (f"; {d.rebuilt}" if d.rebuilt else "")
            )
        else:
            print(f"  {d.kind} {d.key} {d.field}: live {d.live}, rebuilt from the log {d.rebuilt}")
    return 0 if ok else 1


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Not an RPC: rewriting projections is an operator's repair, run against the database."""
    settings = Settings.from_env()
    url = settings.database_url or db.embedded_url(settings.data_dir)

    async def run() -> tuple[RebuildReport, VerifyReport]:
        async with db.make_pool(url, 2) as pool:
            report = await Ledger(PostgresStore(pool)).rebuild(args.tenant)
            with closing(LedgerAudit(pool, workers=settings.audit_workers)) as audit:
                return report, await audit.verify(Scope(args.tenant))

    try:
        with _progress("rebuilding") as progress:
            progress.add_task("rebuild", total=None)
            report, verified = asyncio.run(run())
    except CheckpointRefused as exc:  # an archived tenant: its log no longer starts at 1
        print(f"tokenledger audit rebuild: {exc}", file=sys.stderr)
        return 2
    ok = not verified.breaks and not verified.differences
    if args.json:
        print(json.dumps({**vars(report), "verified": ok}))
    else:
        print(
            f"replayed {report.events:,} events ({report.events_under_lock:,} of them holding "
            f"the tenant's lock); wrote {report.accounts:,} accounts, "
            f"{report.reservations:,} reservations, {report.usage_rows:,} usage rows, "
            f"{report.rate_limits:,} rate limits"
        )
        print("verify: the projections match the log" if ok else "verify: DIFFERENCES remain")
    return 0 if ok else 1


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Not an RPC: a checkpoint is written, by an operator or the server's own schedule."""
    settings = Settings.from_env()
    url = settings.database_url or db.embedded_url(settings.data_dir)

    async def run() -> tuple[VerifyReport, Checkpoint | None]:
        async with db.make_pool(url, 2) as pool:
            with closing(LedgerAudit(pool, workers=settings.audit_workers)) as audit:
                return await audit.checkpoint(args.tenant)

    try:
        with _progress("verifying before the checkpoint") as progress:
            progress.add_task("checkpoint", total=None)
            report, made = asyncio.run(run())
    except CheckpointRefused as exc:
        print(f"tokenledger audit checkpoint: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:  # a lost race with another taker, or no database
        print(f"tokenledger audit checkpoint: {exc}; nothing was written, retry", file=sys.stderr)
        return 2
    out: dict[str, Any] = {
        "taken": made is not None,
        "events_checked": report.events_checked,
        "from_checkpoint": report.from_checkpoint,
        "breaks": len(report.breaks),
        "differences": [vars(d) for d in report.differences[:20]],
    }
    if made is not None:
        out |= {"seq": made.seq, "position": made.position, "events": made.events,
                "rows": made.delta_rows, "hash": made.hash.hex()}  # fmt: skip
    if args.json:
        print(json.dumps(out))
    elif made is not None:
        print(f"checkpoint {made.seq} of {args.tenant} at position {made.position:,} "
              f"({made.events:,} events; {made.delta_rows:,} state rows written; "
              f"{report.events_checked:,} events verified): {made.hash.hex()}")  # fmt: skip
    else:
        print(f"NOT taken: the log does not verify ({len(report.breaks)} breaks, "
              f"{len(report.differences)} differences; `audit verify` lists them)")  # fmt: skip
    return 0 if made is not None else 1


def cmd_replay(args: argparse.Namespace) -> int:
    request = pb.ReplayHistoryRequest(
        tenant_id=args.tenant,
        user_id=args.user,
        conversation_id=args.conversation,
        from_position=args.from_position,
    )
    if args.since:
        request.from_time.CopyFrom(_stamp(args.since))
    with _stub(args.target) as stub, _progress("replaying; events") as progress:
        task = progress.add_task("replay", total=None)
        for answer in stub.ReplayHistory(request, timeout=CALL_TIMEOUT_S):
            end = answer.end
            progress.advance(task, len(answer.events))
            for e in answer.events:
                _print_event(e, args.json)
    summary = f"{end.events:,} events, last position {end.last_position}"
    err.print(summary + ("" if end.complete else f"; more from position {end.last_position + 1}"))
    return 0


def _print_event(e: pb.LedgerEvent, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(e, indent=None))
        return
    stream = "/".join(p for p in (e.user_id, e.conversation_id) if p) or "(tenant)"
    print(
        f"{e.position:>10} {e.occurred_at.ToJsonString()} {stream:<28} "
        f"v{e.version:<5} {e.event_type:<22} {' '.join(_event_facts(e))}"
    )


def _event_facts(e: pb.LedgerEvent) -> list[str]:
    """What this event says, as key=value: its own columns where set, then its data (a
    QuotaSet's limit and period, a PriceSet's prices, a commit's cost), never a 0 that the
    event does not hold."""
    u = e.usage
    facts = [f"model={e.model}"] if e.model else []
    facts += [e.reservation_id] if e.reservation_id else []
    facts += [f"amount={e.amount}"] if e.amount else []
    if u.input_tokens or u.output_tokens or u.cached_input_tokens:
        facts.append(f"in={u.input_tokens} out={u.output_tokens} cached={u.cached_input_tokens}")
    data = json.loads(e.data_json or "{}")
    return facts + [f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}"
                    for k, v in data.items()]  # fmt: skip


def cmd_balance_at(args: argparse.Namespace) -> int:
    with _stub(args.target) as stub:
        reply = stub.GetBalance(
            pb.GetBalanceRequest(
                tenant_id=args.tenant,
                user_id=args.user,
                conversation_id=args.conversation,
                as_of=_stamp(args.at),
            ),
            timeout=CALL_TIMEOUT_S,
        )
    if args.json:
        print(json_format.MessageToJson(reply, always_print_fields_with_no_presence=True))
        return 0
    table = Table("account", "limit", "period", "held", "used", "available",
                  title=f"as of {args.at.isoformat()}")  # fmt: skip
    for b in (*reply.ancestors, reply.balance):
        name = "/".join(p for p in (b.tenant_id, b.user_id, b.conversation_id) if p)
        table.add_row(
            name,
            str(b.limit) if b.HasField("limit") else "-",
            pb.Period.Name(b.period).removeprefix("PERIOD_").lower(),
            str(b.held),
            str(b.used),
            str(b.available) if b.HasField("available") else "-",
        )
    Console().print(table)
    return 0


def _query(args: argparse.Namespace, dims: list[Dimension]) -> pb.UsageQuery:
    until = args.until or datetime.now(UTC)
    return pb.UsageQuery(
        tenant_id=args.tenant,
        from_time=_stamp(args.since or until - timedelta(days=30)),
        to_time=_stamp(until),
        group_by=dims,
        user_id=args.user,
        model=args.model,
        time_zone=args.tz,
    )


def _rows(stub: pb_grpc.LedgerServiceStub, query: pb.UsageQuery, groups: list[str]) -> list[Record]:
    request = pb.ExportUsageRequest(query=query)
    return [
        reports.record(answer.row, groups, answer.currency)
        for answer in stub.ExportUsage(request, timeout=CALL_TIMEOUT_S)
    ]


def _emit(rows: list[Record], args: argparse.Namespace, groups: list[str], title: str) -> None:
    """CSV and JSON: every column of every row. A table: the chosen columns, fitted to the
    terminal (--width), with a totals row."""
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=reports.csv_columns(groups))
        writer.writeheader()
        writer.writerows(rows)
        return
    columns = reports.table_columns(groups, args.columns)
    zone = ZoneInfo(args.tz or "UTC")
    period = "hour" if "hour" in groups else "day"
    optional = () if args.columns else OPTIONAL_COLUMNS
    lines = reports.render_table(
        rows, columns, width=args.width, zone=zone, period=period, optional=optional
    )
    print("\n".join([*textwrap.wrap(title, args.width), *lines]))


def _title(what: str, args: argparse.Namespace, query: pb.UsageQuery) -> str:
    since, until = query.from_time.ToDatetime(UTC), query.to_time.ToDatetime(UTC)
    return f"{what} of {args.tenant}: {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC"


def _check(args: argparse.Namespace, groups: list[str]) -> str:
    """The one-line complaint about the options, or "" when they are usable."""
    unknown = [n for n in groups if n not in DIMENSIONS]
    if unknown:
        return f"unknown --by {', '.join(unknown)}; use {', '.join(DIMENSIONS)}"
    if args.columns and args.format != "table":
        return f"--columns chooses a table's columns; --format {args.format} carries them all"
    if args.width < WIDTH_MIN:
        return f"--width {args.width} is too narrow; at least {WIDTH_MIN}"
    if getattr(args, "limit", 1) < 1:
        return f"--limit {args.limit}: must be at least 1"
    try:
        reports.table_columns(groups, args.columns)
    except ValueError as exc:
        return str(exc)
    return ""


def cmd_usage(args: argparse.Namespace) -> int:
    groups = [n for n in args.by.split(",") if n]
    if problem := _check(args, groups):
        print(f"tokenledger usage: {problem}", file=sys.stderr)
        return 2
    query = _query(args, [DIMENSIONS[n] for n in groups])
    with _stub(args.target) as stub:
        rows = _rows(stub, query, groups)
    by = f" by {','.join(groups)}" if groups else ""
    _emit(rows, args, groups, _title("usage" + by, args, query))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    groups = [args.by]
    if problem := _check(args, groups):
        print(f"tokenledger top: {problem}", file=sys.stderr)
        return 2
    query = _query(args, [DIMENSIONS[args.by]])
    with _stub(args.target) as stub:
        rows = _rows(stub, query, groups)
    rows.sort(key=lambda r: r["total_tokens"], reverse=True)
    _emit(rows[: args.limit], args, groups, _title(f"top {args.limit} {args.by}s", args, query))
    return 0
