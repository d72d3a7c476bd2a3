"""`make bench` (checkpoints): what a routine audit costs once a checkpoint exists.

A base log (by default 10,000 users x 6 days = 250,000 events; `--days 30` gives the
1,210,000 of audit_bench.py) is written straight into the tables with real hash chains, a
checkpoint is taken (a full verification plus the state it records), one more day is appended
(10,000 users x 2 cycles x 2 events = 40,000 events) and a second checkpoint taken from the
first, one more day appended, and then, over gRPC on a `tokenledger serve` process:
VerifyAudit from the second checkpoint, and the full VerifyAudit (which also checks both
checkpoints), once the server has started its audit workers (it starts them with itself: the
figures are a routine audit's on a server that is up). The machine's load is printed with the
figures: other engineers' work shares it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import psycopg

from ledger import codec
from ledger.checkpoints import Checkpoint
from ledger.model import AccountKey, Event
from ledger.postgres.audit import LedgerAudit
from ledger.replay import Projection
from ledger.usage import UsageCounters, UsageKey, add_usage
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.platform import db
from tests.bench.audit_bench import EVENT_COLUMNS, TENANT, _copy_projections, history
from tests.bench.harness import bench_database, ledger_process

CALL_TIMEOUT_S = 3600
WORKERS = 2


class Writer:
    """Appends events with real chains and keeps the projections they fold into."""

    def __init__(self) -> None:
        self.heads: dict[AccountKey, tuple[int, bytes]] = {}
        self.projection = Projection()
        self.usage: dict[UsageKey, UsageCounters] = {}

    def append(self, url: str, events: Any) -> int:
        """COPY `events` and replace the tenant's projections with the fold so far."""
        count = 0
        with psycopg.connect(url) as conn:
            with conn.cursor().copy(f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as cp:
                for event in events:
                    self._write(cp, event)
                    count += 1
            for table in ("accounts", "reservations", "usage_hourly"):
                conn.execute(f"DELETE FROM {table} WHERE tenant_id = %s", (TENANT,))  # noqa: S608
            _copy_projections(conn, self.projection, self.heads, self.usage)
        return count

    def _write(self, copy: Any, event: Event) -> None:
        version, head = self.heads.get(event.key, (0, codec.GENESIS_HASH))
        row = codec.event_row(event, version + 1, head)
        self.heads[event.key] = (version + 1, row["hash"])
        copy.write_row([json.dumps(row["data"]) if c == "data" else row[c] for c in EVENT_COLUMNS])
        self.projection.feed(event)
        add_usage(self.usage, event)


async def take_checkpoint(url: str) -> tuple[float, Checkpoint]:
    async with db.make_pool(url, 2) as pool:
        with closing(LedgerAudit(pool, workers=WORKERS)) as audit:
            started = time.perf_counter()
            report, made = await audit.checkpoint(TENANT)
            assert made is not None, (report.breaks[:3], report.differences[:3])
            return round(time.perf_counter() - started, 2), made


async def verify_times(target: str, from_checkpoint: bool, repeats: int) -> tuple[list[float], Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LedgerServiceStub(channel)
        samples, report = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            report = await stub.VerifyAudit(
                pb.VerifyAuditRequest(tenant_id=TENANT, from_checkpoint=from_checkpoint),
                timeout=CALL_TIMEOUT_S,
            )
            samples.append(round(time.perf_counter() - started, 2))
            assert report.chains_ok and report.projections_match and report.checkpoints_ok
        return samples, report


def wait_for_audit_workers(log: Path, timeout_s: float = 60) -> None:
    """Until the server says its audit workers have started (it starts them with itself):
    the figures are a routine audit's on a server that is up, not its first one's."""
    deadline = time.monotonic() + timeout_s
    while '"audit workers started"' not in log.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not start its audit workers: see {log}")
        time.sleep(0.1)


def sizes(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        out = {}
        for table in ("audit_checkpoints", "audit_checkpoint_rows"):
            row = conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()
            out[table] = int(row[0]) if row else 0
        # A partitioned table has no storage of its own (migration 0014): its partitions do.
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
            "WHERE inhparent = 'events'::regclass"
        ).fetchone()
        out["events"] = int(row[0]) if row else 0
        return out


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, load average {load}"


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    writer = Writer()
    everything = history(args.users, args.days + 2, args.cycles_per_day)
    base = args.users + args.days * args.cycles_per_day * args.users * 2
    started = time.perf_counter()
    assert writer.append(url, islice(everything, base)) == base
    out: dict[str, Any] = {"base_events": base, "written_s": round(time.perf_counter() - started)}
    out["first_checkpoint_s"], first = asyncio.run(take_checkpoint(url))
    out["first_checkpoint_rows"] = first.delta_rows
    day = args.cycles_per_day * args.users * 2
    assert writer.append(url, islice(everything, day)) == day
    out["day_events"] = day
    out["second_checkpoint_s"], second = asyncio.run(take_checkpoint(url))
    out["second_checkpoint_rows"] = second.delta_rows
    out["appended_events"] = writer.append(url, everything)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"TOKENLEDGER_LOG_LEVEL": "info", "TOKENLEDGER_AUDIT_WORKERS": str(WORKERS)}
        log = Path(tmp) / "server.log"
        with ledger_process(url, log, **env) as target:
            wait_for_audit_workers(log)
            out["load_before"] = machine()
            samples, report = asyncio.run(verify_times(target, True, args.repeats))
            assert report.events_checked == out["appended_events"], report.events_checked
            out["incremental_s"] = samples
            full, report = asyncio.run(verify_times(target, False, 1))
            assert report.events_checked == base + day + out["appended_events"]
            assert report.checkpoints_checked == 2
            out["full_s"] = full[0]
            out["load_after"] = machine()
    out["total_events"] = base + day + out["appended_events"]
    out["bytes"] = sizes(url)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=6, help="of the base log (30: 1.21M events)")
    parser.add_argument("--cycles-per-day", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with bench_database() as url:
        r = run(url, args)
    total = r["total_events"]
    median = statistics.median(r["incremental_s"])
    print(f"\ncheckpoints ({WORKERS} audit workers; machine: {r['load_before']} before the "
          f"verifications, {r['load_after']} after):")  # fmt: skip
    print(f"  base log {r['base_events']:,} events (written in {r['written_s']} s); first "
          f"checkpoint (full verification + {r['first_checkpoint_rows']:,} state rows) "
          f"{r['first_checkpoint_s']} s")  # fmt: skip
    print(f"  second checkpoint, {r['day_events']:,} events later (verified from the "
          f"first): {r['second_checkpoint_s']} s, {r['second_checkpoint_rows']:,} state rows "
          "written")  # fmt: skip
    print(f"  VerifyAudit from the second checkpoint, {r['appended_events']:,} new events: median "
          f"{median} s = {round(r['appended_events'] / median):,} events/s "
          f"(runs: {r['incremental_s']})")  # fmt: skip
    print(f"  full VerifyAudit of all {total:,} events (and both checkpoints): {r['full_s']} s "
          f"= {round(total / r['full_s']):,} events/s")  # fmt: skip
    b = r["bytes"]
    print(f"  on disk: events {b['events'] / total:.0f} bytes/event (table + indexes); "
          f"checkpoints {b['audit_checkpoints'] + b['audit_checkpoint_rows']:,} bytes "
          "for two")  # fmt: skip
    print(json.dumps(r, separators=(",", ":")))


if __name__ == "__main__":
    main()
