"""Followers wake when events commit: after a transaction that appended events commits, its
process sends NOTIFY on `CHANNEL` with the tenant (`Notifier`), and one LISTEN connection per
process wakes the followers waiting on that tenant.

The NOTIFY is sent after the commit, from its own short statement, not inside the writing
transaction: PostgreSQL serializes the commits of all transactions that NOTIFY (a cluster-wide
lock held through the commit), which would make every tenant's writes wait on each other's
WAL flush. Notifications that pile up meanwhile are sent together, one per tenant.

A notification is only a wake-up: what a follower reads is still decided by the transaction-id
rule of LedgerAudit.follow. So a lost or late notification costs latency, never an event:
while the listening connection is down, followers poll as before, and they always look again
after `limits.follow_backstop_s` even when nothing woke them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

CHANNEL = "tokenledger_events"
NOTIFY_SQL = "SELECT pg_notify('tokenledger_events', t) FROM unnest(%s::text[]) AS t"
_RECONNECT_S = 1.0

_log = logging.getLogger("tokenledger.follow")


class Notifier:
    """Sends the notifications of committed writes, off their path: `notify` only marks the
    tenant; one task sends what is marked, coalescing a burst into one statement."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def notify(self, tenant_id: str) -> None:
        self._pending.add(tenant_id)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send(), name="log-notifier")

    async def _send(self) -> None:
        while self._pending:
            tenants, self._pending = sorted(self._pending), set()
            try:
                async with self._pool.connection() as conn:
                    await _autocommit(conn, NOTIFY_SQL, (tenants,))
            except (psycopg.Error, PoolTimeout) as exc:  # followers still poll: no event is lost
                _log.warning("could not notify followers: %s", exc)


async def _autocommit(conn: psycopg.AsyncConnection[Any], sql: str, params: Any) -> None:
    """One statement in its own implicit transaction: one round trip, where a pooled
    connection's transaction would add a BEGIN and a COMMIT. The connection goes back to the
    pool as it came (autocommit off), or closed."""
    await conn.set_autocommit(True)
    try:
        await conn.execute(sql, params)
    finally:
        try:
            await conn.set_autocommit(False)
        except psycopg.Error:
            await conn.close()


class Waiter:
    """One follower's wake-up: set when its tenant (any, for "") appends events."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.event = asyncio.Event()


class LogWatcher:
    """The process's LISTEN connection and the followers waiting on it."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._waiters: set[Waiter] = set()
        self._task: asyncio.Task[None] | None = None
        self.listening = False

    def waiter(self, tenant_id: str) -> Waiter:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="log-watcher")
        w = Waiter(tenant_id)
        self._waiters.add(w)
        return w

    def forget(self, w: Waiter) -> None:
        self._waiters.discard(w)

    async def _listen(self) -> None:
        """Listen until cancelled, reconnecting after a lost connection; while it is lost,
        followers poll (see `listening`)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    self._wake_all()  # whatever committed while it was down
                    async for note in conn.notifies():
                        self._wake(note.payload)
            except psycopg.Error as exc:
                _log.warning("event notifications lost, followers poll: %s", exc)
            finally:
                self.listening = False
            await asyncio.sleep(_RECONNECT_S)

    def _wake(self, tenant_id: str) -> None:
        for w in self._waiters:
            if not w.tenant_id or w.tenant_id == tenant_id:
                w.event.set()

    def _wake_all(self) -> None:
        for w in self._waiters:
            w.event.set()

    def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()


async def wait(w: Waiter, stop: asyncio.Event, timeout_s: float) -> bool:
    """Wait for a wake-up, `stop` or the timeout; True when woken by a notification."""
    stopping = asyncio.ensure_future(stop.wait())
    woken = asyncio.ensure_future(w.event.wait())
    try:
        done, _ = await asyncio.wait({stopping, woken}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    finally:
        for f in (stopping, woken):
            f.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await f
    return woken in done
