"""`make bench`: the ledger's throughput and latency, beside the ceilings it runs under.

In one run, on one machine (client and server sharing it):
- Reserve→Commit cycles/s and per-RPC p50/p99/p999 latency, for 1, 16 and 64 clients, with
  all clients on one user (hot) and spread over 1,000 users of a tenant;
- the transport's ceiling: a bare grpc.aio echo server in its own process (echo_server.py),
  and, for continuity with earlier figures, a health Check through the ledger's own stack;
- the server process's CPU time per RPC (all its threads), from /proc;
- the same spread figures with TOKENLEDGER_AUTH=api_key, against auth off;
- the database ceiling: the same SQL statements as a cycle, driven by pgbench;
- Reserve latency on an empty log and after a backfill of 1M events.
The server is a separate `tokenledger serve` process. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.bench.echo_server import echo_stub
from tests.bench.harness import Latencies, bench_database, cpu_seconds, ledger_server
from tests.support import TOKENLEDGER, LedgerProcess, free_port

SPREAD_USERS = 1_000
CHANNELS_MAX = 4
PGBENCH_SCRIPT = Path(__file__).with_name("cycle.pgbench.sql")


async def _setup_quotas(
    stub: pb_grpc.LedgerServiceStub, tenant: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    for user in ("", "u0"):
        await stub.SetQuota(
            pb.SetQuotaRequest(
                idempotency_key=uuid.uuid4().hex,
                tenant_id=tenant,
                user_id=user,
                limit=10**14,
                period=pb.PERIOD_MONTH,
            ),
            metadata=metadata,
        )


async def ledger_cycles(
    target: str,
    clients: int,
    users: int,
    seconds: float,
    conversations: int = 0,
    tenant: str = "",
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    """Reserve→Commit cycles from `clients` concurrent callers over `users` users (and, when
    `conversations`, that many conversations of each) of `tenant` (new, with high quotas,
    when not given)."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(clients, CHANNELS_MAX))]
    stubs = [pb_grpc.LedgerServiceStub(ch) for ch in channels]
    if not tenant:
        tenant = f"bench-{uuid.uuid4().hex[:8]}"
        await _setup_quotas(stubs[0], tenant, metadata)
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
                ),
                metadata=metadata,
            )
            lat["Reserve"].add(started)
            started = time.perf_counter()
            await stub.Commit(
                pb.CommitRequest(
                    tenant_id=tenant,
                    reservation_id=r.reservation.reservation_id,
                    usage=pb.Usage(input_tokens=40, output_tokens=20),
                ),
                metadata=metadata,
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


async def echo_rpcs(
    target: str, clients: int, seconds: float, bare: bool = False
) -> dict[str, Any]:
    """The transport's ceiling. `bare`: the bare grpc.aio echo server (echo_server.py) echoing
    a Reserve's bytes; else a health Check through the ledger server's own stack, the
    denominator of earlier figures, kept for continuity."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(clients, CHANNELS_MAX))]
    if bare:
        stubs = [_BareEcho(echo_stub(ch)) for ch in channels]
    else:
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


_PAYLOAD = pb.ReserveRequest(
    idempotency_key=uuid.uuid4().hex, tenant_id="bench-0000", user_id="u123", model="gpt-4o",
    amount=100,
).SerializeToString()  # fmt: skip


class _BareEcho:
    """The bare echo behind the health stub's `Check` name, so both echoes run one loop."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def Check(self, _request: Any) -> bytes:  # the stub's method name
        return await self._call(_PAYLOAD)  # type: ignore[no-any-return]


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
    report: dict[str, Any] = {"seconds": args.seconds, "runs": [], "api_key": []}

    with bench_database() as url, tempfile.TemporaryDirectory() as tmp, bare_echo() as bare:
        log = Path(tmp) / "server.log"
        with ledger_server(url, log, TOKENLEDGER_LOG_LEVEL="info") as server:
            report["events_before"] = event_count(url)
            for clients in client_counts:
                row = measure(url, server, bare, clients, args.seconds)
                report["runs"].append(row)
                print_row(row)
            empty = asyncio.run(ledger_cycles(server.target, 1, SPREAD_USERS, args.seconds))
            report["events_after_runs"] = event_count(url)
            if args.backfill_events:
                started = time.perf_counter()
                backfill(url, args.backfill_events)
                report["backfill_s"] = round(time.perf_counter() - started, 1)
            full = asyncio.run(ledger_cycles(server.target, 1, SPREAD_USERS, args.seconds))
            report["events_after_backfill"] = event_count(url)
        report["api_key"] = measure_api_key(url, Path(tmp), report["runs"], args.seconds)
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


def measure(
    url: str, server: LedgerProcess, bare: str, clients: int, seconds: float
) -> dict[str, Any]:
    """One row: both echoes, the ledger hot and spread (with the server's CPU per RPC), and
    pgbench running the same SQL."""
    target = server.target
    assert server.proc is not None
    row: dict[str, Any] = {"clients": clients}
    row["bare_echo"] = asyncio.run(echo_rpcs(bare, clients, seconds, bare=True))
    row["echo"] = asyncio.run(echo_rpcs(target, clients, seconds))
    row["hot"] = asyncio.run(ledger_cycles(target, clients, 1, seconds))
    row["spread"] = with_cpu(server.proc.pid, ledger_cycles(target, clients, SPREAD_USERS, seconds))
    row["database"] = database_cycles(url, clients, SPREAD_USERS, seconds)
    row["ledger_over_bare_echo"] = round(row["spread"]["rpcs_s"] / row["bare_echo"]["rpcs_s"], 3)
    row["ledger_over_echo"] = round(row["spread"]["rpcs_s"] / row["echo"]["rpcs_s"], 3)
    row["ledger_over_database"] = round(row["spread"]["cycles_s"] / row["database"]["cycles_s"], 3)
    row["hot_over_spread"] = round(row["hot"]["cycles_s"] / row["spread"]["cycles_s"], 3)
    # pgbench's latency is per script: the cycle's two transactions, Reserve's and Commit's.
    row["database_ms_per_transaction"] = round(row["database"]["latency_avg_ms"] / 2, 3)
    return row


def with_cpu(pid: int, cycles: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run the cycles and add the server process's CPU time per RPC meanwhile (all threads)."""
    before = cpu_seconds(pid)
    result = asyncio.run(cycles)
    spent = cpu_seconds(pid) - before
    result["server_cpu_ms_per_rpc"] = round(spent * 1000 / max(1, 2 * result["cycles"]), 3)
    return result


def api_key(url: str) -> str:
    """A new API key for every tenant, with the roles the bench's calls need."""
    return subprocess.run(
        [str(TOKENLEDGER), "keys", "create", "--tenant", "*", "--role", "writer",
         "--role", "admin", "--name", "bench"],
        env=os.environ | {"DATABASE_URL": url}, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def measure_api_key(
    url: str, tmp: Path, runs: list[dict[str, Any]], seconds: float
) -> list[dict[str, Any]]:
    """The spread figures again on a server with TOKENLEDGER_AUTH=api_key, every call carrying
    a key, beside the same figures with auth off."""
    metadata = (("authorization", f"Bearer {api_key(url)}"),)
    rows = []
    with ledger_server(url, tmp / "auth.log", TOKENLEDGER_AUTH="api_key") as server:
        assert server.proc is not None
        for off in runs:
            clients = off["clients"]
            spread = with_cpu(
                server.proc.pid,
                ledger_cycles(server.target, clients, SPREAD_USERS, seconds, metadata=metadata),
            )
            row = {
                "clients": clients,
                "spread": spread,
                "over_auth_off": round(spread["rpcs_s"] / off["spread"]["rpcs_s"], 3),
                "added_cpu_ms_per_rpc": round(
                    spread["server_cpu_ms_per_rpc"] - off["spread"]["server_cpu_ms_per_rpc"], 3
                ),
            }
            rows.append(row)
            print(
                f"   api_key clients {clients:>3}: spread {spread['cycles_s']} cycles/s "
                f"({row['over_auth_off']} of auth off), server CPU "
                f"{spread['server_cpu_ms_per_rpc']} ms/RPC (+{row['added_cpu_ms_per_rpc']})",
                flush=True,
            )
    return rows


@contextmanager
def bare_echo() -> Iterator[str]:
    """tests/bench/echo_server.py in its own process; yields its target."""
    target = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.echo_server", target.rpartition(":")[2]]
    )
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield target
    finally:
        proc.terminate()
        proc.wait(10)


def print_row(row: dict[str, Any]) -> None:
    spread = row["spread"]
    print(
        f"\nclients {row['clients']:>3}: bare echo {row['bare_echo']['rpcs_s']:>8} rpc/s | "
        f"stack echo {row['echo']['rpcs_s']:>8} rpc/s | "
        f"spread {spread['cycles_s']:>7} cycles/s ({spread['rpcs_s']} rpc/s) | "
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
        f"   ledger/bare echo {row['ledger_over_bare_echo']}  ledger/stack echo "
        f"{row['ledger_over_echo']}  ledger/database {row['ledger_over_database']}  "
        f"hot/spread {row['hot_over_spread']}  server CPU "
        f"{spread['server_cpu_ms_per_rpc']} ms/RPC  pgbench "
        f"{row['database_ms_per_transaction']} ms/transaction",
        flush=True,
    )


if __name__ == "__main__":
    main()
