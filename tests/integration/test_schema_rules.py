"""The schema stays distributable by Citus on the tenant key: read from the catalog of the
migrated database, every table has tenant_id, every primary key, unique constraint, unique
index and exclusion constraint includes it, and no foreign key crosses tenants. The only
exceptions are the reference tables listed here (replicated whole to every node), each with
the reason it cannot be distributed."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

TENANT = "tenant_id"
REFERENCE_TABLES = {
    "api_keys": "caller identities are looked up by key id (or certificate name) before the "
    "tenant is known; small and rarely written: a Citus reference table",
}
"""Tables deliberately global, exempt from the key rules (migrations say why, too)."""
NOT_DISTRIBUTED = {"alembic_version"}
"""Bookkeeping of the migration tool, not data."""


@pytest.fixture(scope="module")
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url) as connection:
        yield connection


def tables(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
    ).fetchall()
    return {name for (name,) in rows} - NOT_DISTRIBUTED


def unique_keys(conn: psycopg.Connection) -> list[tuple[str, str, list[str | None]]]:
    """(table, index, key columns) of every unique index — which includes those behind
    primary keys and unique constraints; an expression is None."""
    rows = conn.execute(
        """SELECT t.relname, i.relname,
                  array(SELECT a.attname
                        FROM unnest(x.indkey[:x.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
                        LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
                        ORDER BY k.n)
           FROM pg_index x
           JOIN pg_class i ON i.oid = x.indexrelid
           JOIN pg_class t ON t.oid = x.indrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
           WHERE n.nspname = 'public' AND x.indisunique"""
    ).fetchall()
    return [(table, index, list(columns)) for table, index, columns in rows]


def constraints(conn: psycopg.Connection, kind: str) -> list[tuple[str, str, list[str], str]]:
    """(table, constraint, columns, referenced table) of constraints of `kind` (f, x, ...)."""
    rows = conn.execute(
        """SELECT t.relname, c.conname,
                  array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)
                        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
                        ORDER BY k.n),
                  coalesce(r.relname, '')
           FROM pg_constraint c
           JOIN pg_class t ON t.oid = c.conrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
           LEFT JOIN pg_class r ON r.oid = c.confrelid
           WHERE n.nspname = 'public' AND c.contype = %s""",
        (kind,),
    ).fetchall()
    return [(table, name, list(columns), ref) for table, name, columns, ref in rows]


def test_reference_tables_exist_and_need_their_exemption(conn: psycopg.Connection) -> None:
    """Each listed exception is a real table that breaks a key rule: the list cannot go stale
    and hide a table that should be distributed."""
    present = tables(conn)
    missing = sorted(set(REFERENCE_TABLES) - present)
    assert not missing, f"listed as reference tables but not in the schema: {missing}"
    keyed = {table for table, _, columns in unique_keys(conn) if TENANT not in columns}
    needless = sorted(set(REFERENCE_TABLES) - keyed)
    assert not needless, f"reference tables whose keys include {TENANT}: {needless}; distribute"


def tenantless_tables(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT table_name, is_nullable FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name = %s",
        (TENANT,),
    ).fetchall()
    nullable = {table: flag for table, flag in rows}
    return [
        f"{table}: no {TENANT} column" if table not in nullable else f"{table}.{TENANT} is nullable"
        for table in sorted(tables(conn))
        if nullable.get(table) != "NO"
    ]


def keys_without_tenant(conn: psycopg.Connection) -> list[str]:
    offenders = [
        f"{table}: unique index {index} on ({', '.join(c or '<expression>' for c in columns)})"
        for table, index, columns in unique_keys(conn)
        if TENANT not in columns and table not in {*REFERENCE_TABLES, *NOT_DISTRIBUTED}
    ]
    offenders += [
        f"{table}: exclusion constraint {name} on ({', '.join(columns)})"
        for table, name, columns, _ in constraints(conn, "x")
        if TENANT not in columns and table not in {*REFERENCE_TABLES, *NOT_DISTRIBUTED}
    ]
    return sorted(offenders)


def cross_tenant_foreign_keys(conn: psycopg.Connection) -> list[str]:
    offenders = [
        f"{table}: foreign key {name} ({', '.join(columns)}) -> {ref}"
        for table, name, columns, ref in constraints(conn, "f")
        if ref not in REFERENCE_TABLES and TENANT not in columns
    ]
    offenders += [
        f"{table}: reference table {table} refers to distributed {ref} ({name})"
        for table, name, _, ref in constraints(conn, "f")
        if table in REFERENCE_TABLES and ref not in REFERENCE_TABLES
    ]
    return sorted(offenders)


def test_every_table_has_a_not_null_tenant_id(conn: psycopg.Connection) -> None:
    offenders = tenantless_tables(conn)
    assert not offenders, "tables that cannot be distributed by tenant:\n" + "\n".join(offenders)


def test_every_primary_key_and_unique_index_includes_tenant_id(conn: psycopg.Connection) -> None:
    """Citus enforces uniqueness only within a shard, so each unique key must contain the
    distribution column (as a plain column, not inside an expression)."""
    offenders = keys_without_tenant(conn)
    assert not offenders, f"unique keys without {TENANT}:\n" + "\n".join(offenders)


def test_no_foreign_key_crosses_tenants(conn: psycopg.Connection) -> None:
    """A foreign key between distributed tables must join on the tenant; one to a reference
    table is allowed. (There are none today: the log is the only source of truth.)"""
    offenders = cross_tenant_foreign_keys(conn)
    assert not offenders, "foreign keys that cross tenants:\n" + "\n".join(offenders)


def test_the_rules_name_an_offending_table_and_constraint(conn: psycopg.Connection) -> None:
    """The checks are not vacuous: a table breaking each rule, created in a transaction that
    is rolled back, is named with the constraint at fault."""
    with conn.transaction(force_rollback=True):
        conn.execute(
            """CREATE TABLE bad_notes (tenant_id text, note_id text PRIMARY KEY,
                   reservation_id text, UNIQUE (reservation_id, note_id));
               CREATE TABLE bad_links (tenant_id text NOT NULL, note_id text
                   REFERENCES bad_notes (note_id), PRIMARY KEY (tenant_id, note_id));
               CREATE TABLE bad_global (id text PRIMARY KEY)"""
        )
        assert tenantless_tables(conn) == [
            "bad_global: no tenant_id column",
            "bad_notes.tenant_id is nullable",
        ]
        assert keys_without_tenant(conn) == [
            "bad_global: unique index bad_global_pkey on (id)",
            "bad_notes: unique index bad_notes_pkey on (note_id)",
            "bad_notes: unique index bad_notes_reservation_id_note_id_key on "
            "(reservation_id, note_id)",
        ]
        assert cross_tenant_foreign_keys(conn) == [
            "bad_links: foreign key bad_links_note_id_fkey (note_id) -> bad_notes"
        ]


def test_generated_keys_are_bigint(conn: psycopg.Connection) -> None:
    """Identity and serial columns (events.position) are bigint: Citus hands out per-node
    ranges of a distributed table's sequence only for bigint."""
    rows = conn.execute(
        """SELECT table_name, column_name, data_type FROM information_schema.columns
           WHERE table_schema = 'public'
             AND (is_identity = 'YES' OR column_default LIKE 'nextval(%%')"""
    ).fetchall()
    assert ("events", "position", "bigint") in rows
    offenders = [f"{t}.{c} is {kind}" for t, c, kind in rows if kind != "bigint"]
    assert not offenders, "generated keys that are not bigint:\n" + "\n".join(offenders)
