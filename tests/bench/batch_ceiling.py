"""What PostgreSQL alone takes of the batch bench's write set (batch_bench prints it beside the
real figure): the ledger runs the bench's workload in this process (4 callers, batches of
`per_call` Reserve items then a CommitBatch of the holds, one tenant) against a scratch database
while every statement the store sends is captured, with its parameters as sent; then the
captured transactions are sent again, pre-built (jsonb parameters already serialized), to a
second fresh database, with no domain work between them. Each transaction goes as one
pipeline (BEGIN ... COMMIT, one round trip), so the replay costs PostgreSQL what the real run
costs it, less the waits on the server between a transaction's reads and its writes.

One tenant's writes are serialized by its row lock, so one connection carries them. With
`tenants` > 1 the same transactions are replayed on that many connections at once, each with
the tenant id swapped for one of its own (the rows' hashes then no longer verify, which costs
PostgreSQL nothing): the ceiling when the load is spread over tenants, all cores busy."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ledger import errors
from ledger.application import Ledger
from ledger.model import AccountKey, Commit, Reserve, Usage
from ledger.postgres.store import PostgresStore
from services.platform import db
from tests.bench.harness import cpu_seconds


@dataclass
class Statement:
    query: Any
    params: Any
    raw: bool
    many: bool


@dataclass
class Capture:
    """The transactions the store sent (each from BEGIN to the statements after COMMIT)."""

    transactions: list[list[Statement]] = field(default_factory=list)
    _open: dict[int, list[Statement]] = field(default_factory=dict)

    def add(self, conn: Any, stmt: Statement) -> None:
        text = stmt.query if isinstance(stmt.query, str) else ""
        if text == "BEGIN":
            self._open[id(conn)] = []
        current = self._open.get(id(conn))
        if current is None:  # a pool check, outside any transaction
            return
        current.append(stmt)
        if text == "COMMIT":
            self.transactions.append(current)
        elif text == "ROLLBACK":
            del self._open[id(conn)]


def _capturing(capture: Capture) -> Callable[[], None]:
    """Record every statement sent through an async cursor; returns the undo."""
    execute, executemany = psycopg.AsyncCursor.execute, psycopg.AsyncCursor.executemany

    async def recorded(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        raw = isinstance(self, psycopg.AsyncRawCursor)
        capture.add(self.connection, Statement(query, params, raw, many=False))
        return await execute(self, query, params, **kw)

    async def recorded_many(self: Any, query: Any, params_seq: Any, **kw: Any) -> Any:
        params_seq = list(params_seq)
        raw = isinstance(self, psycopg.AsyncRawCursor)
        capture.add(self.connection, Statement(query, params_seq, raw, many=True))
        return await executemany(self, query, params_seq, **kw)

    psycopg.AsyncCursor.execute = recorded  # type: ignore[method-assign]
    psycopg.AsyncCursor.executemany = recorded_many  # type: ignore[method-assign]

    def undo() -> None:
        psycopg.AsyncCursor.execute = execute  # type: ignore[method-assign]
        psycopg.AsyncCursor.executemany = executemany  # type: ignore[method-assign]

    return undo


async def capture_batches(
    url: str, users: int, per_call: int, clients: int, reservations: int
) -> tuple[Capture, int, str]:
    """The bench's workload run in process until `reservations` holds are placed and
    committed; the captured transactions, how many were committed, and the tenant."""
    tenant = f"ceil-{uuid.uuid4().hex[:8]}"
    capture = Capture()
    pool = db.make_pool(url, 8)
    await pool.open()
    ledger = Ledger(PostgresStore(pool))
    done = [0]
    undo = _capturing(capture)
    try:

        async def client(n: int) -> None:
            i = 0
            while done[0] < reservations:
                items = [
                    Reserve(uuid.uuid4().hex, AccountKey(tenant, f"u{(n * 7919 + i + k) % users}"),
                            "m", 10, 300)
                    for k in range(per_call)
                ]  # fmt: skip
                i += per_call
                held = await ledger.reserve_batch(items)
                commits = [
                    Commit(tenant, r.reservation.reservation_id, Usage(input_tokens=7))
                    for r in held
                    if not isinstance(r, errors.LedgerError)
                ]
                ended = await ledger.commit_batch(commits)
                done[0] += sum(not isinstance(r, errors.LedgerError) for r in ended)

        await asyncio.gather(*(client(n) for n in range(clients)))
    finally:
        undo()
        await pool.close()
    return capture, done[0], tenant


def _prebuilt(value: Any, swap: Callable[[str], str]) -> Any:
    """A parameter ready to send again: jsonb serialized now (not at each send), the tenant
    id swapped throughout."""
    if isinstance(value, Jsonb):
        text = swap(bytes(value.dumps(value.obj)).decode())  # type: ignore[arg-type]
        data = text.encode()
        return Jsonb(data, dumps=lambda _: data)
    if isinstance(value, str):
        return swap(value)
    if isinstance(value, list | tuple):
        return type(value)(_prebuilt(v, swap) for v in value)
    if isinstance(value, dict):
        return {k: _prebuilt(v, swap) for k, v in value.items()}
    return value


def _for_tenant(txs: list[list[Statement]], old: str, new: str) -> list[list[Statement]]:
    def swap(s: str) -> str:
        return s.replace(old, new) if old in s else s

    return [
        [
            Statement(
                s.query,
                [_prebuilt(p, swap) for p in s.params] if s.many else _prebuilt(s.params, swap),
                s.raw,
                s.many,
            )
            for s in tx
        ]
        for tx in txs
    ]


async def _replay_one(url: str, txs: list[list[Statement]], ready: asyncio.Event) -> float:
    """Send the transactions in order, each as one pipeline; returns the CPU seconds its
    backend spent on them."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        pid = conn.info.backend_pid
        await ready.wait()
        before = cpu_seconds(pid)
        for tx in txs:
            async with conn.pipeline():
                for s in tx:
                    cur = psycopg.AsyncRawCursor(conn) if s.raw else conn.cursor()
                    if s.many:
                        await cur.executemany(s.query, s.params)
                    else:
                        await cur.execute(s.query, s.params)
        return cpu_seconds(pid) - before


