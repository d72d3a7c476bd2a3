"""`make bench` (audit part): replay and verify throughput on a log of 1M+ events, and
QueryUsage latency over 30 days x 10k users.

The full verification is also measured side by side in this process, by both designs on the
same log and the same number of audit workers, alternating (the machine's load is printed
with each run): the handoff (user parts hand the tenant part their events' effects on its
account) and the design before it (the tenant part reads and decodes every event again;
ledger/postgres/verify.py, Part.before_handoff).

The history is written straight into the tables (COPY): real hash chains made by the ledger's
own codec, and projections from the ledger's own replay, so VerifyAudit finds it consistent.
Then a `tokenledger serve` process is measured over gRPC from this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg

from ledger import codec
from ledger.application import Ledger
from ledger.model import (
    AccountKey,
    Period,
    QuotaSet,
    ReservationCommitted,
    TokensReserved,
    Usage,
)
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.rows import ACCOUNT_COLUMNS
from ledger.postgres.store import PostgresStore
from ledger.reads import Scope
from ledger.replay import Projection
from ledger.usage import COUNTER_NAMES, UsageCounters, UsageKey, add_usage
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.platform import db
from tests.bench.harness import Latencies, bench_database, cpu_seconds, ledger_process
from tests.support import stamp

TENANT = "bench-audit"
START = datetime(2026, 10, 1, tzinfo=UTC)
CALL_TIMEOUT_S = 3600
_T = TypeVar("_T")
EVENT_COLUMNS = (*codec.HASHED_COLUMNS, "prev_hash", "hash")


def history(users: int, days: int, cycles_per_day: int) -> Any:
    """Events of a tenant: a quota per user, then reserve→commit cycles every day."""
    for u in range(users):
        yield QuotaSet(
            key=AccountKey(TENANT, f"u{u}"), occurred_at=START, limit=10**9, period=Period.MONTH
        )
    for day in range(days):
        for c in range(cycles_per_day):
            at = START + timedelta(days=day, hours=8 + c, minutes=1)
            for u in range(users):
                key = AccountKey(TENANT, f"u{u}", f"c{day % 3}")
                rid = f"rsv_{u}_{day}_{c}"
                model = "gpt-4o" if u % 3 else "llama-3"
                yield TokensReserved(
                    key=key, occurred_at=at, model=model, reservation_id=rid, amount=1000,
                    expires_at=at + timedelta(minutes=10),
                )  # fmt: skip
                yield ReservationCommitted(
                    key=key, occurred_at=at + timedelta(seconds=2), model=model,
                    reservation_id=rid, amount=1000, usage=Usage(300 + u % 500, 120, 40),
                    reserved_at=at,
                )  # fmt: skip


def write_history(url: str, users: int, days: int, cycles_per_day: int) -> int:
    """COPY the history and its projections; returns the number of events."""
    heads: dict[AccountKey, tuple[int, bytes]] = {}
    projection = Projection()
    usage: dict[UsageKey, UsageCounters] = {}
    count = 0
    with psycopg.connect(url) as conn:
        with conn.cursor().copy(f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
            for event in history(users, days, cycles_per_day):
                version, head = heads.get(event.key, (0, codec.GENESIS_HASH))
                row = codec.event_row(event, version + 1, head)
                heads[event.key] = (version + 1, row["hash"])
                copy.write_row(
                    [json.dumps(row["data"]) if c == "data" else row[c] for c in EVENT_COLUMNS]
                )
                projection.feed(event)
                add_usage(usage, event)
                count += 1
        _copy_projections(conn, projection, heads, usage)
    return count


def _copy_projections(
    conn: psycopg.Connection[Any],
    projection: Projection,
    heads: dict[AccountKey, tuple[int, bytes]],
    usage: dict[UsageKey, UsageCounters],
) -> None:
    with conn.cursor().copy(f"COPY accounts ({ACCOUNT_COLUMNS}) FROM STDIN") as copy:
        for k, a in projection.accounts.items():
            version, head = heads.get(k, (0, codec.GENESIS_HASH))
            copy.write_row([k.tenant_id, k.user_id, k.conversation_id, a.limit, a.period.value,
                            a.window_hours, a.time_zone, a.soft_limit_percent,
                            a.grant_order.value, a.held, a.used_total, a.used_day, a.day_start,
                            a.used_month, a.month_start, json.dumps([list(b) for b in a.recent]),
                            json.dumps(codec.grants_to_json(a.grants)),
                            json.dumps(list(a.alert_thresholds)), json.dumps(list(a.alerts_fired)),
                            a.alerts_period,
                            None if a.money is None else json.dumps(
                                codec.account_to_json(a.money)),
                            version, head])  # fmt: skip
    columns = ("tenant_id, reservation_id, user_id, conversation_id, model, amount, state, "
               "created_at, expires_at, labels, input_tokens, output_tokens, "
               "cached_input_tokens, late, ended_at")  # fmt: skip
    with conn.cursor().copy(f"COPY reservations ({columns}) FROM STDIN") as copy:
        for r in projection.reservations.values():
            u = r.usage or Usage()
            copy.write_row([r.key.tenant_id, r.reservation_id, r.key.user_id,
                            r.key.conversation_id, r.model, r.amount, r.state.value,
                            r.created_at, r.expires_at, "{}", u.input_tokens, u.output_tokens,
                            u.cached_input_tokens, r.late, r.ended_at])  # fmt: skip
    columns = "tenant_id, hour, user_id, conversation_id, model, " + ", ".join(COUNTER_NAMES)
    with conn.cursor().copy(f"COPY usage_hourly ({columns}) FROM STDIN") as copy:
        for k, c in usage.items():
            copy.write_row([k.tenant_id, k.hour, k.user_id, k.conversation_id, k.model,
                            *(getattr(c, n) for n in COUNTER_NAMES)])  # fmt: skip
    conn.execute("ANALYZE")


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


async def side_by_side(url: str, events: int, workers: int, rounds: int) -> list[dict[str, Any]]:
    """Full verifications of the tenant by each design in turn, `rounds` times."""
    runs = []
    async with db.make_pool(url, 2) as pool:
        for _ in range(rounds):
            for before in (True, False):
                audit = LedgerAudit(pool, workers=workers, before_handoff=before)
                try:
                    # Every worker is started (spawned, imports done) outside the time.
                    await asyncio.gather(*(audit._in_worker(time.sleep, 1) for _ in range(workers)))
                    pids = list(getattr(audit._executor, "_processes", {}))
                    load, cpu = load_average(), sum(map(cpu_seconds, pids))
                    started = time.perf_counter()
                    report = await audit.verify(Scope(TENANT))
                    seconds = time.perf_counter() - started
                    cpu = sum(map(cpu_seconds, pids)) - cpu
                finally:
                    audit.close()
                assert report.events_checked == events, report.events_checked
                assert not (report.breaks or report.differences), report.differences[:5]
                design = "before the handoff" if before else "handoff"
                runs.append({"design": design, "s": round(seconds, 2),
                             "events_s": round(events / seconds), "load": load,
                             "worker_cpu_s": round(cpu, 1),
                             "events_cpu_s": round(events / cpu)})  # fmt: skip
    return runs


async def rebuild_time(url: str) -> tuple[float, float]:
    """Seconds to rewrite all of the tenant's projections from its log, and of those the
    seconds it held the tenant's lock (writers waited)."""
    async with db.make_pool(url, 2) as pool:
        started = time.perf_counter()
        report = await Ledger(PostgresStore(pool)).rebuild(TENANT)
        return round(time.perf_counter() - started, 2), report.lock_held_s


