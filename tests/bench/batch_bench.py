"""`make bench` (batches): holds placed and committed in batches of `--per-call` items through
ReserveBatch and CommitBatch, against `tokenledger serve` in its own process, over 1,000 users
of one tenant and then all on one user. Prints reservations per second (each reserved and
committed), the p50/p99 of one batch call, and the CPU time per reservation of the server
process, of this (the client's) process and of the PostgreSQL backends serving the bench's
database, with the load average: CPU per item depends far less on what else the machine runs.
Beside each run, the ceiling: the same workload's SQL, captured from the store and replayed
pre-built straight to PostgreSQL (tests/bench/batch_ceiling.py), on one connection (one
tenant: its writes are serialized by its row lock) and on `--ceiling-tenants` at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.bench.batch_ceiling import ceiling
from tests.bench.harness import Latencies, bench_database, cpu_seconds, ledger_server
from tests.support import LedgerProcess


async def run_batches(
    target: str, users: int, per_call: int, clients: int, seconds: float
) -> dict[str, Any]:
    tenant = f"batch-{uuid.uuid4().hex[:8]}"
    reserve_lat, commit_lat = Latencies(), Latencies()
    done = [0]
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            i = 0
            while time.monotonic() < deadline:
                items = [
                    pb.ReserveRequest(
                        idempotency_key=uuid.uuid4().hex, user_id=f"u{(n * 7919 + i + k) % users}",
                        model="m", amount=10,
                    )
                    for k in range(per_call)
                ]  # fmt: skip
                i += per_call
                started = time.perf_counter()
                held = await stub.ReserveBatch(
                    pb.ReserveBatchRequest(tenant_id=tenant, items=items)
                )
                reserve_lat.add(started)
                rids = [r.reserved.reservation.reservation_id for r in held.results
                        if r.WhichOneof("outcome") == "reserved"]  # fmt: skip
                started = time.perf_counter()
                commits = [pb.CommitRequest(reservation_id=rid, usage=pb.Usage(input_tokens=7))
                           for rid in rids]  # fmt: skip
                ended = await stub.CommitBatch(
                    pb.CommitBatchRequest(tenant_id=tenant, items=commits)
                )
                commit_lat.add(started)
                done[0] += sum(r.WhichOneof("outcome") == "committed" for r in ended.results)

    started = time.monotonic()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.monotonic() - started
    return {
        "users": users,
        "per_call": per_call,
        "clients": clients,
        "reservations": done[0],
        "reservations_s": round(done[0] / elapsed, 1),
        "reserve_batch": reserve_lat.summary(),
        "commit_batch": commit_lat.summary(),
    }


def _backend_cpu(url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to the bench's database (the
    server's pool), by process id."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    spent = {}
    for (pid,) in rows:
        with contextlib.suppress(OSError):  # ended meanwhile
            spent[pid] = cpu_seconds(pid)
    return spent


def measured(
    url: str, server: LedgerProcess, users: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One run, with the CPU each party spent on it, per reservation (reserved and committed).
    Backends that the pool opens during the run count from their start."""
    assert server.proc is not None
    pid = server.proc.pid
    backends = _backend_cpu(url)
    spent, client = cpu_seconds(pid), time.process_time()
    run = asyncio.run(run_batches(server.target, users, args.per_call, args.clients, args.seconds))
    spent, client = cpu_seconds(pid) - spent, time.process_time() - client
    database = sum(s - backends.get(b, 0.0) for b, s in _backend_cpu(url).items())
    per_item = 1e6 / max(1, run["reservations"])
    run["cpu_us_per_reservation"] = {
        "server": round(spent * per_item),
        "client": round(client * per_item),
        "database": round(database * per_item),
    }
    run["load"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--per-call", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--users", type=int, nargs="+", default=[1_000, 1], help="one run for each count"
    )
    parser.add_argument(
        "--ceiling-reservations", type=int, default=10_000,
        help="reservations captured for the replay to PostgreSQL alone (0: no ceiling)",
    )  # fmt: skip
    parser.add_argument(
        "--ceiling-tenants", type=int, nargs="+", default=[1, 2],
        help="one replay for each count of tenants (connections) at once",
    )  # fmt: skip
    args = parser.parse_args()
    with (
        bench_database() as url,
        tempfile.TemporaryDirectory() as tmp,
        ledger_server(url, Path(tmp) / "ledger.log") as server,
    ):
        runs = [measured(url, server, users, args) for users in args.users]
    ceilings = [
        c
        for users in (args.users if args.ceiling_reservations else ())
        for c in _ceiling(users, args)
    ]
    for r in runs:
        cpu = r["cpu_us_per_reservation"]
        print(
            f"batches of {r['per_call']} over {r['users']:,} user(s), {r['clients']} clients: "
            f"{r['reservations_s']:,} reservations/s (each reserved and committed); "
            f"ReserveBatch p50/p99 {r['reserve_batch']['p50_ms']}/{r['reserve_batch']['p99_ms']} "
            f"ms, CommitBatch p50/p99 {r['commit_batch']['p50_ms']}/"
            f"{r['commit_batch']['p99_ms']} ms; CPU per reservation: server {cpu['server']} µs, "
            f"client {cpu['client']} µs, PostgreSQL {cpu['database']} µs; load {r['load']}"
        )
    for c in ceilings:
        print(
            f"ceiling (PostgreSQL alone, the captured SQL replayed), {c['users']:,} user(s), "
            f"{c['tenants']} tenant(s) on as many connections: {c['reservations_s']:,} "
            f"reservations/s; PostgreSQL CPU per reservation "
            f"{c['database_cpu_us_per_reservation']} µs; {c['transactions']} transactions of "
            f"{c['statements_per_transaction']} "
            f"statements; load {c['load']}"
        )
    print(json.dumps({"batches": runs, "ceilings": ceilings}, separators=(",", ":")))


def _ceiling(users: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    with bench_database() as capture_url, bench_database() as replay_url:
        return ceiling(
            capture_url, replay_url, users, args.per_call, args.clients,
            args.ceiling_reservations, args.ceiling_tenants,
        )  # fmt: skip


if __name__ == "__main__":
    main()
