"""Event types are declared once (ledger/model.py). What else names them or their columns must
agree with that declaration: the schema's constraint, the proto's comment, the events table."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg

from ledger import codec
from ledger.model import EVENT_TYPES

PROTO = Path(__file__).parents[2] / "proto" / "tokenledger" / "v1" / "ledger.proto"


def test_the_schema_accepts_exactly_the_declared_event_types(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conname = 'events_event_type_check'"
        ).fetchone()
    assert row is not None
    assert set(re.findall(r"'(\w+)'", row[0])) == set(EVENT_TYPES)


def test_the_proto_names_every_declared_event_type() -> None:
    """The comment on LedgerEvent.event_type lists them all, and nothing else."""
    text = PROTO.read_text()
    comment = re.search(r"((?:\s*//[^\n]*\n)+)\s*string event_type = 6;", text)
    assert comment is not None
    named = set(re.findall(r"[A-Z][A-Za-z]+", comment.group(1)))
    assert named == set(EVENT_TYPES)


def test_the_events_table_has_the_columns_and_types_the_codec_writes(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'events'"
        ).fetchall()
    table = dict(rows)
    sql_names = {"text": "text", "bigint": "bigint", "jsonb": "jsonb", "bytea": "bytea",
                 "timestamptz": "timestamp with time zone"}  # fmt: skip
    for name, kind in {**codec.EVENT_COLUMNS, **codec.CHAIN_COLUMNS}.items():
        assert table.get(name) == sql_names[kind], name