async def reserve_loop(stub: pb_grpc.LedgerServiceStub, stop: asyncio.Event) -> Latencies:
    """Reserve then commit on another tenant, one call at a time, until `stop`: what the
    ledger's writers see while an audit runs on the same server."""
    latencies, n = Latencies(), 0
    while not stop.is_set():
        n += 1
        started = time.perf_counter()
        answer = await stub.Reserve(
            pb.ReserveRequest(
                idempotency_key=f"live-{n}-{time.time_ns()}",
                tenant_id="bench-live",
                user_id=f"u{n % 50}",
                model="gpt-4o",
                amount=100,
            )
        )
        latencies.add(started)
        await stub.Commit(
            pb.CommitRequest(
                tenant_id="bench-live",
                reservation_id=answer.reservation.reservation_id,
                usage=pb.Usage(input_tokens=60, output_tokens=20),
            )
        )
    return latencies


async def reserve_latency(
    stub: pb_grpc.LedgerServiceStub, during: Awaitable[_T]
) -> tuple[dict[str, float], _T]:
    """Reserve latency for as long as `during` runs, and what `during` returned."""
    stop = asyncio.Event()
    loop = asyncio.create_task(reserve_loop(stub, stop))
    result = await during
    stop.set()
    latencies = await loop
    return {**latencies.summary(), "calls": len(latencies.samples_s)}, result


