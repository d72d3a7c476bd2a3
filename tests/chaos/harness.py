"""Fault runs: a private PostgreSQL the run may stop, the ledger as a process it may kill, a
load of concurrent clients that retry with the same idempotency key, and the checks that
nothing acknowledged was lost or applied twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.platform import db
from services.platform.serve import LIVENESS
from tests.support import LedgerProcess, health_status, verify_tenant, wait_health

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CALL_TIMEOUT_S = 3.0
BACKOFF_S = (0.05, 1.0)
READY_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
SHUTDOWN_SIGNALS = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_START_EMBEDDED = (
    "import sys, warnings; warnings.simplefilter('ignore'); import pgserver; "
    "pgserver.get_server(sys.argv[1], cleanup_mode=None)"
)


class PrivatePostgres:
    """An embedded PostgreSQL of the run's own (pgserver), which it may stop and restart."""

    def __init__(self, root: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        self._server = pgserver.get_server(root / "pg", cleanup_mode="delete")
        self._server.psql("CREATE DATABASE chaos;")
        self.url: str = self._server.get_uri("chaos")
        db.migrate(self.url)

    def stop(self, mode: str) -> None:
        """Shut the server down as `pg_ctl stop -m fast|immediate` does, by signalling the
        postmaster (immediate: crash recovery at the next start). Not through pg_ctl itself:
        a setuid child forked from this multi-threaded (gRPC) process may crash."""
        pid = int((self._server.pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, SHUTDOWN_SIGNALS[mode])
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise TimeoutError(f"postgres {pid} did not stop")

    def close(self) -> None:
        """Stop it for good if it runs (restarts happen outside pgserver's own clean-up)."""
        if (self._server.pgdata / "postmaster.pid").exists():
            self.stop("fast")

    def start(self) -> None:
        """Start it again, from a fresh process (see stop)."""
        subprocess.run(
            [sys.executable, "-c", _START_EMBEDDED, str(self._server.pgdata)],
            check=True,
            timeout=READY_TIMEOUT_S,
        )


@dataclass
class Tally:
    """What the clients were told, and what they saw on the way."""

    reserved: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # key -> rid, user, amt
    committed: dict[str, int] = field(default_factory=dict)  # rid -> usage total
    rolled_back: set[str] = field(default_factory=set)
    acknowledged: int = 0
    retries: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


class Load:
    """`clients` concurrent callers doing Reserve → Commit (or Rollback) cycles on one tenant
    until told to finish; each call is retried with the same request (and so the same
    idempotency key) on UNAVAILABLE or DEADLINE_EXCEEDED until it is acknowledged."""

    def __init__(self, target: str, clients: int, tenant: str) -> None:
        self.target = target
        self.clients = clients
        self.tenant = tenant
        self.tally = Tally()
        self.finishing = asyncio.Event()

    async def run(self) -> None:
        channel = grpc.aio.insecure_channel(self.target)
        stub = pb_grpc.LedgerServiceStub(channel)
        try:
            await asyncio.gather(*(self._client(stub, n) for n in range(self.clients)))
        finally:
            await channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        delay = BACKOFF_S[0]
        while True:
            try:
                reply = await method(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                self.tally.codes[exc.code().name] += 1
                if exc.code() not in RETRYABLE:
                    self.tally.violations.append(
                        f"{type(request).__name__} answered {exc.code().name}: {exc.details()}"
                    )
                    return None
                self.tally.retries += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, BACKOFF_S[1])
                continue
            self.tally.acknowledged += 1
            return reply

    async def _client(self, stub: pb_grpc.LedgerServiceStub, n: int) -> None:
        rng = random.Random(n)
        while not self.finishing.is_set():
            user, key, amount = f"u{n % 8}", uuid.uuid4().hex, rng.randint(10, 500)
            reserved = await self._call(
                stub.Reserve,
                pb.ReserveRequest(
                    idempotency_key=key,
                    tenant_id=self.tenant,
                    user_id=user,
                    model="gpt-4o",
                    amount=amount,
                    ttl_seconds=600,
                ),
            )
            if reserved is None:
                continue
            rid = reserved.reservation.reservation_id
            self.tally.reserved[key] = (rid, user, amount)
            if rng.random() < 0.25:
                if await self._call(
                    stub.Rollback, pb.RollbackRequest(tenant_id=self.tenant, reservation_id=rid)
                ):
                    self.tally.rolled_back.add(rid)
                continue
            usage = pb.Usage(input_tokens=rng.randint(0, amount), output_tokens=rng.randint(0, 50))
            if await self._call(
                stub.Commit,
                pb.CommitRequest(tenant_id=self.tenant, reservation_id=rid, usage=usage),
            ):
                self.tally.committed[rid] = usage.input_tokens + usage.output_tokens


def verify(url: str, tenant: str, tally: Tally) -> list[str]:
    """Every acknowledged call is in the log exactly once, nothing else is, no hold is left
    held, and the projections equal a rebuild from the log."""
    problems = list(tally.violations)
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT event_type, idempotency_key, reservation_id, input_tokens + output_tokens "
            "+ cached_input_tokens FROM events WHERE tenant_id = %s",
            (tenant,),
        ).fetchall()
        held = conn.execute(
            "SELECT count(*) FROM reservations WHERE tenant_id = %s AND state = 'held'", (tenant,)
        ).fetchone()
        used = conn.execute(
            "SELECT held, used_total FROM accounts WHERE tenant_id = %s AND user_id = ''",
            (tenant,),
        ).fetchone()
    reserves = Counter(r[1] for r in rows if r[0] == "TokensReserved")
    rid_of = {r[1]: r[2] for r in rows if r[0] == "TokensReserved"}
    commits = Counter(r[2] for r in rows if r[0] == "ReservationCommitted")
    usage_of = {r[2]: r[3] for r in rows if r[0] == "ReservationCommitted"}
    rollbacks = Counter(r[2] for r in rows if r[0] == "ReservationRolledBack")

    for key, (rid, _, _) in tally.reserved.items():
        if reserves[key] != 1 or rid_of.get(key) != rid:
            problems.append(f"reserve {key} is in the log {reserves[key]} times")
    if len(reserves) != len(tally.reserved):
        problems.append(f"{len(reserves)} reservations logged, {len(tally.reserved)} acknowledged")
    for rid, total in tally.committed.items():
        if commits[rid] != 1 or usage_of.get(rid) != total:
            problems.append(f"commit of {rid} is in the log {commits[rid]} times")
    for rid in tally.rolled_back:
        if rollbacks[rid] != 1:
            problems.append(f"rollback of {rid} is in the log {rollbacks[rid]} times")
    if sum(commits.values()) != len(tally.committed):
        problems.append("a commit nobody was told of is in the log")
    if held != (0,):
        problems.append(f"{held} reservations are still held")
    if used != (0, sum(tally.committed.values())):
        problems.append(
            f"tenant held/used {used}, acknowledged usage {sum(tally.committed.values())}"
        )
    report = verify_tenant(url, tenant)
    problems += [f"chain broken: {b}" for b in report.breaks]
    problems += [f"projection differs from a rebuild from the log: {d}" for d in report.differences]
    return problems


@dataclass
class Faults:
    server_kills: int = 0
    db_restarts: Counter[str] = field(default_factory=Counter)
    not_serving_seen: int = 0


async def run_with_faults(
    root: Path,
    *,
    clients: int,
    kills: int,
    db_restarts: list[str],
    spacing_s: float,
) -> tuple[Tally, Faults, list[str]]:
    """Drive load while killing the server `kills` times and restarting the database once per
    mode in `db_restarts`, `spacing_s` apart; then let every client finish and verify."""
    pg = PrivatePostgres(root)
    ledger = LedgerProcess(
        pg.url,
        root / "ledger.log",
        TOKENLEDGER_SWEEP_INTERVAL_S="0.2",
        TOKENLEDGER_LOG_LEVEL="warning",
    )
    ledger.start()
    tenant = f"chaos-{uuid.uuid4().hex[:8]}"
    load = Load(ledger.target, clients, tenant)
    faults = Faults()
    try:
        driving = asyncio.create_task(load.run())
        for _ in range(kills):
            await asyncio.sleep(spacing_s)
            await asyncio.to_thread(ledger.kill)
            faults.server_kills += 1
            await asyncio.to_thread(ledger.start)
        for mode in db_restarts:
            await asyncio.sleep(spacing_s)
            await asyncio.to_thread(pg.stop, mode)
            # While the database is gone the server says so on its health check.
            await asyncio.to_thread(
                wait_health, ledger.target, health_pb2.HealthCheckResponse.NOT_SERVING, 30
            )
            faults.not_serving_seen += 1
            # ... but it is alive: liveness probes must not restart it for the database.
            alive = await asyncio.to_thread(health_status, ledger.target, LIVENESS)
            assert alive == health_pb2.HealthCheckResponse.SERVING, alive
            await asyncio.sleep(1.0)
            await asyncio.to_thread(pg.start)
            faults.db_restarts[mode] += 1
            await asyncio.to_thread(
                wait_health, ledger.target, health_pb2.HealthCheckResponse.SERVING, 60
            )
        await asyncio.sleep(spacing_s)
        load.finishing.set()
        await asyncio.wait_for(driving, FINISH_TIMEOUT_S)
        problems = await asyncio.to_thread(verify, pg.url, tenant, load.tally)
    finally:
        ledger.stop()
        pg.close()
    return load.tally, faults, problems


def summary(tally: Tally, faults: Faults, problems: list[str]) -> str:
    restarts = ", ".join(f"{n} {mode}" for mode, n in sorted(faults.db_restarts.items()))
    return (
        f"chaos: operations acknowledged {tally.acknowledged}, retries {tally.retries}, "
        f"server kills {faults.server_kills}, database restarts {sum(faults.db_restarts.values())}"
        f"{f' ({restarts})' if restarts else ''}, NOT_SERVING seen {faults.not_serving_seen}, "
        f"status codes {dict(tally.codes)}, violations {len(problems)}"
    )
