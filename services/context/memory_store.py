"""The context service's memory table (migration 0011): set, list and delete facts of one
conversation. Each call is one short transaction; a SetMemory that would take a conversation
over its bound of facts writes nothing. Sets of one conversation are serialized by an
advisory lock on it, so two concurrent sets cannot both pass the bound."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from services.context.memory import Conversation, Fact, memory_facts_count_max
from services.platform.errors import MemoryFull

LIST_SQL = """
SELECT fact_key, fact_value, source_index,
       (extract(epoch FROM set_at) * 1000)::bigint AS set_at_ms
FROM context_memory_facts
WHERE tenant_id = %s AND user_id = %s AND conversation_id = %s
ORDER BY set_at DESC, fact_key
"""
UPSERT_SQL = """
INSERT INTO context_memory_facts
    (tenant_id, user_id, conversation_id, fact_key, fact_value, source_index, set_at)
VALUES (%s, %s, %s, %s, %s, %s, clock_timestamp())
ON CONFLICT (tenant_id, user_id, conversation_id, fact_key) DO UPDATE
SET fact_value = EXCLUDED.fact_value, source_index = EXCLUDED.source_index,
    set_at = EXCLUDED.set_at
"""
DELETE_SOME_SQL = """
DELETE FROM context_memory_facts
WHERE tenant_id = %s AND user_id = %s AND conversation_id = %s AND fact_key = ANY(%s)
"""
DELETE_ALL_SQL = """
DELETE FROM context_memory_facts
WHERE tenant_id = %s AND user_id = %s AND conversation_id = %s
"""
LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"


def _key(c: Conversation) -> tuple[str, str, str]:
    return c.tenant_id, c.user_id, c.conversation_id


def _fact(row: dict[str, Any]) -> Fact:
    return Fact(row["fact_key"], row["fact_value"], row["source_index"], row["set_at_ms"])


class MemoryStore:
    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def list(self, c: Conversation) -> list[Fact]:
        """The conversation's facts, the most recently set first."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(LIST_SQL, _key(c))
            return [_fact(row) for row in await cur.fetchall()]

    async def set(self, c: Conversation, facts: Sequence[Fact]) -> builtins.list[Fact]:
        """Upsert all the facts (newer values replace older) or none; the memory after it."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(LOCK_SQL, ("context_memory\x1f" + "\x1f".join(_key(c)),))
            for f in facts:
                await conn.execute(UPSERT_SQL, (*_key(c), f.key, f.value, f.source_index))
            cur = await conn.execute(LIST_SQL, _key(c))
            rows = [_fact(row) for row in await cur.fetchall()]
            if len(rows) > memory_facts_count_max:
                raise _full(c, len(rows), len(facts))
            return rows

    async def delete(self, c: Conversation, keys: Sequence[str]) -> int:
        """Delete the named facts (every fact when `keys` is empty); how many went."""
        async with self._pool.connection() as conn, conn.transaction():
            if keys:
                cur = await conn.execute(DELETE_SOME_SQL, (*_key(c), list(keys)))
            else:
                cur = await conn.execute(DELETE_ALL_SQL, _key(c))
            return int(cur.rowcount)


def _full(c: Conversation, would_hold: int, setting: int) -> MemoryFull:
    return MemoryFull(
        f"conversation {c.conversation_id!r} would hold {would_hold} facts after setting "
        f"{setting}; at most {memory_facts_count_max} allowed: delete facts (DeleteMemory) "
        "or replace existing keys",
        metadata={
            "facts_max": str(memory_facts_count_max),
            "facts_after": str(would_hold),
        },
    )
