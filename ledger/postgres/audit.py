"""Reading the log: replay, balances as of a past instant, verification, usage queries and a
follower feed. Nothing here writes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from ledger import codec, limits
from ledger.checkpoints import Checkpoint
from ledger.errors import CheckpointRefused, StoreUnavailable
from ledger.model import AccountKey, BalanceResult
from ledger.postgres import checkpoints, notify, verify
from ledger.postgres.errors import translated
from ledger.postgres.rows import logged_event, scope_where
from ledger.postgres.verify import Part
from ledger.reads import (
    LoggedEvent,
    OutputStats,
    OutputStatsQuery,
    Scope,
    UsageQuery,
    UsageRow,
    VerifyReport,
)
from ledger.usage import COUNTER_NAMES, UsageCounters

Conn = psycopg.AsyncConnection[dict[str, Any]]

_EVENT_COLUMNS = ", ".join(
    ["position", *codec.EVENT_COLUMNS, *codec.CHAIN_COLUMNS, "recorded_at", "xid::text AS xid"]
)
FETCH_ROWS = 2_000
_T = TypeVar("_T")

_WORKERS = get_context("forkserver")
"""Worker processes are forked from a server process that has imported the verification
code once (spawning each afresh imported it again: about half a second a worker). The fork
server is started clean, so forking from it is safe though this process runs threads."""
_WORKERS.set_forkserver_preload(["ledger.postgres.verify"])


def _start_all(executor: ProcessPoolExecutor, workers: int) -> None:
    """Start the executor's `workers` processes: it starts one for each call submitted while
    none is idle, so `workers` calls at once start them all."""
    for started in [executor.submit(os.getpid) for _ in range(workers)]:
        started.result()


# group name (reads.GROUP_NAMES) -> the columns it selects and groups by
GROUPS: dict[str, tuple[str, ...]] = {
    "user": ("user_id",),
    "conversation": ("user_id", "conversation_id"),
    "model": ("model",),
    "day": ("date_trunc('day', hour, %s) AS period_start",),  # %s: the query's time zone
    "hour": ("hour AS period_start",),
}

# Output tokens of the most recent calls with usage (committed, or committed late after they
# expired) of one model, newest first, at most %(n)s: index-only scans of migration 0013's
# indexes. percentile_disc returns an observed value (no interpolation between two calls).
_USER_OUTPUT_STATS = """SELECT count(*) AS samples,
       percentile_disc(0.5) WITHIN GROUP (ORDER BY output_tokens) AS p50,
       percentile_disc(0.95) WITHIN GROUP (ORDER BY output_tokens) AS p95,
       max(output_tokens) AS max
  FROM (SELECT output_tokens FROM reservations
         WHERE tenant_id = %(tenant_id)s AND user_id = %(user_id)s AND model = %(model)s
           AND output_tokens IS NOT NULL AND created_at >= %(since)s
         ORDER BY created_at DESC LIMIT %(n)s) AS recent"""
_TENANT_OUTPUT_STATS = """SELECT count(*) AS samples,
       percentile_disc(0.5) WITHIN GROUP (ORDER BY output_tokens) AS p50,
       percentile_disc(0.95) WITHIN GROUP (ORDER BY output_tokens) AS p95,
       max(output_tokens) AS max
  FROM (SELECT output_tokens FROM reservations
         WHERE tenant_id = %(tenant_id)s AND model = %(model)s
           AND output_tokens IS NOT NULL AND created_at >= %(since)s
         ORDER BY created_at DESC LIMIT %(n)s) AS recent"""


class LedgerAudit:
    """Read-only access to the log and the projections for auditors, finance and followers."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Conn],
        primary: AsyncConnectionPool[Conn] | None = None,
        workers: int = 1,
        before_handoff: bool = False,
    ) -> None:
        """Reads go to `pool`, which may be a read replica's; past balances and the follower
        feed read the `primary` (default: `pool`): a replica's lag would hide recent events,
        and the feed's cursor rule (transaction ids below the oldest running one) must not meet
        a replica's cancelled queries or a failover's other history. `before_handoff` verifies
        by the design before the handoff (verify.Part.before_handoff), for the bench."""
        self._pool = pool
        self._primary = primary or pool
        self._workers = workers
        self._before_handoff = before_handoff
        self._executor: ProcessPoolExecutor | None = None
        self._log_watcher: notify.LogWatcher | None = None
        self._closed = False

    @asynccontextmanager
    async def _snapshot(self, primary: bool = False) -> AsyncIterator[Conn]:
        """A read-only transaction on one snapshot: every query in it sees the same log and
        the same projections, whatever commits meanwhile."""
        pool = self._primary if primary else self._pool
        with translated():
            async with pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield conn

    @staticmethod
    async def _stream(
        conn: Conn, sql: str, params: tuple[Any, ...]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Rows of a query through a server-side cursor, so a long log streams in chunks."""
        async with conn.cursor(name="ledger_read") as cur:
            await cur.execute(sql, params)
            while rows := await cur.fetchmany(FETCH_ROWS):
                for row in rows:
                    yield row

    async def _rows(
        self, sql: str, params: tuple[Any, ...], primary: bool = False
    ) -> AsyncGenerator[dict[str, Any], None]:
        async with self._snapshot(primary) as conn:
            async for row in self._stream(conn, sql, params):
                yield row

    def events(
        self,
        scope: Scope,
        from_position: int = 0,
        from_time: datetime | None = None,
        limit: int | None = None,
    ) -> AsyncGenerator[LoggedEvent, None]:
        """The events of `scope` in log order (at most `limit`)."""
        return _logged(self._rows(*_events_sql(scope, from_position, from_time, limit)))

    async def balance_at(self, key: AccountKey, as_of: datetime) -> BalanceResult:
        """The balance of `key` and its ancestors as it stood at `as_of`, from the log (the
        primary's: on a replica, an instant within its lag would silently miss events).
        Folded in a worker process, like a verification. Refused for a tenant with an
        archive: the fold would miss the archived events once their months are dropped."""
        async with self._snapshot(primary=True) as conn:
            archived = await checkpoints.archived(conn, key.tenant_id)
        if archived is not None:
            raise CheckpointRefused(
                f"tenant {key.tenant_id!r} is archived up to position {archived.position:,} "
                f"(archive {archived.seq}): a past balance is not folded from the live log alone"
            )
        return await self._in_worker(verify.balance_at, self._primary.conninfo, key, as_of)

    async def verify(self, scope: Scope, from_checkpoint: bool = False) -> VerifyReport:
        """Recompute every chain in scope and rebuild its projections from the log, then
        compare with the live rows (ledger/verify.py), in parts on the worker processes, all
        reading one snapshot. A user scope covers its own accounts, reservations and usage
        (the tenant's account needs the whole tenant). A tenant's verification also checks
        every checkpoint on its way: its chain, its rows, and its state against the log's at
        its position. `from_checkpoint` starts from the tenant's last checkpoint instead and
        reads only the events after it (see README, Audit)."""
        async with self._snapshot() as conn:
            found = [] if scope.user_id else await checkpoints.read_all(conn, scope.tenant_id)
            archived = await checkpoints.archived(conn, scope.tenant_id)
            if from_checkpoint:
                return await self._verify_since(conn, scope, found, archived)
            since = archived.position if archived else 0
            passing = [c for c in found if c.position >= since]
            parts = self._full_parts(scope, found, passing, archived)
            report = await self._run_checked(conn, parts, found, archived)
        for c in passing:
            report.differences[:0] = checkpoints.state_differences(c, report.sums.get(c.seq))
        report.checkpoints_checked = len(found)
        if archived is not None:
            report.from_position = archived.position
        return report

    def _full_parts(
        self,
        scope: Scope,
        found: list[Checkpoint],
        passing: list[Checkpoint],
        archived: checkpoints.Archived | None,
    ) -> list[Part]:
        """The parts of a full verification; after an archive, they start from its end."""
        passes = tuple((c.seq, c.position) for c in passing)
        own_rows = tuple(c.seq for c in found)
        if archived is None:
            return self._plan(scope, own_rows, passes=passes)
        base = (archived.seq, archived.checkpoint_seq)
        return self._plan(scope, own_rows, passes=passes, since=archived.position, base=base)

    async def _verify_since(
        self,
        conn: Conn,
        scope: Scope,
        found: list[Checkpoint],
        archived: checkpoints.Archived | None,
    ) -> VerifyReport:
        if scope.user_id:
            raise CheckpointRefused("a verification from a checkpoint covers a whole tenant")
        if not found:
            raise CheckpointRefused(
                f"tenant {scope.tenant_id!r} has no checkpoint yet: take one with "
                "`tokenledger audit checkpoint`, or verify the whole log"
            )
        last = found[-1]
        since = {"since_seq": last.seq, "since": last.position, "seeded": last.seeded()}
        parts = self._plan(scope, (last.seq,), **since)
        report = await self._run_checked(conn, parts, found, archived)
        report.from_checkpoint, report.from_position = last.seq, last.position
        report.checkpoints_checked = len(found)
        return report

    def _plan(self, scope: Scope, own_rows: tuple[int, ...], **options: Any) -> list[Part]:
        options["before_handoff"] = self._before_handoff
        return verify.plan(scope, self._workers, own_rows, **options)

    async def _run_checked(
        self,
        conn: Conn,
        parts: list[Part],
        found: list[Checkpoint],
        archived: checkpoints.Archived | None,
        primary: bool = False,
    ) -> VerifyReport:
        """_run_parts, with the checkpoints `found` checked (checkpoints.problems). The events
        up to each checkpoint whose rows a part digests are counted on `conn` while the parts
        run: an index scan that grows with the log, so it should not wait for them."""
        run = asyncio.ensure_future(self._run_parts(conn, parts, primary))  # exports first
        counting = asyncio.ensure_future(
            checkpoints.event_counts(conn, found, parts[-1].own_rows, archived)
        )
        try:
            report = await run
        except BaseException:
            run.cancel()
            counting.cancel()
            raise
        events = await counting
        report.differences[:0] = checkpoints.problems(found, report.own_rows, events)
        return report

    async def _run_parts(
        self, conn: Conn, parts: list[Part], primary: bool = False
    ) -> VerifyReport:
        """The parts on the worker processes, each on a snapshot exported by `conn` (of the
        primary's pool or of the reading one: a snapshot is imported on its own server). In
        a handoff, the user parts run first and the tenant part folds their effects."""
        cur = await conn.execute("SELECT pg_export_snapshot() AS snapshot")
        snapshot = (await cur.fetchone() or {})["snapshot"]
        conninfo = (self._primary if primary else self._pool).conninfo
        tenant = [p for p in parts if p.handoff and p.tenant_level and not p.users]
        if not tenant:
            reports = await self._gather(verify.check, conninfo, snapshot, parts)
            return verify.merge(reports)
        users = [p for p in parts if p not in tenant]
        handed = await self._gather(verify.check_users, conninfo, snapshot, users)
        effects = [e for _, e in handed]
        last = await self._in_worker(
            verify.check, conninfo, snapshot, tenant[0], verify.CHUNK_ROWS, effects
        )
        return verify.merge([*(r for r, _ in handed), last])

    async def _gather(
        self, fn: Callable[..., _T], conninfo: Any, snapshot: str, parts: list[Part]
    ) -> list[_T]:
        """fn(conninfo, snapshot, part) for each part, on the worker processes."""
        checks = [asyncio.ensure_future(self._in_worker(fn, conninfo, snapshot, p)) for p in parts]
        try:
            return list(await asyncio.gather(*checks))
        except BaseException:  # one failed, or the call was cancelled: drop queued parts
            for check in checks:
                check.cancel()
            raise

    async def checkpoint(self, tenant_id: str) -> tuple[VerifyReport, Checkpoint | None]:
        """Verify the tenant from its last checkpoint (or its whole log, the first time) and,
        only if everything verifies, record a new checkpoint at its last event. Returns the
        report and the checkpoint (None: not taken, nothing written). Writes to the primary."""
        with translated():
            async with self._primary.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                # One taker per tenant; a second one waits, then finds the seq taken (Conflict).
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('tokenledger checkpoint ' || %s))",
                    (tenant_id,),
                )
                found = await checkpoints.read_all(conn, tenant_id)
                last = found[-1] if found else None
                position, events = await self._checkpoint_target(conn, tenant_id, last)
                options = {
                    "since_seq": last.seq if last else 0, "since": last.position if last else 0,
                    "seeded": last.seeded() if last else (),
                    "until": position, "collect": True,
                }  # fmt: skip
                own_rows = (last.seq,) if last else ()
                parts = self._plan(Scope(tenant_id), own_rows, **options)
                archived = await checkpoints.archived(conn, tenant_id)
                report = await self._run_checked(conn, parts, found, archived, primary=True)
                if last is not None:
                    report.from_checkpoint, report.from_position = last.seq, last.position
                if report.breaks or report.differences:
                    return report, None
                made, rows = checkpoints.next_checkpoint(
                    last, tenant_id, position, events, report.changes, datetime.now(UTC)
                )
                await checkpoints.write(conn, made, rows)
        report.changes = []
        return report, made

    async def due_for_checkpoint(self, every_events: int, every_s: float) -> list[str]:
        """The tenants with at least `every_events` events since their last checkpoint, or
        with any event and no checkpoint for `every_s` seconds (0: that rule is off)."""
        with translated():
            async with self._primary.connection() as conn:
                cur = await conn.execute(checkpoints.DUE_SQL, {"n": every_events, "s": every_s})
                return [row["tenant_id"] for row in await cur.fetchall()]

    @staticmethod
    async def _checkpoint_target(
        conn: Conn, tenant_id: str, last: Checkpoint | None
    ) -> tuple[int, int]:
        """The position of the tenant's last event and the count of events up to it."""
        after = last.position if last else 0
        cur = await conn.execute(
            "SELECT max(position) AS p, count(*) AS n FROM events "
            "WHERE tenant_id = %s AND position > %s",
            (tenant_id, after),
        )
        row = await cur.fetchone() or {"p": None, "n": 0}
        if row["p"] is None:
            if last is None:
                raise CheckpointRefused(f"tenant {tenant_id!r} has no events to checkpoint")
            raise CheckpointRefused(
                f"no event of tenant {tenant_id!r} since checkpoint {last.seq} "
                f"(position {last.position}): nothing to checkpoint"
            )
        return int(row["p"]), (last.events if last else 0) + int(row["n"])

    async def start_workers(self) -> list[int]:
        """Start the worker processes now, not at the first verification, which would wait
        for them (a second and a half on the bench: mostly the fork server importing the
        verification code); returns their process ids. Starting one waits for the fork
        server, so it is done on a thread, off this event loop."""
        executor = self._executor_now()
        await asyncio.to_thread(_start_all, executor, self._workers)
        return sorted(p.pid for p in getattr(executor, "_processes", {}).values())

    def _executor_now(self) -> ProcessPoolExecutor:
        if self._closed:
            raise StoreUnavailable("the server is stopping; retry on another")
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self._workers, mp_context=_WORKERS, initializer=verify.worker_started,
                initargs=(os.getpid(),),
            )  # fmt: skip
        return self._executor

    async def _in_worker(self, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args) in a worker process: CPU-bound folds would stall this event loop."""
        executor = self._executor_now()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except BrokenProcessPool:
            self._executor = None  # a worker died (killed, out of memory): start afresh
            raise StoreUnavailable("an audit worker process died; retry") from None

    def close(self) -> None:
        """Stop the worker processes now, abandoning parts in progress: shutting the pool
        down alone would let the interpreter's exit wait for them (a long verification would
        hold up a server's stop for minutes). Python 3.14 has terminate_workers() for this."""
        self._closed = True
        if self._log_watcher is not None:
            self._log_watcher.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            workers = list(getattr(executor, "_processes", {}).values())
            executor.shutdown(wait=False, cancel_futures=True)
            for process in workers:
                process.terminate()

    # --- usage ------------------------------------------------------------------------------

    def _usage_sql(self, q: UsageQuery) -> tuple[str, tuple[Any, ...]]:
        columns = [c for g in q.group_by for c in GROUPS[g]]
        columns = list(dict.fromkeys(columns))  # "user" and "conversation" share user_id
        keys = [c.split(" AS ")[-1] for c in columns]
        sums = ", ".join(f"sum({c})::bigint AS {c}" for c in COUNTER_NAMES)
        where = [
            "tenant_id = %s",
            "hour >= date_trunc('hour', %s::timestamptz, 'UTC')",
            "hour < %s",
        ]
        params: list[Any] = [q.time_zone] if "day" in q.group_by else []
        params += [q.tenant_id, q.from_time, q.to_time]
        for name in ("user_id", "conversation_id", "model"):
            if getattr(q, name):
                where.append(f"{name} = %s")
                params.append(getattr(q, name))
        sql = (
            f"SELECT {', '.join([*columns, sums])} FROM usage_hourly "  # noqa: S608
            f"WHERE {' AND '.join(where)}"
        )
        if keys:
            sql += f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
        else:
            sql += " HAVING count(*) > 0"
        return sql, tuple(params)

    async def query_usage(self, q: UsageQuery, offset: int, limit: int) -> list[UsageRow]:
        sql, params = self._usage_sql(q)
        with translated():
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql + " LIMIT %s OFFSET %s", (*params, limit, offset))
                return [_usage_row(row) for row in await cur.fetchall()]

    async def export_usage(self, q: UsageQuery) -> AsyncGenerator[UsageRow, None]:
        async for row in self._rows(*self._usage_sql(q)):
            yield _usage_row(row)

    async def output_stats(self, q: OutputStatsQuery, now: datetime) -> OutputStats:
        """p50, p95 and max of the output tokens of the user's recent calls of the model, or
        of the tenant's when the user has fewer than `q.min_samples` (see OutputStats)."""
        params = {
            "tenant_id": q.tenant_id, "user_id": q.user_id, "model": q.model,
            "since": now - timedelta(hours=q.window_hours), "n": limits.output_stats_samples_max,
        }  # fmt: skip
        async with self._snapshot() as conn:
            user = await _fetch_one(conn, _USER_OUTPUT_STATS, params) if q.user_id else None
            if user is not None and user["samples"] >= q.min_samples:
                return _output_stats("user", user, user)
            tenant = await _fetch_one(conn, _TENANT_OUTPUT_STATS, params)
        scope = "tenant" if tenant["samples"] >= q.min_samples else "none"
        return _output_stats(scope, tenant, user)

    # --- followers --------------------------------------------------------------------------

    async def follow(
        self,
        tenant_id: str,
        after: tuple[int, int],
        from_position: int,
        stop: asyncio.Event,
        poll_s: float = limits.follow_poll_s,
    ) -> AsyncGenerator[LoggedEvent, None]:
        """Committed events after the cursor (transaction id, position), in that order, then
        new ones as they commit, until `stop`. Only transactions below the snapshot's xmin are
        read: they are all finished, and any that commits later has a larger id, so ordering
        by it never skips a late commit (ordering by position would).

        It looks again when the tenant's events commit (ledger/postgres/notify.py), and every
        `poll_s` while notifications are down or after one whose events the rule still held
        back (an older transaction was open), for up to `limits.follow_backstop_s`."""
        xid, position = after
        tenant_sql = "AND tenant_id = %s " if tenant_id else ""
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events "  # noqa: S608 (constant parts only)
            "WHERE (xid, position) > (%s::text::xid8, %s) "
            "AND xid < pg_snapshot_xmin(pg_current_snapshot()) AND position >= %s "
            f"{tenant_sql}ORDER BY events.xid, position LIMIT %s"  # the column, not the text
        )
        waiter = self._watcher().waiter(tenant_id)
        held_back_s = 0.0  # how long the last notification's events have not shown
        try:
            while not stop.is_set():
                waiter.event.clear()  # before reading: a commit during the read wakes us
                params: tuple[Any, ...] = (str(xid), position, from_position)
                params += (tenant_id,) if tenant_id else ()
                with translated():
                    async with self._primary.connection() as conn:
                        cur = await conn.execute(sql, (*params, FETCH_ROWS))
                        rows = await cur.fetchall()
                for row in rows:
                    xid, position = int(row["xid"]), row["position"]
                    yield logged_event(row)
                if len(rows) == FETCH_ROWS:
                    continue
                if rows:
                    held_back_s = 0.0
                polling = not self._watcher().listening or held_back_s > 0
                timeout = poll_s if polling else limits.follow_backstop_s
                woken = await notify.wait(waiter, stop, timeout)
                if woken and not rows:
                    held_back_s = held_back_s or poll_s
                elif held_back_s:
                    held_back_s += timeout
                    if held_back_s > limits.follow_backstop_s:
                        held_back_s = 0.0
        finally:
            self._watcher().forget(waiter)

    def _watcher(self) -> notify.LogWatcher:
        if self._log_watcher is None:
            conninfo = self._primary.conninfo
            assert isinstance(conninfo, str), "pools here are made from a URL"
            self._log_watcher = notify.LogWatcher(conninfo)
        return self._log_watcher


def _events_sql(
    scope: Scope, from_position: int, from_time: datetime | None, limit: int | None
) -> tuple[str, tuple[Any, ...]]:
    where, params = scope_where(scope)
    sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} AND position >= %s"  # noqa: S608
    params += (from_position,)
    if from_time is not None:
        sql, params = sql + " AND occurred_at >= %s", (*params, from_time)
    sql += " ORDER BY position"
    if limit is not None:
        sql, params = sql + " LIMIT %s", (*params, limit)
    return sql, params


def _usage_row(row: dict[str, Any]) -> UsageRow:
    return UsageRow(
        user_id=row.get("user_id", ""),
        conversation_id=row.get("conversation_id", ""),
        model=row.get("model", ""),
        period_start=row.get("period_start"),
        counters=UsageCounters(**{c: row[c] for c in COUNTER_NAMES}),
    )


async def _fetch_one(conn: Conn, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    cur = await conn.execute(sql, params)
    row = await cur.fetchone()
    assert row is not None, "an aggregate returns one row"
    return row


def _output_stats(scope: str, figures: dict[str, Any], user: dict[str, Any] | None) -> OutputStats:
    return OutputStats(
        scope=scope,
        samples=figures["samples"],
        p50=figures["p50"] or 0,
        p95=figures["p95"] or 0,
        max=figures["max"] or 0,
        user_samples=user["samples"] if user is not None else 0,
    )


async def _logged(rows: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[LoggedEvent, None]:
    async for row in rows:
        yield logged_event(row)