async def replay(url: str, capture: Capture, tenant: str, tenants: int) -> tuple[float, float]:
    """The captured transactions sent again on `tenants` connections at once (a tenant of its
    own each); the elapsed seconds and the CPU seconds of their PostgreSQL backends."""
    run = uuid.uuid4().hex[:6]
    runs = [
        _for_tenant(capture.transactions, tenant, f"{tenant}-{run}-{n}") for n in range(tenants)
    ]
    ready = asyncio.Event()
    tasks = [asyncio.create_task(_replay_one(url, txs, ready)) for txs in runs]
    await asyncio.sleep(0.2)  # connected
    started = time.monotonic()
    ready.set()
    spent = await asyncio.gather(*tasks)
    return time.monotonic() - started, sum(spent)


def ceiling(
    capture_url: str, replay_url: str, users: int, per_call: int, clients: int,
    reservations: int, tenant_counts: list[int],
) -> list[dict[str, Any]]:  # fmt: skip
    """Capture on `capture_url`, then replay on `replay_url` (both fresh and migrated) once
    for each count of tenants at once."""
    capture, done, tenant = asyncio.run(
        capture_batches(capture_url, users, per_call, clients, reservations)
    )
    statements = sum(len(tx) for tx in capture.transactions)
    asyncio.run(replay(replay_url, capture, tenant, 1))  # warm-up: caches, plans, files
    out = []
    for tenants in tenant_counts:
        elapsed, spent = asyncio.run(replay(replay_url, capture, tenant, tenants))
        total = done * tenants
        out.append({
            "users": users,
            "tenants": tenants,
            "transactions": len(capture.transactions),
            "statements_per_transaction": round(statements / max(1, len(capture.transactions)), 1),
            "reservations": total,
            "reservations_s": round(total / elapsed, 1),
            "database_cpu_us_per_reservation": round(spent * 1e6 / max(1, total)),
            "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        })  # fmt: skip
    return out
