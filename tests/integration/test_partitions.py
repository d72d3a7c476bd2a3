"""Monthly partitions of the log (migration 0014): a populated log converts to partitions and
back unchanged; every partition is append-only; two writers cannot both append one version
although (stream, version) is no longer a unique key of the table, nor one statement a
repeated or missing one (migration 0015); partitions are made ahead and an insert past them
lands in the default partition."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ledger import codec
from services.platform import db
from tests.support import Clock, ServerThread, cycle, new_id, scratch_database, verify_tenant

_COLUMNS = (*codec.EVENT_COLUMNS, *codec.CHAIN_COLUMNS)


def all_events(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM events ORDER BY position").fetchall()


def partition_counts(url: str) -> dict[str, int]:
    """Rows per partition (tableoid names the partition a row lies in)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1"
        ).fetchall()
    return dict(rows)


def relkind(url: str, name: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT relkind::text FROM pg_class WHERE relname = %s", (name,))
        found = row.fetchone()
    return found[0] if found else ""


def month(at: datetime) -> str:
    return f"events_{at:%Y_%m}"


def make_partitions(url: str, start: datetime) -> None:
    """What the sweeper of a server with that clock does, before any event is written."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT events_create_partitions(%s, 4)", (start.date(),))


@pytest.fixture
def two_months(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A database of its own whose tenant has events 70 days ago and now."""
    tenant = new_id("t")
    with scratch_database(tmp_path) as url:
        clock = Clock()
        clock.now -= timedelta(days=70)
        make_partitions(url, clock.now)
        server = ServerThread(url, clock=clock).start()
        try:
            with server.stub() as stub:
                cycle(stub, tenant, "ann", "c1", 300, 200)
                cycle(stub, tenant, "bob", "", 500, -1)
                clock.now = datetime.now(UTC)
                cycle(stub, tenant, "ann", "c1", 301, 100)
                cycle(stub, tenant, "cy", "c2", 400, 399)
        finally:
            server.stop()
        yield url, tenant


def test_a_populated_log_converts_to_partitions_and_back(two_months: tuple[str, str]) -> None:
    url, tenant = two_months
    old = datetime.now(UTC) - timedelta(days=70)
    live = all_events(url)
    assert relkind(url, "events") == "p"
    counts = partition_counts(url)
    assert counts[month(old)] == 4 and counts[month(datetime.now(UTC))] == 4

    config = db._config(url)
    command.downgrade(config, "0012")
    assert relkind(url, "events") == "r" and relkind(url, month(old)) == ""
    assert all_events(url) == live
    command.upgrade(config, "head")
    assert relkind(url, "events") == "p"
    assert all_events(url) == live
    assert partition_counts(url) == counts
    report = verify_tenant(url, tenant)
    assert not report.breaks and not report.differences

    server = ServerThread(url).start()  # appending goes on where the log was
    try:
        with server.stub() as stub:
            cycle(stub, tenant, "ann", "c1", 302, 10)
    finally:
        server.stop()
    after = all_events(url)
    assert [e["position"] for e in after[len(live) :]] == [
        live[-1]["position"] + 1,
        live[-1]["position"] + 2,
    ]
    assert [e["version"] for e in after if e["user_id"] == "ann" and e["conversation_id"]] == [
        1, 2, 3, 4, 5, 6,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {} SET amount = 1",
        "DELETE FROM {}",
        "TRUNCATE {}",
        "UPDATE {} SET amount = 1 WHERE false",  # a statement trigger: even no row is refused
    ],
)
@pytest.mark.parametrize("which", ["current", "default", "parent"])
def test_every_partition_is_append_only(database_url: str, statement: str, which: str) -> None:
    table = {"current": month(datetime.now(UTC)), "default": "events_default", "parent": "events"}
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT count(*) FROM events").fetchone()
        with pytest.raises(pg_errors.RestrictViolation, match="append-only"):
            conn.execute(sql.SQL(statement).format(sql.Identifier(table[which])))
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM events").fetchone() == before


def test_the_app_role_cannot_reach_a_partition_directly(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SET ROLE tokenledger_app")
        now = datetime.now(UTC)
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(month(now))))


def _next_row(url: str, tenant: str, step: int = 1) -> dict[str, Any]:
    """The ann/c1 stream's last event, as the one `step` versions after it."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        row = conn.execute(
            "SELECT * FROM events WHERE tenant_id = %s AND user_id = 'ann' "
            "AND conversation_id = 'c1' ORDER BY version DESC LIMIT 1",
            (tenant,),
        ).fetchone()
    assert row is not None
    new = {c: row[c] for c in _COLUMNS} | {"version": row["version"] + step}
    new |= {"prev_hash": row["hash"], "hash": codec.event_hash(new, row["hash"])}
    return new | {"data": Jsonb(row["data"])}


_INSERT = (
    f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ("  # noqa: S608 (constant names)
    + ", ".join(f"%({c})s" for c in _COLUMNS)
    + ")"
)


def test_two_writers_cannot_both_append_one_version(database_url: str, busy_tenant: str) -> None:
    """The second waits for the first's transaction, then fails as a duplicate key did."""
    row = _next_row(database_url, busy_tenant)
    first = psycopg.connect(database_url)
    outcome: list[BaseException | None] = []

    def second() -> None:
        try:
            with psycopg.connect(database_url) as conn:
                conn.execute(_INSERT, row)
            outcome.append(None)
        except psycopg.Error as exc:
            outcome.append(exc)

    try:
        first.execute(_INSERT, row)
        racer = threading.Thread(target=second)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), "the second writer must wait for the first"
        first.commit()
        racer.join(10)
    finally:
        first.close()
    assert len(outcome) == 1 and isinstance(outcome[0], pg_errors.UniqueViolation)
    assert verify_tenant(database_url, busy_tenant).breaks == []