async def measure(target: str, events: int, repeats: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = pb_grpc.LedgerServiceStub(channel)
        started = time.perf_counter()
        report = await stub.VerifyAudit(
            pb.VerifyAuditRequest(tenant_id=TENANT), timeout=CALL_TIMEOUT_S
        )
        verify_s = time.perf_counter() - started
        idle, _ = await reserve_latency(stub, asyncio.sleep(5))
        busy, again = await reserve_latency(
            stub, stub.VerifyAudit(pb.VerifyAuditRequest(tenant_id=TENANT), timeout=CALL_TIMEOUT_S)
        )
        assert again.events_checked == events
        assert report.events_checked == events, report.events_checked
        assert report.chains_ok and report.projections_match, report.differences[:5]

        started, replayed, position, complete = time.perf_counter(), 0, 0, False
        while not complete:  # a call streams at most limits.replay_events_max events
            request = pb.ReplayHistoryRequest(tenant_id=TENANT, from_position=position)
            async for answer in stub.ReplayHistory(request, timeout=CALL_TIMEOUT_S):
                replayed += len(answer.events)
                complete, position = answer.end.complete, answer.end.last_position + 1
        replay_s = time.perf_counter() - started
        assert replayed == events

        query_ms: dict[str, float] = {}
        for name, groups in (
            ("total", []),
            ("by_day", [pb.USAGE_DIMENSION_DAY]),
            ("by_user_page", [pb.USAGE_DIMENSION_USER]),
            ("by_model_day", [pb.USAGE_DIMENSION_MODEL, pb.USAGE_DIMENSION_DAY]),
        ):
            query = pb.UsageQuery(
                tenant_id=TENANT,
                from_time=stamp(START),
                to_time=stamp(START + timedelta(days=30)),
                group_by=groups,
            )
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                await stub.QueryUsage(pb.QueryUsageRequest(query=query, page_size=1000))
                samples.append((time.perf_counter() - started) * 1000)
            query_ms[name] = round(statistics.median(samples), 2)
    return {
        "events": events,
        "verify_s": round(verify_s, 2),
        "reserve_alone": idle,
        "reserve_during_verify": busy,
        "verify_events_s": round(events / verify_s),
        "replay_s": round(replay_s, 2),
        "replay_events_s": round(events / replay_s),
        "query_usage_p50_ms": query_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--cycles-per-day", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--audit-workers", type=int, default=0, help="TOKENLEDGER_AUDIT_WORKERS (0: its default)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="side-by-side verifications of each design"
    )
    args = parser.parse_args()
    workers = args.audit_workers or min(4, os.cpu_count() or 1)  # the server's default
    with bench_database() as url, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        events = write_history(url, args.users, args.days, args.cycles_per_day)
        written_s = time.perf_counter() - started
        env = {"TOKENLEDGER_LOG_LEVEL": "warning"}
        if args.audit_workers:
            env["TOKENLEDGER_AUDIT_WORKERS"] = str(args.audit_workers)
        runs = asyncio.run(side_by_side(url, events, workers, args.rounds))
        with ledger_process(url, Path(tmp) / "server.log", **env) as t:
            result = asyncio.run(measure(t, events, args.repeats))
        result["side_by_side"] = runs
        result["rebuild_s"], result["rebuild_lock_held_s"] = asyncio.run(rebuild_time(url))
        result["rebuild_events_s"] = round(events / result["rebuild_s"])
    result["history_written_s"] = round(written_s, 1)
    result["users"], result["days"] = args.users, args.days
    print(f"\nfull verification of {events:,} events, side by side ({workers} audit workers, "
          f"{os.cpu_count()} cores; load average 1/5/15 min at each start):")  # fmt: skip
    for run in runs:
        print(f"  {run['design']:>18}: {run['s']} s = {run['events_s']:,} events/s; the "
              f"workers' CPU {run['worker_cpu_s']} s = {run['events_cpu_s']:,} events per "
              f"CPU-second (load {run['load']})")  # fmt: skip
    by = {d: statistics.median(r["events_s"] for r in runs if r["design"] == d)
          for d in ("before the handoff", "handoff")}  # fmt: skip
    print(
        f"  median: before the handoff {by['before the handoff']:,.0f} events/s, handoff "
        f"{by['handoff']:,.0f} events/s: x{by['handoff'] / by['before the handoff']:.2f}"
    )
    cpu = {d: statistics.median(r["events_cpu_s"] for r in runs if r["design"] == d)
           for d in ("before the handoff", "handoff")}  # fmt: skip
    print(
        f"  per CPU-second of the workers (less sensitive to others' load; PostgreSQL's "
        f"own work not counted): x{cpu['handoff'] / cpu['before the handoff']:.2f}"
    )
    print(
        f"\naudit: {events:,} events; verify (chains + rebuild of every projection) "
        f"{result['verify_s']} s = {result['verify_events_s']:,} events/s; "
        f"replay {result['replay_s']} s = {result['replay_events_s']:,} events/s"
    )
    print(
        f"rebuild of every projection from the log (in process): "
        f"{result['rebuild_s']} s = {result['rebuild_events_s']:,} events/s, of which the "
        f"tenant's writers waited {result['rebuild_lock_held_s']} s"
    )
    print(
        f"Reserve latency on the same server (one caller), alone: {result['reserve_alone']}; "
        f"while a VerifyAudit of the log above runs: {result['reserve_during_verify']}"
    )
    print(f"QueryUsage p50 over 30 days x {args.users:,} users: {result['query_usage_p50_ms']}")
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
