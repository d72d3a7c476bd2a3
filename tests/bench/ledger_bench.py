"""`make bench`: the ledger's throughput and latency, beside the ceilings it runs under.

In one run, on one machine (client and server sharing it):
- Reserve→Commit cycles/s and per-RPC p50/p99/p999 latency, for 1, 16 and 64 clients, with
  all clients on one user (hot) and spread over 1,000 users of a tenant;
- the transport ceiling: a trivial RPC (health Check) served by the same server stack;
- the database ceiling: the same SQL statements as a cycle, driven by pgbench;
- Reserve latency on an empty log and after a backfill of 1M events.
The server is a separate `tokenledger serve` process. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.bench.harness import Latencies, bench_database, ledger_process

SPREAD_USERS = 1_000
CHANNELS_MAX = 4
PGBENCH_SCRIPT = Path(__file__).with_name("cycle.pgbench.sql")


async def _setup_quotas(stub: pb_grpc.LedgerServiceStub, tenant: str) -> None:
    for user in ("", "u0"):
        await stub.SetQuota(
            pb.SetQuotaRequest(
                idempotency_key=uuid.uuid4().hex,
                tenant_id=tenant,
                user_id=user,
                limit=10**14,
                period=pb.PERIOD_MONTH,
            )
        )


async def ledger_cycles(
    target: str,
    clients: int,
    users: int,
    seconds: float,
    conversations: int = 0,
    tenant: str = "",
) -> dict[str, Any]:
    """Reserve→Commit cycles from `clients` concurrent callers over `users` users (and, when
    `conversations`, that many conversations of each) of `tenant` (new, with high quotas,
    when not given)."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(clients, CHANNELS_MAX))]
    stubs = [pb_grpc.LedgerServiceStub(ch) for ch in channels]
    if not tenant:
        tenant = f"bench-{uuid.uuid4().hex[:8]}"
        await _setup_quotas(stubs[0], tenant)
    lat = {"Reserve": Latencies(), "Commit": Latencies()}
    cycles = 0
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal cycles
        stub, rng = stubs[n % len(stubs)], random.Random(n)
        while time.perf_counter() < deadline:
            user = f"u{rng.randrange(users)}"
            conversation = f"c{rng.randrange(conversations)}" if conversations else ""
            started = time.perf_counter()
            r = await stub.Reserve(
                pb.ReserveRequest(
                    idempotency_key=uuid.uuid4().hex,
                    tenant_id=tenant,
                    user_id=user,
                    conversation_id=conversation,
                    model="gpt-4o",
                    amount=100,
                )
            )
            lat["Reserve"].add(started)
            started = time.perf_counter()
            await stub.Commit(
                pb.CommitRequest(
                    tenant_id=tenant,
                    reservation_id=r.reservation.reservation_id,
                    usage=pb.Usage(input_tokens=40, output_tokens=20),
                )
            )
            lat["Commit"].add(started)
            cycles += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    for ch in channels:
        await ch.close()
    return {
        "cycles": cycles,
        "cycles_s": round(cycles / elapsed, 1),
        "rpcs_s": round(2 * cycles / elapsed, 1),
        "reserve": lat["Reserve"].summary(),
        "commit": lat["Commit"].summary(),
    }


async def echo_rpcs(target: str, clients: int, seconds: float) -> dict[str, Any]:
    """The transport ceiling: health Check through the same server and interceptors."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(clients, CHANNELS_MAX))]
    stubs = [health_pb2_grpc.HealthStub(ch) for ch in channels]
    calls, lat = 0, Latencies()
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal calls
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await stubs[n % len(stubs)].Check(health_pb2.HealthCheckRequest())
            lat.add(started)
            calls += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    for ch in channels:
        await ch.close()
    return {"rpcs_s": round(calls / elapsed, 1), **lat.summary()}


def pgbench_bin() -> str:
    import pgserver._commands as commands  # the embedded PostgreSQL ships pgbench

    return str(Path(commands.POSTGRES_BIN_PATH) / "pgbench")


def database_cycles(url: str, clients: int, users: int, seconds: float) -> dict[str, Any]:
    """The database ceiling: the SQL of a Reserve→Commit cycle, driven by pgbench (in C)."""
    tenant = f"pgb-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO accounts (tenant_id, user_id, conversation_id) "
            "SELECT %s, '', '' UNION ALL "
            "SELECT %s, 'u' || n, '' FROM generate_series(0, %s) n",
            (tenant, tenant, users - 1),
        )
    out = subprocess.run(
        [
            pgbench_bin(),
            "-n",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(int(seconds)),
            "-D",
            f"tenant={tenant}",
            "-D",
            f"users={users}",
            "-f",
            str(PGBENCH_SCRIPT),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tps = re.search(r"tps = ([0-9.]+)", out)
    lat = re.search(r"latency average = ([0-9.]+) ms", out)
    assert tps and lat, out
    return {"cycles_s": round(float(tps.group(1)), 1), "latency_avg_ms": float(lat.group(1))}


def backfill(url: str, events: int) -> None:
    """Append `events` events of past activity (other tenants' streams) straight into the log,
    with the reservations and idempotency keys such history leaves behind."""
    streams, per_stream = events // 100, 100
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO events (tenant_id, user_id, conversation_id, version, event_type,
                   occurred_at, model, reservation_id, amount, input_tokens, output_tokens,
                   cached_input_tokens, idempotency_key, actor, trace_id, data, prev_hash, hash)
               SELECT 'hist-' || (s %% 100), 'u' || s, '', v, 'TokensReserved',
                   now() - interval '30 days', 'gpt-4o', 'rsv_h' || s || '_' || v, 100, 0, 0, 0,
                   'k' || s || '_' || v, '', '', '{}'::jsonb, sha256(''::bytea),
                   sha256(''::bytea)
               FROM generate_series(1, %s) s, generate_series(1, %s) v""",
            (streams, per_stream),
        )
        conn.execute(
            """INSERT INTO reservations (tenant_id, reservation_id, user_id, conversation_id,
                   model, amount, state, created_at, expires_at, labels)
               SELECT 'hist-' || (s %% 100), 'rsv_h' || s || '_' || v, 'u' || s, '', 'gpt-4o',
                   100, 'committed', now() - interval '30 days', now() - interval '29 days',
                   '{}'::jsonb
               FROM generate_series(1, %s) s, generate_series(1, %s, 4) v""",
            (streams, per_stream),
        )
        conn.execute(
            """INSERT INTO idempotency_keys (tenant_id, idempotency_key, operation, request,
                   response)
               SELECT 'hist-' || (s %% 100), 'k' || s || '_' || v, 'Reserve', '{}', '{}'
               FROM generate_series(1, %s) s, generate_series(1, %s, 4) v""",
            (streams, per_stream),
        )
        conn.execute("ANALYZE")


