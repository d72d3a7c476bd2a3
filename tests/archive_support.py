"""A log spread over three months, for the archive tests and bench: the months are counted
back from today, so the tests hold on any date."""

from __future__ import annotations

import asyncio
import gzip
import json
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg

from ledger.checkpoints import Checkpoint
from ledger.postgres.audit import LedgerAudit
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.platform import db
from tests.support import Clock, ServerThread, cycle, new_id


def month_back(today: date, n: int) -> date:
    """The first day of the month `n` months before today's."""
    months = today.year * 12 + today.month - 1 - n
    return date(months // 12, months % 12 + 1, 1)


@dataclass(frozen=True)
class Months:
    old: date  # two months ago
    mid: date  # last month
    now: date  # this month

    @classmethod
    def today(cls) -> Months:
        today = datetime.now(UTC).date()
        return cls(month_back(today, 2), month_back(today, 1), month_back(today, 0))


def at(month: date) -> datetime:
    return datetime(month.year, month.month, 6, 10, tzinfo=UTC)


def take_checkpoint(url: str, tenant: str) -> Checkpoint:
    async def run() -> Checkpoint:
        async with db.make_pool(url, 2) as pool:
            with closing(LedgerAudit(pool)) as audit:
                report, made = await audit.checkpoint(tenant)
        assert made is not None, report
        return made

    return asyncio.run(run())


def traffic(server: ServerThread, tenant: str, users: int, rounds: int = 1) -> None:
    with server.stub() as stub:
        stub.SetQuota(pb.SetQuotaRequest(
            idempotency_key=new_id("q"), tenant_id=tenant, user_id="u0", limit=10**9,
            period=pb.PERIOD_MONTH,
        ))  # fmt: skip
        for r in range(rounds):
            for n in range(users):
                cycle(stub, tenant, f"u{n}", f"c{n % 2}", 100 + n + r, -1 if n % 5 == 4 else 60)


def three_months(url: str, tenants: list[str], checkpoints: list[str], users: int = 6) -> Months:
    """Traffic of every tenant two months ago, last month and now; a checkpoint of each of
    `checkpoints` after the first two (where a server would take them)."""
    months = Months.today()
    with psycopg.connect(url) as conn:  # what a sweeper running then would have made
        conn.execute("SELECT events_create_partitions(%s, 4)", (months.old,))
    clock = Clock()
    server = ServerThread(url, clock=clock).start()
    try:
        for month in (months.old, months.mid, months.now):
            clock.now = at(month) if month != months.now else datetime.now(UTC)
            for tenant in tenants:
                traffic(server, tenant, users)
            if month != months.now:
                for tenant in checkpoints:
                    take_checkpoint(url, tenant)
    finally:
        server.stop()
    return months


def rewrite(src: Path, dst: Path, edit: Any) -> None:
    """Copy an archive, its uncompressed lines passed through edit(lines) -> lines."""
    with gzip.open(src, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    with gzip.open(dst, "wb") as f:
        f.write(b"".join(edit(lines)))


def edit_manifest(lines: list[bytes], change: Any) -> list[bytes]:
    manifest = json.loads(lines[-1])
    change(manifest)
    return [*lines[:-1], json.dumps(manifest).encode() + b"\n"]


def partitions(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        names = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'events'::regclass"
        ).fetchall()
        counts = dict(
            conn.execute("SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1")
        )
    return {name: counts.get(name, 0) for (name,) in names}


def archive_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM audit_archives").fetchone()
    assert row is not None
    return int(row[0])
