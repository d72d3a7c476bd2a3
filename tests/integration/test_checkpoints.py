"""Audit checkpoints (migration 0010, ledger/postgres/checkpoints.py): a checkpoint is taken
only over a log that verifies, chained to the previous one; a verification from it reads only
what was appended since and reports what a full one does about that; a full verification
checks every checkpoint; each kind of tampering is found by the mode that should find it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from ledger import codec
from ledger.checkpoints import Checkpoint
from ledger.errors import CheckpointRefused, Conflict
from ledger.postgres import verify
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.verify import Part
from ledger.reads import Scope, VerifyReport
from services.platform import db
from tests.support import ServerThread, cycle, new_id, verify_tenant

USERS = [f"u{n}" for n in range(12)]


def audit_call(
    url: str, workers: int, method: str, *args: Any, before_handoff: bool = False, **kwargs: Any
) -> Any:
    async def run() -> Any:
        async with db.make_pool(url, 2) as pool:
            audit = LedgerAudit(pool, workers=workers, before_handoff=before_handoff)
            with closing(audit):
                return await getattr(audit, method)(*args, **kwargs)

    return asyncio.run(run())


def take(url: str, tenant: str, workers: int = 1) -> tuple[VerifyReport, Checkpoint | None]:
    result: tuple[VerifyReport, Checkpoint | None] = audit_call(url, workers, "checkpoint", tenant)
    return result


def since(url: str, tenant: str, workers: int = 1, before_handoff: bool = False) -> VerifyReport:
    report: VerifyReport = audit_call(
        url, workers, "verify", Scope(tenant), from_checkpoint=True, before_handoff=before_handoff
    )
    return report


def traffic(ledger: ServerThread, tenant: str, round_: int) -> None:
    with ledger.stub() as stub:
        for n, user in enumerate(USERS):
            cycle(stub, tenant, user, f"c{n % 3}", 100 + n + round_, 50 + n)
        cycle(stub, tenant, "ann", "c1", 301, 200)  # a stream the busy tenant has too


def rows(url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def checkpoint_count(url: str) -> int:
    return int(rows(url, "SELECT count(*) FROM audit_checkpoints")[0][0]) + int(
        rows(url, "SELECT count(*) FROM audit_checkpoint_rows")[0][0]
    )


@pytest.fixture
def tenant(ledger: ServerThread, busy_tenant: str) -> Iterator[str]:
    traffic(ledger, busy_tenant, 0)
    yield busy_tenant


def clean(report: VerifyReport) -> bool:
    return not report.breaks and not report.differences


def test_checkpoints_chain_and_verification_from_one_reads_only_what_came_after(
    database_url: str, ledger: ServerThread, tenant: str
) -> None:
    total = int(
        rows(database_url, "SELECT count(*) FROM events WHERE tenant_id = %s", tenant)[0][0]
    )
    report, first = take(database_url, tenant, workers=3)
    assert clean(report) and first is not None
    assert (first.seq, first.events, first.prev_hash) == (1, total, codec.GENESIS_HASH)
    assert first.state["account"].rows > len(USERS) and first.state["stream"].rows > len(USERS)
    assert first.delta_rows == sum(d.rows for d in first.state.values())

    traffic(ledger, tenant, 1)
    appended = int(rows(database_url, "SELECT count(*) FROM events WHERE tenant_id = %s "
                        "AND position > %s", tenant, first.position)[0][0])  # fmt: skip
    assert appended > len(USERS)
    one, three = since(database_url, tenant, 1), since(database_url, tenant, 3)
    assert clean(one) and one == three
    assert (one.events_checked, one.from_checkpoint, one.from_position) == (
        appended, 1, first.position,
    )  # fmt: skip

    report, second = take(database_url, tenant)
    assert clean(report) and second is not None
    assert (second.seq, second.prev_hash, second.events) == (2, first.hash, total + appended)
    # Its own rows are what changed: fewer than the whole state, and the digest followed.
    assert 0 < second.delta_rows < sum(d.rows for d in second.state.values())
    full = verify_tenant(database_url, tenant, workers=3)
    assert clean(full) and full.checkpoints_checked == 2
    assert full.events_checked == total + appended


def test_a_checkpoint_is_refused_with_nothing_written(
    database_url: str, ledger: ServerThread, tenant: str
) -> None:
    before = checkpoint_count(database_url)
    with pytest.raises(CheckpointRefused, match="has no events"):
        take(database_url, new_id("nobody"))
    with pytest.raises(CheckpointRefused, match="no checkpoint yet"):
        since(database_url, tenant)
    with pytest.raises(CheckpointRefused, match="whole tenant"):
        audit_call(database_url, 1, "verify", Scope(tenant, "ann"), from_checkpoint=True)
    # A log that does not verify gets no checkpoint: the report says why.
    with psycopg.connect(database_url) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE accounts SET held = held + 1 WHERE tenant_id = %s AND user_id = 'u1' "
                     "AND conversation_id = ''", (tenant,))  # fmt: skip
    report, made = take(database_url, tenant)
    assert made is None and [d.key for d in report.differences] == [f"{tenant}/u1"]
    assert checkpoint_count(database_url) == before
    with psycopg.connect(database_url) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE accounts SET held = held - 1 WHERE tenant_id = %s AND user_id = 'u1' "
                     "AND conversation_id = ''", (tenant,))  # fmt: skip
    assert take(database_url, tenant)[1] is not None
    after = checkpoint_count(database_url)
    with pytest.raises(CheckpointRefused, match=r"no event of tenant .* since checkpoint 1"):
        take(database_url, tenant)
    assert checkpoint_count(database_url) == after


def test_checkpoints_cannot_be_changed_even_by_their_owner(database_url: str, tenant: str) -> None:
    assert take(database_url, tenant)[1] is not None
    for sql in (
        "UPDATE audit_checkpoints SET events = events + 1 WHERE tenant_id = %s",
        "DELETE FROM audit_checkpoint_rows WHERE tenant_id = %s",
        "TRUNCATE audit_checkpoints",
    ):
        with (
            psycopg.connect(database_url) as conn,
            pytest.raises(psycopg.errors.RestrictViolation, match="append-only"),
        ):
            conn.execute(sql, (tenant,) if "%s" in sql else ())


# change -> (SQL run as a superuser with the triggers off, found by a full verification, found
# by one from the checkpoint). %(t)s is the tenant, %(p)s the checkpoint's position.
TAMPERING = {
    "an event before the checkpoint": (
        "UPDATE events SET input_tokens = input_tokens + 7 WHERE tenant_id = %(t)s "
        "AND user_id = 'u3' AND event_type = 'ReservationCommitted' AND position <= %(p)s",
        True, False,
    ),
    "an event after the checkpoint": (
        "UPDATE events SET input_tokens = input_tokens + 7 WHERE tenant_id = %(t)s "
        "AND user_id = 'u3' AND event_type = 'ReservationCommitted' AND position > %(p)s",
        True, True,
    ),
    "a deleted event after the checkpoint": (
        "DELETE FROM events WHERE tenant_id = %(t)s AND position = (SELECT min(position) "
        "FROM events WHERE tenant_id = %(t)s AND user_id = 'u5' AND position > %(p)s)",
        True, True,
    ),
    "a deleted event before the checkpoint": (
        "DELETE FROM events WHERE tenant_id = %(t)s AND position = (SELECT min(position) "
        "FROM events WHERE tenant_id = %(t)s AND user_id = 'u6' AND position <= %(p)s)",
        True, True,  # the second by the count of events up to the checkpoint
    ),
    "the checkpoint": (
        "UPDATE audit_checkpoints SET events = events - 1 WHERE tenant_id = %(t)s",
        True, True,
    ),
    "a row of the checkpoint": (
        "UPDATE audit_checkpoint_rows SET value = replace(value, '\"held\":0', '\"held\":9') "
        "WHERE tenant_id = %(t)s AND kind = 'account' "
        "AND key = '[\"' || %(t)s || '\",\"u9\",\"\"]'",
        True, True,
    ),
    "a projection row the new events changed": (
        "UPDATE usage_hourly SET output_tokens = output_tokens + 1 WHERE tenant_id = %(t)s "
        "AND user_id = 'u7'",
        True, True,
    ),
    "the tenant's own account row": (
        "UPDATE accounts SET used_total = used_total + 1 WHERE tenant_id = %(t)s "
        "AND user_id = ''",
        True, True,  # the users' new events change the tenant's account
    ),
    "the tenant's own event before the checkpoint": (
        "UPDATE events SET data = jsonb_set(data, '{limit}', '1') WHERE tenant_id = %(t)s "
        "AND user_id = '' AND event_type = 'QuotaSet' AND position <= %(p)s",
        True, False,
    ),
    "a projection row no new event changed": (
        "UPDATE reservations SET amount = amount + 1 WHERE tenant_id = %(t)s AND user_id = 'bob'",
        True, False,  # README: what a verification from a checkpoint does not prove
    ),
}  # fmt: skip


@pytest.mark.parametrize("change", TAMPERING)
def test_each_tampering_is_found_by_the_mode_that_should_find_it(
    database_url: str, ledger: ServerThread, tenant: str, change: str
) -> None:
    made = take(database_url, tenant)[1]
    assert made is not None
    traffic(ledger, tenant, 1)
    assert clean(since(database_url, tenant)) and clean(verify_tenant(database_url, tenant))
    sql, by_full, by_since = TAMPERING[change]
    with psycopg.connect(database_url) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off: a superuser
        assert conn.execute(sql, {"t": tenant, "p": made.position}).rowcount >= 1
    full = verify_tenant(database_url, tenant, workers=3)
    assert (not clean(full)) == by_full, (full.breaks, full.differences)
    incremental = since(database_url, tenant, workers=3)
    assert (not clean(incremental)) == by_since, (incremental.breaks, incremental.differences)
    # and the design before the handoff reports exactly the same, in both modes
    assert verify_tenant(database_url, tenant, workers=3, handoff=False) == full
    assert since(database_url, tenant, workers=3, before_handoff=True) == incremental
    if change in NAMED:  # the checkpoint is named in both reports, with what differs
        for report in (full, incremental):
            named = {(d.key, d.field) for d in report.differences if d.kind == "checkpoint"}
            assert (made.name, NAMED[change]) in named, report.differences


NAMED = {
    "the checkpoint": "chain",
    "a row of the checkpoint": "rows",
    "a deleted event before the checkpoint": "events",
}


def test_a_history_rewritten_consistently_before_a_checkpoint_is_found_by_its_digest(
    database_url: str, ledger: ServerThread, tenant: str
) -> None:
    """A superuser rewrites an event before the checkpoint and recomputes every hash after it
    and the stream's head, so every chain verifies and every projection matches: only the
    checkpoint, which recorded the stream's head, tells (and the first event after it)."""
    made = take(database_url, tenant)[1]
    assert made is not None
    traffic(ledger, tenant, 1)
    stream = (tenant, "u2", "c2")
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        conn.execute("SET session_replication_role = replica")
        names = ", ".join([*codec.EVENT_COLUMNS, *codec.CHAIN_COLUMNS])
        found = conn.execute(
            f"SELECT {names} FROM events WHERE (tenant_id, user_id, conversation_id) = "  # noqa: S608
            "(%s, %s, %s) ORDER BY version",
            stream,
        ).fetchall()
        assert len(found) >= 4  # two events before the checkpoint, two after
        found[0]["trace_id"] = "forged"
        head = codec.GENESIS_HASH
        for row in found:
            row["prev_hash"], row["hash"] = head, codec.event_hash(row, head)
            head = row["hash"]
            conn.execute(
                "UPDATE events SET trace_id = %s, prev_hash = %s, hash = %s WHERE "
                "(tenant_id, user_id, conversation_id, version) = (%s, %s, %s, %s)",
                (row["trace_id"], row["prev_hash"], row["hash"], *stream, row["version"]),
            )
        conn.execute(
            "UPDATE accounts SET head_hash = %s WHERE (tenant_id, user_id, conversation_id) = "
            "(%s, %s, %s)",
            (head, *stream),
        )
    full = verify_tenant(database_url, tenant, workers=3)
    assert not full.breaks
    assert [(d.kind, d.key, d.field) for d in full.differences] == [
        ("checkpoint", made.name, "stream")
    ]
    incremental = since(database_url, tenant)
    assert [(b.stream.user_id, b.problem) for b in incremental.breaks] == [
        ("u2", "prev_hash is not the previous event's hash")
    ]


