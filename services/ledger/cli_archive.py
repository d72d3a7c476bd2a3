"""`tokenledger audit archive`, `audit prune-partitions`, and the `--archive` of `audit verify`
(offline: no database, no server) and `audit replay` (the archive before the live log).

Archiving and pruning connect to DATABASE_URL as the schema's owner: they write
audit_archives and drop partitions, which the service's role may not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from ledger import archive
from ledger.archive import ArchiveReport, ArchiveUnreadable, Manifest
from ledger.errors import StoreUnavailable
from ledger.postgres.archive import Archiver, ArchiveRefused, PruneReport, month_start, prune
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.rows import logged_event
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.ledger import convert
from services.ledger.config import Settings
from services.platform import db

Command = Callable[[argparse.Namespace], int]


def add_commands(audit: Any, print_event: Callable[[pb.LedgerEvent, bool], None]) -> None:
    """The archive commands under `tokenledger audit`, and --archive on its verify and
    replay (`audit` is its subparsers; `print_event` prints a replayed event)."""
    p = audit.add_parser(
        "archive",
        help="export a tenant's events before a month to a verified, compressed file and "
        "record it (connects to DATABASE_URL as the schema's owner)",
    )
    p.add_argument("--tenant", required=True)
    p.add_argument("--before", required=True, help="YYYY-MM: archive what occurred before it")
    p.add_argument("--out", type=Path, help="the file (default: <tenant>-before-<YYYY-MM>.tla.gz)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=cmd_archive)
    p = audit.add_parser(
        "prune-partitions",
        help="drop the monthly partitions before a month if every event in them is in a "
        "verified archive (connects to DATABASE_URL as the schema's owner)",
    )
    p.add_argument("--before", required=True, help="YYYY-MM: drop the months before it")
    p.add_argument("--dry-run", action="store_true", help="say what would be dropped")
    p.set_defaults(run=cmd_prune)
    verify = audit.choices["verify"]
    verify.add_argument(
        "--archive", action="append", type=Path, default=[], metavar="FILE",
        help="verify archive files offline instead (no server, no database); give a "
        "tenant's archives in order to check that each continues the one before",
    )  # fmt: skip
    verify.set_defaults(run=_offline_or(verify.get_default("run")))
    replay = audit.choices["replay"]
    replay.add_argument(
        "--archive", action="append", type=Path, default=[], metavar="FILE",
        help="print the events of these archives (in order) first, then the live log after",
    )  # fmt: skip
    replay.set_defaults(run=_archive_first(replay.get_default("run"), print_event))


def _fail(command: str, message: str) -> int:
    print(f"tokenledger audit {command}: {message}", file=sys.stderr)
    return 2


def _today() -> date:
    return datetime.now(UTC).date()


def cmd_archive(args: argparse.Namespace) -> int:
    try:
        before = month_start(args.before)
        if not args.tenant:
            raise ArchiveRefused("--tenant: required")
        out = args.out or Path(f"{args.tenant}-before-{before:%Y-%m}.tla.gz")
        manifest = asyncio.run(_archive(args.tenant, before, out))
    except ArchiveRefused as exc:
        print(f"tokenledger audit archive: {exc}", file=sys.stderr)
        return exc.exit_code
    except StoreUnavailable as exc:
        return _fail("archive", f"{exc}; nothing was recorded, retry")
    if args.json:
        print(json.dumps({"file": str(out), **_summary(manifest)}))
        return 0
    print(
        f"archive {manifest.seq} of {manifest.tenant_id} before {manifest.before_month}: "
        f"{out} ({manifest.events:,} events, positions {manifest.first_position}.."
        f"{manifest.last_position}, ends at checkpoint {manifest.checkpoint['seq']} "
        f"{manifest.checkpoint['hash']}); verified and recorded. Keep the file: `audit "
        "prune-partitions` may now drop the months it covers."
    )
    return 0


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "tenant": m.tenant_id, "seq": m.seq, "before": m.before_month, "events": m.events,
        "first_position": m.first_position, "last_position": m.last_position,
        "checkpoint": m.checkpoint["seq"], "checkpoint_hash": m.checkpoint["hash"],
        "manifest_sha256": m.sha256(),
    }  # fmt: skip


async def _archive(tenant: str, before: date, out: Path) -> Manifest:
    settings = Settings.from_env()
    async with db.make_pool(settings.database_url or db.embedded_url(settings.data_dir), 2) as pool:
        with closing(LedgerAudit(pool, workers=settings.audit_workers)) as audit:
            return await Archiver(pool, audit).archive(tenant, before, out, _today())


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        before = month_start(args.before)
        report = asyncio.run(_prune(before, args.dry_run))
    except ArchiveRefused as exc:
        return _fail("prune-partitions", str(exc))
    except StoreUnavailable as exc:
        return _fail("prune-partitions", f"{exc}; nothing was dropped, retry")
    if not report.candidates:
        print(f"no monthly partition before {before:%Y-%m}")
        return 0
    if report.kept:
        print(
            f"nothing dropped: {len(report.kept)} of the partitions before {before:%Y-%m} "
            "hold events that no verified archive holds (`audit archive` them first)"
        )
        for name, missing in report.kept.items():
            print(f"  {name}: " + "; ".join(missing))
        return 1
    verb = "would drop" if args.dry_run else "dropped"
    print(f"{verb} {len(report.candidates)} partitions: {', '.join(report.candidates)}")
    return 0


async def _prune(before: date, dry_run: bool) -> PruneReport:
    settings = Settings.from_env()
    async with db.make_pool(settings.database_url or db.embedded_url(settings.data_dir), 2) as pool:
        return await prune(pool, before, _today(), dry_run)


# --- --archive on verify and replay ---------------------------------------------------------


def _offline_or(online: Command) -> Command:
    def run(args: argparse.Namespace) -> int:
        return _verify_offline(args) if args.archive else online(args)

    return run


def _verify_offline(args: argparse.Namespace) -> int:
    reports: list[ArchiveReport] = []
    previous: Manifest | None = None
    for path in args.archive:
        try:
            report = archive.verify(path, previous)
        except ArchiveUnreadable as exc:
            return _fail("verify", str(exc))
        if report.manifest.tenant_id != args.tenant:
            return _fail("verify", f"{path} is tenant {report.manifest.tenant_id!r}'s archive, "
                                   f"not {args.tenant!r}'s")  # fmt: skip
        reports.append(report)
        previous = report.manifest
    ok = not any(r.problems for r in reports)
    if args.json:
        out = [
            {"file": r.path, "events": r.events, "streams": r.streams, "problems": r.problems}
            | _summary(r.manifest)
            for r in reports
        ]
        print(json.dumps(out))
    else:
        print("\n".join(archive.describe(reports)))
    return 0 if ok else 1


def _archive_first(online: Command, print_event: Callable[[pb.LedgerEvent, bool], None]) -> Command:
    def run(args: argparse.Namespace) -> int:
        if not args.archive:
            return online(args)
        try:
            last = _replay_archives(args, print_event)
        except ArchiveUnreadable as exc:
            return _fail("replay", str(exc))
        except ArchiveRefused as exc:
            return _fail("replay", str(exc))
        args.from_position = max(args.from_position, last + 1)
        return online(args)

    return run


def _replay_archives(
    args: argparse.Namespace, print_event: Callable[[pb.LedgerEvent, bool], None]
) -> int:
    """Print the archives' events in scope; returns the last position they cover."""
    last = 0
    for path in args.archive:
        manifest, rows = archive.read(path)
        if manifest.tenant_id != args.tenant or manifest.first_position <= last:
            raise ArchiveRefused(f"{path} is not tenant {args.tenant!r}'s archive after "
                                 f"position {last}")  # fmt: skip
        for row in rows:
            if _wanted(args, row):
                print_event(convert.ledger_event(logged_event(row)), args.json)
        last = manifest.last_position
    return last


def _wanted(args: argparse.Namespace, row: dict[str, Any]) -> bool:
    return (
        (not args.user or row["user_id"] == args.user)
        and (not args.conversation or row["conversation_id"] == args.conversation)
        and row["position"] >= args.from_position
        and (args.since is None or row["occurred_at"] >= args.since)
    )
