"""`make bench` (partitions and archives): what archiving a month costs and saves, and what
partitioning costs the write path.

1. A tenant's log of two months (by default 2,000 users, 31 days of October with a checkpoint
   after them, then 14 days of November: 182,000 events, with real chains, written by COPY) is
   archived before November (export, read back and verified, recorded), the archive is
   verified offline and read back (what a replay through it costs), October's partition is
   dropped, and the live log is verified from the archive. Bytes per event on disk (every
   partition with its indexes) and in the archive.
2. The same appends (the store's INSERT, ten events a transaction) into a log before
   migration 0014 and one after it (the partitioned table, its head trigger), in alternating
   chunks; then the first is converted by the migration, timed.

The machine's load is printed with the figures: other engineers' work shares it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, date, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from psycopg.types.json import Jsonb

from ledger import archive, codec
from ledger.archive import Manifest
from ledger.model import AccountKey, Event
from ledger.postgres.archive import Archiver, prune
from ledger.postgres.audit import LedgerAudit
from ledger.reads import Scope, VerifyReport
from services.platform import db
from tests.bench.audit_bench import TENANT, history
from tests.bench.checkpoint_bench import Writer, machine, take_checkpoint
from tests.bench.harness import bench_database

OCTOBER, NOVEMBER = date(2026, 10, 1), date(2026, 11, 1)
_COLUMNS = (*codec.HASHED_COLUMNS, "prev_hash", "hash")
_INSERT = (
    f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ("  # noqa: S608 (constant names)
    + ", ".join(f"%({c})s" for c in _COLUMNS)
    + ")"
)


def disk_bytes(url: str) -> tuple[int, int]:
    """(bytes of every partition of events with its indexes, events)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0), "
            "(SELECT count(*) FROM events) FROM pg_inherits "
            "WHERE inhparent = 'events'::regclass"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


async def _archive(url: str, out: Path) -> tuple[float, Manifest]:
    async with db.make_pool(url, 2) as pool:
        with closing(LedgerAudit(pool, workers=2)) as audit:
            started = time.perf_counter()
            m = await Archiver(pool, audit).archive(TENANT, NOVEMBER, out, NOVEMBER)
            return time.perf_counter() - started, m


async def _prune_and_verify(url: str) -> tuple[float, list[str], float, VerifyReport]:
    async with db.make_pool(url, 2) as pool:
        started = time.perf_counter()
        dropped = (await prune(pool, NOVEMBER, NOVEMBER)).dropped
        pruned_s = time.perf_counter() - started
        with closing(LedgerAudit(pool, workers=2)) as audit:
            started = time.perf_counter()
            report = await audit.verify(Scope(TENANT))
            return pruned_s, dropped, time.perf_counter() - started, report


def read_all(path: Path) -> int:
    _, rows = archive.read(path)
    return sum(1 for _ in rows)


