"""Archiving a tenant's old events to a file, and dropping the partitions that archives cover
(ledger/archive.py has the file format and its offline verification).

An archive of tenant T before month M ends at one of T's checkpoints: the first at or after
T's last event that occurred before M (one is taken when there is none, which verifies the log
first). It holds T's events after its previous archive up to that checkpoint's position, so
it may hold a few events of M and later too (they stay in the live log). The file is written,
read back and verified, and only then recorded in `audit_archives`; a later verification of
the live log starts from the heads and state recorded there.

A partition is dropped only when every event in it lies in a recorded archive of its tenant
(a position no later than that archive's end), checked under a lock that keeps inserts out
of the partition until it is gone; if any month asked for is not covered, none is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ledger import archive
from ledger.archive import Manifest
from ledger.checkpoints import Checkpoint
from ledger.postgres import checkpoints
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.errors import translated

Conn = psycopg.AsyncConnection[dict[str, Any]]

# Every column: the archive line takes the ones it keeps (ledger/archive.py event_line).
_EXPORT_SQL = """SELECT * FROM events
   WHERE tenant_id = %s AND position > %s AND position <= %s ORDER BY position"""
_LAST_ARCHIVE_SQL = """SELECT seq, before_month, checkpoint_seq, first_position, last_position,
       events, heads, manifest_sha256 FROM audit_archives
   WHERE tenant_id = %s ORDER BY seq DESC LIMIT 1"""
_INSERT_ARCHIVE_SQL = """INSERT INTO audit_archives (tenant_id, seq, before_month,
       checkpoint_seq, first_position, last_position, events, heads, manifest_sha256,
       file_sha256, file_name, created_at)
   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""
FETCH_ROWS = 5_000
_PARTITION_NAME = re.compile(r"events_(\d{4})_(\d{2})")


class ArchiveRefused(Exception):
    """Nothing was archived or dropped, and why. `exit_code` 1: the log does not verify (or
    does not match its checkpoint); 2: the request cannot be done as asked."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ArchiveRecord:
    """A row of audit_archives: a verified archive of a tenant's events up to a checkpoint."""

    tenant_id: str
    seq: int
    before_month: date
    checkpoint_seq: int
    first_position: int
    last_position: int
    events: int
    heads: archive.Heads
    manifest_sha256: bytes


