"""The monthly partitions of `events` (migration 0014): made ahead of time here, dropped only
after archiving (ledger/postgres/archive.py)."""

from __future__ import annotations

from datetime import date
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ledger.postgres.errors import translated

Conn = psycopg.AsyncConnection[dict[str, Any]]

MONTHS_AHEAD = 3
"""Partitions kept ready after the current month (an insert beyond them goes to the default
partition, so a sweeper that stopped for months costs nothing but that partition's size)."""


async def create_ahead(pool: AsyncConnectionPool[Conn], today: date) -> int:
    """Make the missing partitions from `today`'s month to MONTHS_AHEAD after it; returns how
    many were made (nearly always none: then it takes no lock)."""
    with translated():
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT events_create_partitions(%s, %s) AS made", (today, MONTHS_AHEAD + 1)
            )
            row = await cur.fetchone()
    return int(row["made"]) if row else 0
