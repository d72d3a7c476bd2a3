"""The events table is append-only in the database itself, and the hash chain finds what a
superuser changes around that."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from ledger import codec, validation
from ledger.application import Ledger
from ledger.model import Commit, Usage
from ledger.postgres.store import PostgresStore
from services.platform import db
from tests.support import event_count, new_id, verify_tenant


async def _write_history(url: str, tenant: str) -> None:
    async with db.make_pool(url, 2) as pool:
        store = Ledger(PostgresStore(pool))
        for n in range(3):
            r = await store.reserve(
                validation.reserve(
                    idempotency_key=new_id("k"),
                    tenant_id=tenant,
                    user_id="u",
                    conversation_id="c",
                    model="m",
                    amount=100,
                    ttl_seconds=60,
                    labels={},
                )
            )
            await store.commit(Commit(tenant, r.reservation.reservation_id, Usage(n + 1)))


def _breaks(url: str, tenant: str) -> list[tuple[int, str]]:
    return [(b.version, b.problem) for b in verify_tenant(url, tenant).breaks]


@pytest.fixture
def history(database_url: str) -> Iterator[str]:
    tenant = new_id("t")
    asyncio.run(_write_history(database_url, tenant))
    yield tenant


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET amount = amount + 1 WHERE tenant_id = %s",
        "DELETE FROM events WHERE tenant_id = %s",
        "DELETE FROM events WHERE tenant_id = %s AND false",
        "TRUNCATE events",
    ],
    ids=["update", "delete", "delete-no-rows", "truncate"],
)
def test_events_cannot_be_changed_even_by_the_owner(
    database_url: str, history: str, statement: str
) -> None:
    before = event_count(database_url)
    with psycopg.connect(database_url) as conn:
        params = (history,) if "%s" in statement else None
        with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
            conn.execute(statement, params)
    assert event_count(database_url) == before


def test_untouched_history_verifies(database_url: str, history: str) -> None:
    assert _breaks(database_url, history) == []


def _as_superuser_bypassing_triggers(url: str, sql: str, params: tuple[object, ...]) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off: superuser only
        conn.execute(sql, params)


def test_an_edited_event_is_found_at_its_position(database_url: str, history: str) -> None:
    _as_superuser_bypassing_triggers(
        database_url,
        "UPDATE events SET input_tokens = 1 WHERE tenant_id = %s AND version = 4",
        (history,),
    )
    assert _breaks(database_url, history) == [(4, "hash does not match the event's content")]


def test_a_deleted_event_leaves_a_gap_that_is_found(database_url: str, history: str) -> None:
    _as_superuser_bypassing_triggers(
        database_url, "DELETE FROM events WHERE tenant_id = %s AND version = 3", (history,)
    )
    assert _breaks(database_url, history) == [(4, "version 4 follows 2")]


def test_a_rehashed_edit_breaks_the_link_to_the_next_event(database_url: str, history: str) -> None:
    """Recomputing the edited event's own hash does not help: the next event's prev_hash no
    longer matches it."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        row = conn.execute(
            "SELECT * FROM events WHERE tenant_id = %s AND version = 2", (history,)
        ).fetchone()
    assert row is not None
    forged = {**row, "input_tokens": 0}
    new_hash = codec.event_hash(forged, bytes(row["prev_hash"]))
    _as_superuser_bypassing_triggers(
        database_url,
        "UPDATE events SET input_tokens = 0, hash = %s WHERE tenant_id = %s AND version = 2",
        (new_hash, history),
    )
    assert _breaks(database_url, history) == [(3, "prev_hash is not the previous event's hash")]


def test_every_event_records_its_writing_transaction(database_url: str, history: str) -> None:
    """Each event stores the xid8 of the transaction that wrote it, for gap-free followers."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT event_type, xid FROM events WHERE tenant_id = %s ORDER BY position",
            (history,),
        ).fetchall()
    assert len(rows) == 6
    reserve_xid, commit_xid = rows[0][1], rows[1][1]
    assert int(str(reserve_xid)) > 0 and reserve_xid != commit_xid
