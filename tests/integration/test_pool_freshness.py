"""The pool lends a connection that came back less than `db.recheck_idle_s` ago without the
round trip of a check, and checks one idle longer (services/platform/db.py _Freshness)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from services.platform import db
from services.platform.db import _Freshness


def test_a_connection_back_a_moment_ago_is_not_checked_one_idle_longer_is(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        freshness = _Freshness()
        conn = await psycopg.AsyncConnection.connect(database_url)
        await freshness.check(conn)  # never seen: checked, and it works
        await freshness.returned(conn)
        await conn.close()  # dead now, as after a database restart
        await freshness.check(conn)  # back a moment ago: lent unchecked
        monkeypatch.setattr(db, "recheck_idle_s", 0.0)
        await asyncio.sleep(0.01)
        with pytest.raises(psycopg.OperationalError):
            await freshness.check(conn)  # idle longer: the check finds it dead

    asyncio.run(main())
