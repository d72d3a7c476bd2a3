"""Followers wake when events commit: after a transaction that appended events commits, its
connection sends NOTIFY on `CHANNEL` with the tenant (`NOTIFY_SQL`; PostgresStore's unit of
work), and one LISTEN connection per process wakes the followers waiting on that tenant.

The NOTIFY is a statement of its own after the COMMIT (in the same pipeline, so it costs no
round trip), not inside the writing transaction: PostgreSQL serializes the commits of all
transactions that NOTIFY (a cluster-wide lock held through the commit), which would make
every tenant's writes wait on each other's WAL flush.

A notification is only a wake-up: what a follower reads is still decided by the transaction-id
rule of LedgerAudit.follow. So a lost or late notification costs latency, never an event:
while the listening connection is down, followers poll as before, and they always look again
after `limits.follow_backstop_s` even when nothing woke them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

CHANNEL = "tokenledger_events"
NOTIFY_SQL = (
    "SELECT set_config('synchronous_commit', 'off', true), pg_notify('tokenledger_events', t) "
    "FROM unnest(%s::text[]) AS t"
)
"""The notifications of `tenants` (%s), sent in a transaction of their own. It commits without
waiting for its WAL flush (a NOTIFY gives the transaction an id, hence a commit record): a
wake-up need not survive a crash, and the writes it announces were flushed by their own
COMMIT before it ran; waiting would put a second flush in every write's path."""
_RECONNECT_S = 1.0

_log = logging.getLogger("tokenledger.follow")


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