def archive_part(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        conn.execute("SELECT events_create_partitions(%s, 4)", (OCTOBER,))
    writer, everything = Writer(), history(args.users, 45, 1)
    october = args.users + 31 * args.users * 2
    writer.append(url, islice(everything, october))
    asyncio.run(take_checkpoint(url))
    out: dict[str, Any] = {"events": october + writer.append(url, everything)}
    out["disk_before"] = disk_bytes(url)
    out["load_before"] = machine()
    path = tmp / "october.tla.gz"
    out["archive_s"], manifest = asyncio.run(_archive(url, path))
    out["archived"] = manifest.events
    out["archive_bytes"] = path.stat().st_size
    out["verify_offline_s"], report = timed(archive.verify, path)
    assert not report.problems, report.problems[:3]
    out["read_s"], read = timed(read_all, path)
    assert read == manifest.events
    out["prune_s"], out["dropped"], out["verify_live_s"], live = asyncio.run(_prune_and_verify(url))
    assert not live.breaks and not live.differences, live.differences[:3]
    out["live_verified"] = live.events_checked
    out["disk_after"] = disk_bytes(url)
    out["load_after"] = machine()
    return out


def _rows(events: Iterator[Event], heads: dict[AccountKey, tuple[int, bytes]]) -> Any:
    for event in events:
        version, head = heads.get(event.key, (0, codec.GENESIS_HASH))
        row = codec.event_row(event, version + 1, head)
        heads[event.key] = (version + 1, row["hash"])
        yield {**row, "data": Jsonb(row["data"])}


def insert_rate(url: str, rows: list[dict[str, Any]], per_transaction: int = 10) -> float:
    """Events a second through the store's INSERT, `per_transaction` at a time."""
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        for i in range(0, len(rows), per_transaction):
            with conn.transaction(), conn.pipeline(), conn.cursor() as cur:
                cur.executemany(_INSERT, rows[i : i + per_transaction])
        return len(rows) / (time.perf_counter() - started)


def write_path_part(
    plain_url: str, partitioned_url: str, n: int, rounds: int = 5
) -> dict[str, Any]:
    """The same rows into both logs, in alternating chunks (the machine's load moves between
    them, not from one to the other); then the plain log is converted."""
    config = db._config(plain_url)
    command.downgrade(config, "0012")
    heads: dict[AccountKey, tuple[int, bytes]] = {}
    rows = list(_rows(history(n // 40, 20, 1), heads))
    chunk = len(rows) // rounds
    out: dict[str, Any] = {"load_before": machine(), "plain": [], "partitioned": []}
    for r in range(rounds):
        part = rows[r * chunk : (r + 1) * chunk]
        out["plain"].append(round(insert_rate(plain_url, part)))
        out["partitioned"].append(round(insert_rate(partitioned_url, part)))
    out["convert_s"], _ = timed(command.upgrade, config, "head")
    out["converted"] = chunk * rounds
    out["load_after"] = machine()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--write-events", type=int, default=40_000)
    args = parser.parse_args()
    with bench_database() as url, tempfile.TemporaryDirectory() as tmp:
        a = archive_part(url, args, Path(tmp))
    with bench_database() as plain, bench_database() as partitioned:
        w = write_path_part(plain, partitioned, args.write_events)
    report(a, w)


def report(a: dict[str, Any], w: dict[str, Any]) -> None:
    n, bytes_before = a["archived"], a["disk_before"][0]
    print(f"\npartitions and archives (machine: {a['load_before']} before, "
          f"{a['load_after']} after):")  # fmt: skip
    print(f"  log {a['events']:,} events; archive of October ({n:,} events): "
          f"{a['archive_s']:.1f} s = {n / a['archive_s']:,.0f} events/s "
          "(export, read back and verify, record)")  # fmt: skip
    print(f"  offline verification {n / a['verify_offline_s']:,.0f} events/s; reading it back "
          f"(replay through it) {n / a['read_s']:,.0f} events/s")  # fmt: skip
    print(f"  bytes per event: on disk {bytes_before / a['disk_before'][1]:.0f} (partitions "
          f"with indexes), in the archive {a['archive_bytes'] / n:.0f} (gzip)")  # fmt: skip
    print(f"  prune: dropped {a['dropped']} in {a['prune_s']:.2f} s; on disk "
          f"{bytes_before:,} -> {a['disk_after'][0]:,} bytes; live verification from the "
          f"archive ({a['live_verified']:,} events) {a['verify_live_s']:.1f} s")  # fmt: skip
    print(f"write path (machine: {w['load_before']} before, {w['load_after']} after):")
    plain, partitioned = statistics.median(w["plain"]), statistics.median(w["partitioned"])
    print(f"  the store's INSERT, 10 events a transaction, alternating chunks: before 0014 "
          f"median {plain:,.0f} events/s {w['plain']}, partitioned {partitioned:,.0f} events/s "
          f"{w['partitioned']}")  # fmt: skip
    print(f"  migration 0014 converting {w['converted']:,} events: {w['convert_s']:.1f} s")
    print(json.dumps({"archive": a, "write": w, "at": datetime.now(UTC).isoformat()},
                     separators=(",", ":"), default=str))  # fmt: skip


if __name__ == "__main__":
    main()
