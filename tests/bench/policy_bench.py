"""`make bench` (budget policy part): Reserve→Commit throughput with rate limits and a 3-level
hierarchy of quotas on, against the same traffic with no policy, in one run on one server.

64 clients spread over 1,000 users of one tenant, each call on one of 3 conversations of its
user. "On": a tenant quota (day, Europe/Berlin), a quota per user (rolling 24 h), a quota per
conversation (no period), a tenant-wide and a per-user token and request rate limit for the
model — all far above the traffic, so nothing is refused and only the checks cost. Runs
alternate off/on to spread the machine's noise over both. It also counts database
transactions per write (pg_stat_database): the tenant row is locked once per transaction, so
fewer than one transaction per write is what keeps a tenant-wide budget from serializing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.bench.harness import bench_database, ledger_process
from tests.bench.ledger_bench import ledger_cycles

USERS = 1_000
CONVERSATIONS = 3
LIMIT = 10**14
STATS_FLUSH_S = 1.5
"""Backends report their transaction counts to pg_stat_database about once a second."""
Policy = Callable[[pb_grpc.LedgerServiceStub, str, int], Awaitable[None]]


async def no_policy(stub: pb_grpc.LedgerServiceStub, tenant: str, users: int) -> None:
    return None


async def setup_tenant(target: str, policy: Policy) -> str:
    tenant = f"policy-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(target) as channel:
        await policy(pb_grpc.LedgerServiceStub(channel), tenant, USERS)
    return tenant


async def full_policy(stub: pb_grpc.LedgerServiceStub, tenant: str, users: int) -> None:
    def key() -> str:
        return uuid.uuid4().hex

    await stub.SetQuota(pb.SetQuotaRequest(
        idempotency_key=key(), tenant_id=tenant, limit=LIMIT, period=pb.PERIOD_DAY,
        time_zone="Europe/Berlin", soft_limit_percent=80,
    ))  # fmt: skip
    await stub.SetRateLimit(pb.SetRateLimitRequest(
        idempotency_key=key(), tenant_id=tenant, model="gpt-4o",
        tokens_per_minute=10**12, requests_per_minute=10**8,
    ))  # fmt: skip
    for u in range(users):
        user = f"u{u}"
        await stub.SetQuota(pb.SetQuotaRequest(
            idempotency_key=key(), tenant_id=tenant, user_id=user, limit=LIMIT,
            period=pb.PERIOD_ROLLING, window_hours=24,
        ))  # fmt: skip
        await stub.SetRateLimit(pb.SetRateLimitRequest(
            idempotency_key=key(), tenant_id=tenant, user_id=user,
            tokens_per_minute=10**10, requests_per_minute=10**6,
        ))  # fmt: skip
        for c in range(CONVERSATIONS):
            await stub.SetQuota(pb.SetQuotaRequest(
                idempotency_key=key(), tenant_id=tenant, user_id=user,
                conversation_id=f"c{c}", limit=LIMIT, period=pb.PERIOD_NONE,
            ))  # fmt: skip


def transactions(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with bench_database() as url, tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with ledger_process(url, log, TOKENLEDGER_LOG_LEVEL="warning") as target:
            for _ in range(args.rounds):
                for mode, policy in (("off", no_policy), ("on", full_policy)):
                    tenant = asyncio.run(setup_tenant(target, policy))
                    time.sleep(STATS_FLUSH_S)
                    before = transactions(url)
                    result = asyncio.run(
                        ledger_cycles(
                            target, args.clients, USERS, args.seconds, CONVERSATIONS, tenant
                        )
                    )
                    time.sleep(STATS_FLUSH_S)
                    result["transactions"] = transactions(url) - before
                    runs[mode].append(result)
                    print(f"  {mode:3}: {result['cycles_s']} cycles/s, Reserve p50/p99 "
                          f"{result['reserve']['p50_ms']}/{result['reserve']['p99_ms']} ms",
                          flush=True)  # fmt: skip
    off = statistics.median(r["cycles_s"] for r in runs["off"])
    on = statistics.median(r["cycles_s"] for r in runs["on"])
    writes = sum(2 * r["cycles"] for r in runs["on"])
    report = {
        "clients": args.clients,
        "users": USERS,
        "cycles_s_off": off,
        "cycles_s_on": on,
        "on_over_off": round(on / off, 3),
        "writes_per_transaction_on": round(writes / sum(r["transactions"] for r in runs["on"]), 2),
    }
    print(
        f"\npolicy: {args.clients} clients over {USERS} users x {CONVERSATIONS} conversations: "
        f"{on} cycles/s with rate limits + 3-level quotas vs {off} without "
        f"= {report['on_over_off']:.0%}; {report['writes_per_transaction_on']} writes per "
        "database transaction with policy on"
    )
    print(json.dumps(report, separators=(",", ":")))


if __name__ == "__main__":
    main()