async def last_archive(conn: Conn, tenant_id: str) -> ArchiveRecord | None:
    cur = await conn.execute(_LAST_ARCHIVE_SQL, (tenant_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    heads = row["heads"] if isinstance(row["heads"], dict) else json.loads(row["heads"])
    return ArchiveRecord(
        tenant_id, row["seq"], row["before_month"], row["checkpoint_seq"],
        row["first_position"], row["last_position"], row["events"], heads,
        bytes(row["manifest_sha256"]),
    )  # fmt: skip


def month_start(text: str) -> date:
    """YYYY-MM as the first day of that month; anything else is refused."""
    if not re.fullmatch(r"\d{4}-\d{2}", text):
        raise ArchiveRefused(f"--before {text!r}: expected a month as YYYY-MM")
    try:
        return date(int(text[:4]), int(text[5:]), 1)
    except ValueError:
        raise ArchiveRefused(f"--before {text!r}: no such month") from None


def _not_after_this_month(before: date, today: date) -> None:
    if before > today.replace(day=1):
        raise ArchiveRefused(
            f"--before {before:%Y-%m} is after the current month {today:%Y-%m}: only months "
            "that have begun can be archived"
        )


@dataclass
class _Plan:
    tenant_id: str
    before: date
    previous: ArchiveRecord | None
    checkpoint: Checkpoint
    events_before: int


class Archiver:
    """`tokenledger audit archive` and `audit prune-partitions`, against the primary, as a
    role that may write audit_archives and drop partitions (the schema's owner)."""

    def __init__(self, pool: AsyncConnectionPool[Conn], audit: LedgerAudit) -> None:
        self._pool = pool
        self._audit = audit

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        with translated():
            async with self._pool.connection() as conn:
                yield conn

    async def archive(self, tenant_id: str, before: date, out: Path, today: date) -> Manifest:
        """Write, verify and record an archive of the tenant's events before `before`."""
        _not_after_this_month(before, today)
        _check_out(out)
        plan = await self._plan(tenant_id, before)
        manifest = await self._write(plan, out)
        report = archive.verify(out)
        if report.problems:
            _discard(out)
            raise ArchiveRefused(
                f"the archive written does not verify ({report.problems[0]}); removed it, "
                "nothing recorded",
                exit_code=1,
            )
        await self._record(plan, manifest, *_file_facts(out))
        return manifest

    async def _plan(self, tenant_id: str, before: date) -> _Plan:
        async with self._conn() as conn:
            previous = await last_archive(conn, tenant_id)
            if previous is not None and previous.before_month >= before:
                raise ArchiveRefused(
                    f"tenant {tenant_id!r} is archived up to {previous.before_month:%Y-%m} "
                    f"already (archive {previous.seq})"
                )
            after = previous.last_position if previous else 0
            cur = await conn.execute(
                "SELECT max(position) AS p FROM events WHERE tenant_id = %s "
                "AND occurred_at < %s AND position > %s",
                (tenant_id, datetime(before.year, before.month, 1, tzinfo=UTC), after),
            )
            end = (await cur.fetchone() or {}).get("p")
            if end is None:
                raise ArchiveRefused(
                    f"tenant {tenant_id!r} has no event before {before:%Y-%m}"
                    + (f" after archive {previous.seq}" if previous else "")
                )
            found = await checkpoints.read_all(conn, tenant_id)
        chosen = await self._checkpoint_at_or_after(tenant_id, end, found)
        events_before = 0
        if previous is not None:
            events_before = next(c.events for c in found if c.seq == previous.checkpoint_seq)
        return _Plan(tenant_id, before, previous, chosen, events_before)

    async def _checkpoint_at_or_after(
        self, tenant_id: str, position: int, found: list[Checkpoint]
    ) -> Checkpoint:
        """The tenant's first checkpoint at or after `position`; one is taken if none is."""
        chosen = next((c for c in found if c.position >= position), None)
        if chosen is not None:
            return chosen
        report, made = await self._audit.checkpoint(tenant_id)
        if made is None:
            raise ArchiveRefused(
                f"the log of tenant {tenant_id!r} does not verify ({len(report.breaks)} breaks, "
                f"{len(report.differences)} differences; `audit verify` lists them): no "
                "checkpoint, no archive",
                exit_code=1,
            )
        return made

    async def _write(self, plan: _Plan, out: Path) -> Manifest:
        """Stream the events to a file beside `out`, then give it its name (never replacing
        a file that appeared meanwhile)."""
        partial = out.with_name(out.name + ".partial")
        start = plan.previous.heads if plan.previous else {}
        after = plan.previous.last_position if plan.previous else 0
        try:
            with partial.open("xb") as f:
                writer = archive.Writer(f, start)
                async with self._conn() as conn, conn.transaction():
                    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    async with conn.cursor(name="archive") as cur:
                        await cur.execute(
                            _EXPORT_SQL, (plan.tenant_id, after, plan.checkpoint.position)
                        )
                        while rows := await cur.fetchmany(FETCH_ROWS):
                            for row in rows:
                                writer.add(row)
                manifest = _manifest(plan, writer)
                _check_count(plan, writer.events)
                writer.finish(manifest)
            os.link(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        return manifest

    async def _record(self, plan: _Plan, m: Manifest, file_sha256: bytes, path: str) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('tokenledger archive ' || %s))",
                (plan.tenant_id,),
            )
            latest = await last_archive(conn, plan.tenant_id)
            if (latest.seq if latest else 0) + 1 != m.seq:
                raise ArchiveRefused(
                    f"another archive of tenant {plan.tenant_id!r} was recorded meanwhile; "
                    f"{path} is not recorded: remove it and run again"
                )
            await conn.execute(
                _INSERT_ARCHIVE_SQL,
                (
                    m.tenant_id, m.seq, plan.before, plan.checkpoint.seq, m.first_position,
                    m.last_position, m.events, json.dumps(m.heads), bytes.fromhex(m.sha256()),
                    file_sha256, path, datetime.now(UTC),
                ),
            )  # fmt: skip


def _manifest(plan: _Plan, writer: archive.Writer) -> Manifest:
    previous = plan.previous
    return Manifest(
        tenant_id=plan.tenant_id,
        seq=(previous.seq if previous else 0) + 1,
        before_month=f"{plan.before:%Y-%m}",
        first_position=writer.first_position,
        last_position=writer.last_position,
        events=writer.events,
        events_before=plan.events_before,
        start_heads=previous.heads if previous else {},
        heads=writer.heads,
        checkpoint=archive.checkpoint_to_json(plan.checkpoint),
        payload_sha256=writer.payload_sha256,
        previous_manifest_sha256=previous.manifest_sha256.hex() if previous else "",
    )


def _check_count(plan: _Plan, written: int) -> None:
    """The live log must still hold every event the checkpoint counted up to its position."""
    expected = plan.checkpoint.events - plan.events_before
    if written != expected:
        raise ArchiveRefused(
            f"{written} events of tenant {plan.tenant_id!r} up to position "
            f"{plan.checkpoint.position}, but checkpoint {plan.checkpoint.seq} counted "
            f"{expected}: the log has changed (`audit verify` says where); nothing archived",
            exit_code=1,
        )


def _check_out(out: Path) -> None:
    if out.exists():
        raise ArchiveRefused(f"--out {out}: the file exists; archives are never overwritten")
    if not out.parent.is_dir():
        raise ArchiveRefused(f"--out {out}: no such directory {out.parent}")


def _discard(out: Path) -> None:
    out.unlink()


def _file_facts(path: Path) -> tuple[bytes, str]:
    """The file's sha256 and absolute name, as audit_archives records them."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest(), str(path.resolve())


# --- dropping partitions --------------------------------------------------------------------


@dataclass
class PruneReport:
    candidates: list[str] = field(default_factory=list)
    """The monthly partitions before the month asked for."""
    dropped: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)
    """Partition -> why it may not be dropped (tenants with events no archive holds)."""


_PARTITIONS_SQL = """SELECT c.relname AS name FROM pg_inherits i
   JOIN pg_class c ON c.oid = i.inhrelid
   WHERE i.inhparent = 'events'::regclass ORDER BY c.relname"""
# Per tenant with events in the partition, how many no recorded archive of it holds.
_UNARCHIVED_SQL = """SELECT e.tenant_id, count(*) AS n FROM {} e
   WHERE NOT EXISTS (SELECT 1 FROM audit_archives a
                     WHERE a.tenant_id = e.tenant_id AND a.last_position >= e.position)
   GROUP BY e.tenant_id ORDER BY e.tenant_id LIMIT 20"""


def _months_before(names: list[str], before: date) -> list[str]:
    """The monthly partitions that end on or before `before` (the default one never)."""
    out = []
    for name in names:
        m = _PARTITION_NAME.fullmatch(name)
        if m and date(int(m[1]), int(m[2]), 1) < before:
            out.append(name)
    return out


async def prune(
    pool: AsyncConnectionPool[Conn], before: date, today: date, dry_run: bool = False
) -> PruneReport:
    """Detach and drop every monthly partition before `before` if every event in each lies
    in a recorded archive; if any does not, drop none (all in one transaction)."""
    _not_after_this_month(before, today)
    report = PruneReport()
    with translated():
        async with pool.connection() as conn, conn.transaction() as tx:
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            cur = await conn.execute(_PARTITIONS_SQL)
            names = _months_before([r["name"] for r in await cur.fetchall()], before)
            report.candidates = names
            for name in names:
                await _check_covered(conn, name, report)
            if report.kept or dry_run:
                raise psycopg.Rollback(tx)  # the locks go, nothing changed
            for name in names:
                table = sql.Identifier(name)
                await conn.execute(sql.SQL("ALTER TABLE events DETACH PARTITION {}").format(table))
                await conn.execute(sql.SQL("DROP TABLE {}").format(table))
                report.dropped.append(name)
    return report


async def _check_covered(conn: Conn, name: str, report: PruneReport) -> None:
    table = sql.Identifier(name)
    # SHARE: no insert into the partition until it is gone or the transaction ends.
    await conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(table))
    cur = await conn.execute(sql.SQL(_UNARCHIVED_SQL).format(table))
    if missing := [f"{r['tenant_id']}: {r['n']:,} events" for r in await cur.fetchall()]:
        report.kept[name] = missing
