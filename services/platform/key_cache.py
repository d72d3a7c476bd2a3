"""The process's copy of the `api_keys` rows its callers used, kept only while it hears every
change to the table.

Migration 0009 puts a trigger on `api_keys` that sends NOTIFY on `CHANNEL` for every insert,
update and delete, in the changing transaction: PostgreSQL delivers it when that transaction
commits. One LISTEN connection per process receives it and empties the cache. So a key revoked
(by `tokenledger keys revoke`, or any SQL) is refused in every process as soon as the
notification arrives, which `tests/e2e/test_key_revocation.py` measures against
`revocation_bound_s`.

The cache answers only while the LISTEN connection is known to be up: before it is
established, after it fails and until it is back, every lookup reads the table, as with no
cache at all. A silent connection is found out by a probe every `probe_interval_s` that must
answer within `probe_timeout_s`. A lookup that was reading the table while a notification
arrived does not store what it read (the generation moved on), so a row read just before a
revocation committed is never kept after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import psycopg
import structlog

CHANNEL = "tokenledger_keys"
revocation_bound_s = 0.1
"""A revocation's notification reaches a listening process well within this on one network
(a few milliseconds here); the e2e test holds every revocation to it."""
probe_interval_s = 5.0
probe_timeout_s = 2.0
reconnect_s = 1.0

log = structlog.get_logger("tokenledger.auth")

Row = dict[str, Any]


class KeyCache:
    """Rows by lookup (`("key", key_id)`, `("cn", cn)`), trusted only while listening."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._rows: dict[Hashable, Row] = {}
        self._generation = 0
        self._task: asyncio.Task[None] | None = None
        self.listening = False

    def __len__(self) -> int:
        return len(self._rows)

    async def lookup(self, slot: Hashable, read: Callable[[], Awaitable[Row | None]]) -> Row | None:
        """The cached row of `slot`, else `read()`'s, kept when nothing changed meanwhile.
        Missing rows are not kept: an unknown key id costs a read each time, as before."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="key-cache-listener")
        if self.listening and (row := self._rows.get(slot)) is not None:
            return row
        generation = self._generation
        row = await read()
        if row is not None and self.listening and generation == self._generation:
            self._rows[slot] = row
        return row

    def _invalidate(self) -> None:
        self._generation += 1
        self._rows.clear()

    async def _listen(self) -> None:
        """LISTEN until cancelled; every notification, and every loss of the connection,
        empties the cache, which answers nothing until LISTEN is in place again."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name="tokenledger-key-cache"
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._invalidate()  # whatever changed while nobody listened
                    self.listening = True
                    log.info("key cache on: listening for key changes")
                    await self._hear(conn)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("key cache off until its LISTEN connection is back", error=str(exc))
            finally:
                self.listening = False
                self._invalidate()
            await asyncio.sleep(reconnect_s)

    async def _hear(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for _ in conn.notifies(timeout=probe_interval_s):
                self._invalidate()
            async with asyncio.timeout(probe_timeout_s):
                await conn.execute("SELECT 1")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
