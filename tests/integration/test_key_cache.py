"""The key cache (services/platform/key_cache.py) against the real database and its trigger
(migration 0009): it answers from memory while it listens, a change to `api_keys` empties it,
a lost LISTEN connection turns it off until it is back, and a read that raced a change is
not kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from services.platform import key_cache
from services.platform.key_cache import KeyCache
from tests.support import create_key, new_id

WAIT_S = 10.0


async def _until(condition: Callable[[], bool], what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < WAIT_S, f"gave up waiting: {what}"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


class _Reads:
    """The real SELECT of a key's row, counting how often the table was read."""

    def __init__(self, url: str, key_id: str) -> None:
        self.url, self.key_id = url, key_id
        self.count = 0
        self.done = 0

    async def __call__(self) -> dict[str, Any] | None:
        self.count += 1
        async with await psycopg.AsyncConnection.connect(self.url, row_factory=dict_row) as c:
            cur = await c.execute(
                "SELECT key_id, revoked_at FROM api_keys WHERE key_id = %s", (self.key_id,)
            )
            row = await cur.fetchone()
        self.done += 1
        return row


def _revoke(url: str, key_id: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key_id,))


def _run(url: str, body: Callable[[KeyCache], Awaitable[None]]) -> None:
    async def main() -> None:
        cache = KeyCache(url)
        try:
            await body(cache)
        finally:
            await cache.close()

    asyncio.run(main())


def test_a_key_is_read_once_and_read_again_after_any_change_to_the_table(
    database_url: str,
) -> None:
    key = create_key(database_url, new_id("t"), "writer")
    reads = _Reads(database_url, key.key_id)

    async def body(cache: KeyCache) -> None:
        await cache.lookup(("key", key.key_id), reads)  # starts the listener
        await _until(lambda: cache.listening, "LISTEN in place")
        first = await cache.lookup(("key", key.key_id), reads)
        for _ in range(5):
            assert await cache.lookup(("key", key.key_id), reads) == first
        assert reads.count == 2  # the one before LISTEN, then one for all six
        _revoke(database_url, key.key_id)
        waited = await _until(lambda: len(cache) == 0, "the revocation's notification")
        assert waited < key_cache.revocation_bound_s
        row = await cache.lookup(("key", key.key_id), reads)
        assert row is not None and row["revoked_at"] is not None
        assert reads.count == 3

    _run(database_url, body)


def test_while_the_listen_connection_is_lost_every_lookup_reads_the_table(
    database_url: str,
) -> None:
    key = create_key(database_url, new_id("t"), "writer")
    reads = _Reads(database_url, key.key_id)

    async def body(cache: KeyCache) -> None:
        await cache.lookup(("key", key.key_id), reads)
        await _until(lambda: cache.listening, "LISTEN in place")
        await cache.lookup(("key", key.key_id), reads)
        assert len(cache) == 1
        with psycopg.connect(database_url, autocommit=True) as conn:
            ended = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'tokenledger-key-cache' AND datname = current_database()"
            ).fetchall()
        assert ended == [(True,)]
        await _until(lambda: not cache.listening, "the lost connection noticed")
        assert len(cache) == 0
        before = reads.count
        _revoke(database_url, key.key_id)  # nobody hears this one
        row = await cache.lookup(("key", key.key_id), reads)
        assert row is not None and row["revoked_at"] is not None
        await cache.lookup(("key", key.key_id), reads)
        assert reads.count == before + 2  # nothing kept while off
        await _until(lambda: cache.listening, "LISTEN back")
        await cache.lookup(("key", key.key_id), reads)
        await cache.lookup(("key", key.key_id), reads)
        assert reads.count == before + 3  # kept again

    _run(database_url, body)


def test_a_row_read_while_the_key_changed_is_not_kept(database_url: str) -> None:
    key = create_key(database_url, new_id("t"), "writer")
    reads = _Reads(database_url, key.key_id)

    async def body(cache: KeyCache) -> None:
        await cache.lookup(("key", key.key_id), reads)
        await _until(lambda: cache.listening, "LISTEN in place")
        gate = asyncio.Event()

        async def slow_read() -> dict[str, Any] | None:
            row = await reads()  # read before the revocation commits ...
            await gate.wait()  # ... and returned after it was announced
            return row

        lookup = asyncio.create_task(cache.lookup(("key", key.key_id), slow_read))
        await _until(lambda: reads.done == 2, "the slow read done")
        generation = cache._generation
        _revoke(database_url, key.key_id)
        await _until(lambda: cache._generation > generation, "the notification")
        gate.set()
        stale = await lookup
        assert stale is not None and stale["revoked_at"] is None
        assert len(cache) == 0
        fresh = await cache.lookup(("key", key.key_id), reads)
        assert fresh is not None and fresh["revoked_at"] is not None

    _run(database_url, body)
