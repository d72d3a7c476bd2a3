"""`make bench` (idempotency keys): under steady keyed writes, the idempotency table stays
bounded by the retention window, because expired keys are pruned in bounded batches.

Writers place and roll back holds, each Reserve with a new key, for `--seconds`; the ledger
keeps keys `--retention-s` and a pruner runs every `--prune-every-s`, as the server's sweeper
does. Every few seconds it prints how many keys were written so far and how many rows the table
holds: once the first window has passed, the rows stay near rate x (retention + prune
interval) however long it runs, instead of growing with what was written.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from ledger import validation
from ledger.application import Ledger
from ledger.postgres.store import PostgresStore
from services.platform import db
from tests.bench.harness import bench_database


async def _writer(ledger: Ledger, tenant: str, stop: asyncio.Event, written: list[int]) -> None:
    while not stop.is_set():
        held = await ledger.reserve(
            validation.reserve(
                idempotency_key=uuid.uuid4().hex, tenant_id=tenant, user_id=uuid.uuid4().hex[:6],
                conversation_id="", model="m", amount=1, ttl_seconds=60, labels={},
            )
        )  # fmt: skip
        await ledger.rollback(
            validation.rollback(
                tenant_id=tenant, reservation_id=held.reservation.reservation_id, reason=""
            )
        )
        written[0] += 1


async def _pruner(ledger: Ledger, every_s: float, stop: asyncio.Event, pruned: list[int]) -> None:
    while not stop.is_set():
        pruned[0] += await ledger.prune_keys()
        await asyncio.sleep(every_s)


async def run(url: str, args: argparse.Namespace) -> None:
    async with db.make_pool(url, 8) as pool:
        store = PostgresStore(pool)
        ledger = Ledger(store, key_retention_s=args.retention_s)
        stop, written, pruned = asyncio.Event(), [0], [0]
        tasks = [
            asyncio.create_task(_writer(ledger, f"keys-{i % 4}", stop, written))
            for i in range(args.writers)
        ]
        tasks.append(asyncio.create_task(_pruner(ledger, args.prune_every_s, stop, pruned)))
        started = time.monotonic()
        peak_after_window = 0
        print("  seconds   keys written   rows in table   pruned")
        while time.monotonic() - started < args.seconds:
            await asyncio.sleep(args.report_every_s)
            elapsed = time.monotonic() - started
            rows = await store.outcome_count()
            if elapsed > args.retention_s + args.prune_every_s:
                peak_after_window = max(peak_after_window, rows)
            print(f"  {elapsed:7.1f}   {written[0]:12,}   {rows:13,}   {pruned[0]:6,}")
        stop.set()
        await asyncio.gather(*tasks)
        rate = written[0] / (time.monotonic() - started)
        bound = rate * (args.retention_s + args.prune_every_s)
        print(
            f"keys: {written[0]:,} written at {rate:,.0f}/s with a {args.retention_s} s "
            f"retention; the table peaked at {peak_after_window:,} rows once the first window "
            f"had passed (rate x (retention + prune interval) = {bound:,.0f}); "
            f"{pruned[0]:,} pruned"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--retention-s", type=int, default=10)
    parser.add_argument("--prune-every-s", type=float, default=1.0)
    parser.add_argument("--report-every-s", type=float, default=5.0)
    parser.add_argument("--writers", type=int, default=16)
    args = parser.parse_args()
    with bench_database() as url:
        asyncio.run(run(url, args))


if __name__ == "__main__":
    main()