def test_a_version_that_skips_one_is_refused(database_url: str, busy_tenant: str) -> None:
    with (
        psycopg.connect(database_url) as conn,
        pytest.raises(pg_errors.UniqueViolation, match="is not at version"),
    ):
        conn.execute(_INSERT, _next_row(database_url, busy_tenant, step=2))


def test_a_second_first_version_is_refused(database_url: str, busy_tenant: str) -> None:
    row = _next_row(database_url, busy_tenant) | {"version": 1}
    with (
        psycopg.connect(database_url) as conn,
        pytest.raises(pg_errors.UniqueViolation, match="event_stream_heads_pkey"),
    ):
        conn.execute(_INSERT, row)


def _run(url: str, tenant: str, versions: list[int]) -> list[dict[str, Any]]:
    """Rows of the ann/c1 stream at `versions` after its last, each chained to the one before."""
    rows = [_next_row(url, tenant, versions[0])]
    for step in versions[1:]:
        prev = rows[-1] | {"data": rows[-1]["data"].obj}
        new = prev | {"version": rows[0]["version"] - versions[0] + step}
        new |= {"prev_hash": prev["hash"], "hash": codec.event_hash(new, prev["hash"])}
        rows.append(new | {"data": Jsonb(new["data"])})
    return rows


def _insert_all(url: str, rows: list[dict[str, Any]]) -> None:
    """The rows in one INSERT statement, as the store appends a transaction's events."""
    values = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder(f"{c}{i}") for c in _COLUMNS))
        for i in range(len(rows))
    )
    params = {f"{c}{i}": row[c] for i, row in enumerate(rows) for c in _COLUMNS}
    with psycopg.connect(url) as conn:
        conn.execute(
            sql.SQL("INSERT INTO events ({}) VALUES {}").format(
                sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)), values
            ),
            params,
        )


def _head(url: str, tenant: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT version FROM event_stream_heads WHERE tenant_id = %s AND user_id = 'ann' "
            "AND conversation_id = 'c1'",
            (tenant,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_one_statement_appends_a_run_of_versions_and_the_head_moves_to_its_last(
    database_url: str, busy_tenant: str
) -> None:
    """The heads move once per stream and statement (migration 0015): a run of versions in
    one INSERT is taken whole, and the next single append follows its last."""
    rows = _run(database_url, busy_tenant, [1, 2, 3])
    _insert_all(database_url, rows)
    assert _head(database_url, busy_tenant) == rows[-1]["version"]
    _insert_all(database_url, [_next_row(database_url, busy_tenant)])
    assert _head(database_url, busy_tenant) == rows[-1]["version"] + 1
    assert verify_tenant(database_url, busy_tenant).breaks == []


@pytest.mark.parametrize("versions", [[1, 1], [1, 3], [2, 3]])
def test_a_statement_that_repeats_skips_or_starts_past_a_version_is_refused_whole(
    database_url: str, busy_tenant: str, versions: list[int]
) -> None:
    head = _head(database_url, busy_tenant)
    with pytest.raises(
        pg_errors.UniqueViolation, match=r"repeated or missing|is not at version|_pkey"
    ):
        _insert_all(database_url, _run(database_url, busy_tenant, versions))
    assert _head(database_url, busy_tenant) == head


def test_partitions_are_made_ahead_and_the_default_takes_the_rest(tmp_path: Path) -> None:
    """The sweeper of a server whose clock is a year ahead makes that year's months; an event
    past every partition still goes in, to the default partition."""
    tenant = new_id("t")
    with scratch_database(tmp_path) as url:
        clock = Clock()
        clock.now += timedelta(days=400)
        server = ServerThread(url, clock=clock).start()
        try:
            deadline = time.monotonic() + 10
            while relkind(url, month(clock.now)) != "r" and time.monotonic() < deadline:
                time.sleep(0.05)
            with server.stub() as stub:
                cycle(stub, tenant, "ann", "c1", 300, 200)
            assert relkind(url, month(clock.now + timedelta(days=93))) == "r"
            assert relkind(url, month(clock.now + timedelta(days=130))) == ""
            clock.now += timedelta(days=400)  # past them all
            with server.stub() as stub:
                cycle(stub, tenant, "ann", "c1", 301, 200)
        finally:
            server.stop()
        assert partition_counts(url) == {month(clock.now - timedelta(days=400)): 2,
                                         "events_default": 2}  # fmt: skip
        report = verify_tenant(url, tenant)
        assert not report.breaks and not report.differences


def test_a_deleted_event_is_still_found_after_partitioning(
    database_url: str, ledger: ServerThread
) -> None:
    busy_tenant = new_id("t")
    with ledger.stub() as stub:
        cycle(stub, busy_tenant, "ann", "c1", 300, 200)
        cycle(stub, busy_tenant, "ann", "c1", 301, 200)
    with psycopg.connect(database_url) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off: superuser only
        conn.execute(
            "DELETE FROM events WHERE tenant_id = %s AND user_id = 'ann' "
            "AND conversation_id = 'c1' AND version = 2",
            (busy_tenant,),
        )
    breaks = verify_tenant(database_url, busy_tenant).breaks
    assert [(b.stream.user_id, b.version, b.problem) for b in breaks] == [
        ("ann", 3, "version 3 follows 1")
    ]