def event_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    assert row is not None
    return int(row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--backfill-events", type=int, default=1_000_000)
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    report: dict[str, Any] = {"seconds": args.seconds, "runs": []}

    with bench_database() as url, tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with ledger_process(url, log, TOKENLEDGER_LOG_LEVEL="info") as target:
            report["events_before"] = event_count(url)
            for clients in client_counts:
                row: dict[str, Any] = {"clients": clients}
                row["echo"] = asyncio.run(echo_rpcs(target, clients, args.seconds))
                row["hot"] = asyncio.run(ledger_cycles(target, clients, 1, args.seconds))
                row["spread"] = asyncio.run(
                    ledger_cycles(target, clients, SPREAD_USERS, args.seconds)
                )
                row["database"] = database_cycles(url, clients, SPREAD_USERS, args.seconds)
                row["ledger_over_echo"] = round(row["spread"]["rpcs_s"] / row["echo"]["rpcs_s"], 3)
                row["ledger_over_database"] = round(
                    row["spread"]["cycles_s"] / row["database"]["cycles_s"], 3
                )
                row["hot_over_spread"] = round(
                    row["hot"]["cycles_s"] / row["spread"]["cycles_s"], 3
                )
                report["runs"].append(row)
                print_row(row, flush=True)
            empty = asyncio.run(ledger_cycles(target, 1, SPREAD_USERS, args.seconds))
            report["events_after_runs"] = event_count(url)
            if args.backfill_events:
                started = time.perf_counter()
                backfill(url, args.backfill_events)
                report["backfill_s"] = round(time.perf_counter() - started, 1)
            full = asyncio.run(ledger_cycles(target, 1, SPREAD_USERS, args.seconds))
            report["events_after_backfill"] = event_count(url)
            report["reserve_p50_ms_small_log"] = empty["reserve"]["p50_ms"]
            report["reserve_p50_ms_large_log"] = full["reserve"]["p50_ms"]
            report["large_over_small_log_p50"] = round(
                full["reserve"]["p50_ms"] / empty["reserve"]["p50_ms"], 3
            )
    print(
        f"\nReserve p50 (1 client): {report['reserve_p50_ms_small_log']} ms with "
        f"{report['events_after_runs']:,} events, {report['reserve_p50_ms_large_log']} ms with "
        f"{report['events_after_backfill']:,} events "
        f"(x{report['large_over_small_log_p50']})"
    )
    print(json.dumps(report, separators=(",", ":")))


def print_row(row: dict[str, Any], flush: bool = False) -> None:
    if row["clients"] == 1 or flush:
        print(
            f"\nclients {row['clients']:>3}: echo {row['echo']['rpcs_s']:>8} rpc/s | "
            f"spread {row['spread']['cycles_s']:>7} cycles/s ({row['spread']['rpcs_s']} rpc/s) | "
            f"hot {row['hot']['cycles_s']:>7} cycles/s | "
            f"database {row['database']['cycles_s']:>7} cycles/s"
        )
    for mode in ("spread", "hot"):
        r, c = row[mode]["reserve"], row[mode]["commit"]
        print(
            f"   {mode:6} Reserve p50/p99/p999 {r['p50_ms']}/{r['p99_ms']}/{r['p999_ms']} ms"
            f"  Commit {c['p50_ms']}/{c['p99_ms']}/{c['p999_ms']} ms"
        )
    print(
        f"   ledger/echo {row['ledger_over_echo']}  ledger/database "
        f"{row['ledger_over_database']}  hot/spread {row['hot_over_spread']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
