"""Followers wake on LISTEN/NOTIFY: a committed event reaches a follower long before any poll
would have found it; with the listening connection cut, followers fall back to polling and
still miss nothing."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from ledger import limits, validation
from ledger.application import Ledger
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.store import PostgresStore
from services.platform import db
from tests.support import new_id

SLOW_POLL_S = 30.0
"""The backstop here: longer than any latency a test accepts."""


def _reserve(tenant: str) -> object:
    return validation.reserve(
        idempotency_key=new_id("k"), tenant_id=tenant, user_id="u", conversation_id="",
        model="m", amount=1, ttl_seconds=60, labels={},
    )  # fmt: skip


async def _first_event_after_write(
    url: str, tenant: str, listening: list[bool], before_write: object = None
) -> float:
    """Seconds from a Reserve's return to its event reaching a follower of the tenant."""
    async with db.make_pool(url, 4) as pool:
        audit = LedgerAudit(pool)
        ledger = Ledger(PostgresStore(pool))
        stop = asyncio.Event()
        seen = asyncio.Event()

        async def follow() -> None:
            async for _ in audit.follow(tenant, (0, 0), 0, stop):
                seen.set()

        follower = asyncio.create_task(follow())
        try:
            await asyncio.sleep(0.5)  # the follower has read the empty log and waits
            listening.append(audit._watcher().listening)
            if before_write is not None:
                await before_write()  # type: ignore[operator]
            await ledger.reserve(_reserve(tenant))  # type: ignore[arg-type]
            written = time.monotonic()
            await asyncio.wait_for(seen.wait(), 10)
            return time.monotonic() - written
        finally:
            stop.set()
            await follower
            audit.close()


def test_a_follower_wakes_when_its_tenant_commits(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While it listens, a follower polls only after a notification (for events an older
    transaction still holds back); otherwise it waits for the backstop, 30 s here."""
    monkeypatch.setattr(limits, "follow_backstop_s", SLOW_POLL_S)
    listening: list[bool] = []
    latency = asyncio.run(_first_event_after_write(database_url, new_id("t"), listening))
    assert listening == [True]
    assert latency < 5.0  # only a notification explains it: the backstop is 30 s


def test_without_notifications_followers_poll_and_miss_nothing(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "follow_backstop_s", SLOW_POLL_S)

    async def cut_the_listener() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query = 'LISTEN tokenledger_events' AND datname = current_database()"
            ).fetchall()
        assert killed, "no listening connection to cut"
        await asyncio.sleep(0.1)  # its loss is seen; the reconnect waits a second

    listening: list[bool] = []
    latency = asyncio.run(
        _first_event_after_write(
            database_url, new_id("t"), listening, before_write=cut_the_listener
        )
    )
    assert latency < 5.0
