"""`make bench` (batches): holds placed and committed in batches of `--per-call` items through
ReserveBatch and CommitBatch, against `tokenledger serve` in its own process, over 1,000 users
of one tenant and then all on one user. Prints reservations per second (each reserved and
committed) and the p50/p99 of one batch call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.bench.harness import Latencies, bench_database, ledger_process


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
        "reservations_s": round(done[0] / elapsed, 1),
        "reserve_batch": reserve_lat.summary(),
        "commit_batch": commit_lat.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--per-call", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with (
        bench_database() as url,
        tempfile.TemporaryDirectory() as tmp,
        ledger_process(url, Path(tmp) / "ledger.log") as target,
    ):
        runs = [
            asyncio.run(run_batches(target, users, args.per_call, args.clients, args.seconds))
            for users in (1_000, 1)
        ]
    for r in runs:
        print(
            f"batches of {r['per_call']} over {r['users']:,} user(s), {r['clients']} clients: "
            f"{r['reservations_s']:,} reservations/s (each reserved and committed); "
            f"ReserveBatch p50/p99 {r['reserve_batch']['p50_ms']}/{r['reserve_batch']['p99_ms']} "
            f"ms, CommitBatch p50/p99 {r['commit_batch']['p50_ms']}/"
            f"{r['commit_batch']['p99_ms']} ms"
        )
    print(json.dumps({"batches": runs}, separators=(",", ":")))


if __name__ == "__main__":
    main()