def test_a_tenant_is_due_by_events_since_or_by_time_since_its_last_checkpoint(
    database_url: str, ledger: ServerThread, tenant: str
) -> None:
    def due(every_events: int, every_s: float) -> bool:
        return tenant in audit_call(database_url, 1, "due_for_checkpoint", every_events, every_s)

    assert due(1, 0) and due(0, 3600)  # no checkpoint yet: due by either rule
    assert not due(0, 0)  # both rules off
    assert take(database_url, tenant)[1] is not None
    assert not due(1, 0) and not due(0, 0.001)  # nothing since: never due
    with ledger.stub() as stub:
        cycle(stub, tenant, "ann", "c1", 101, 50)  # two events
    assert due(2, 0) and not due(3, 0)
    assert due(0, 0.001) and not due(0, 3600)


def test_two_takers_at_once_make_one_checkpoint_and_a_retryable_refusal(
    database_url: str, tenant: str
) -> None:
    async def both() -> list[Any]:
        async with db.make_pool(database_url, 4) as pool:
            audits = [LedgerAudit(pool, workers=1), LedgerAudit(pool, workers=1)]
            try:
                return await asyncio.gather(
                    *(a.checkpoint(tenant) for a in audits), return_exceptions=True
                )
            finally:
                for a in audits:
                    a.close()

    outcomes = asyncio.run(both())
    taken = [o for o in outcomes if isinstance(o, tuple) and o[1] is not None]
    refused = [o for o in outcomes if isinstance(o, Conflict | CheckpointRefused)]
    assert len(taken) == 1 and len(refused) == 1, outcomes
    assert rows(database_url, "SELECT seq FROM audit_checkpoints WHERE tenant_id = %s",
                tenant) == [(1,)]  # fmt: skip


def test_a_verification_from_a_checkpoint_reads_its_state_while_the_log_streams(
    database_url: str, ledger: ServerThread, tenant: str
) -> None:
    """The events after a checkpoint are decoded in chunks, and each chunk's keys are looked
    up in the checkpoint while the COPY of the log is still streaming (a second connection on
    the same snapshot: the first one hung there once). Chunks of 5 rows report what one
    chunk does."""
    made = take(database_url, tenant)[1]
    assert made is not None
    traffic(ledger, tenant, 1)
    with psycopg.connect(database_url) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        part = Part(Scope(tenant), True, True, since_seq=made.seq, since=made.position)
        small = verify.check(database_url, row[0], part, chunk_rows=5)
        whole = verify.check(database_url, row[0], part)
    assert small == whole and clean(whole) and whole.events_checked > 5 * 4
