"""Audit checkpoints in PostgreSQL (migration 0010): reading them, checking them, writing one.

Checking a checkpoint here covers what needs no fold: its chain to the previous one, its own
rows against their digest, and the number of events up to its position. Whether its state
equals the log's is checked by a full verification (ledger/postgres/audit.py), whose parts
sum their rebuilt state at each checkpoint's position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from ledger import checkpoints as cp
from ledger.checkpoints import Checkpoint, Digest
from ledger.codec import GENESIS_HASH
from ledger.reads import Difference

Conn = psycopg.AsyncConnection[dict[str, Any]]

_COLUMNS = """tenant_id, seq, position, events, taken_at, state, delta_rows, delta_digest,
    prev_hash, hash"""


def _from_row(row: dict[str, Any]) -> Checkpoint:
    state = row["state"] if isinstance(row["state"], dict) else json.loads(row["state"])
    return Checkpoint(
        tenant_id=row["tenant_id"],
        seq=row["seq"],
        position=row["position"],
        events=row["events"],
        taken_at=row["taken_at"],
        state={kind: Digest.from_json(state.get(kind, {"rows": 0, "sum": "00"})) for kind in
               cp.KINDS},
        delta_rows=row["delta_rows"],
        delta_digest=bytes(row["delta_digest"]),
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
    )  # fmt: skip


async def read_all(conn: Conn, tenant_id: str) -> list[Checkpoint]:
    """The tenant's checkpoints in seq order."""
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM audit_checkpoints WHERE tenant_id = %s ORDER BY seq",  # noqa: S608
        (tenant_id,),
    )
    return [_from_row(row) for row in await cur.fetchall()]


async def events_up_to(conn: Conn, tenant_id: str, after: int, position: int) -> int:
    """How many of the tenant's events lie in (after, position]."""
    cur = await conn.execute(
        "SELECT count(*) AS n FROM events WHERE tenant_id = %s AND position > %s "
        "AND position <= %s",
        (tenant_id, after, position),
    )
    return int((await cur.fetchone() or {"n": 0})["n"])


async def event_counts(
    conn: Conn, checkpoints: list[Checkpoint], seqs: tuple[int, ...], archived: Archived | None
) -> dict[int, int]:
    """For the checkpoints in `seqs`, the tenant's events up to each one's position now. With
    the tenant `archived`, the events up to the archive's end are counted by it (they may be
    gone from the log), and a checkpoint before that end is not counted (its archive was
    verified against it)."""
    after, before = (archived.position, archived.events) if archived else (0, 0)
    return {
        c.seq: before + await events_up_to(conn, c.tenant_id, after, c.position)
        for c in checkpoints
        if c.seq in seqs and c.position >= after
    }


def problems(
    checkpoints: list[Checkpoint], own_rows: dict[int, tuple[int, bytes]], events: dict[int, int]
) -> list[Difference]:
    """What is wrong with the chain of `checkpoints`; for those in `own_rows` (seq -> their
    rows' count and digest as stored now, from a verification part), with their rows; for
    those in `events` (seq -> the events up to it now, event_counts), with that count."""
    out = [
        Difference("checkpoint", c.name, "chain", problem, "")
        for c, problem in cp.chain_problems(checkpoints)
    ]
    for c in checkpoints:
        if c.seq in own_rows and own_rows[c.seq] != (c.delta_rows, c.delta_digest):
            rows, digest = own_rows[c.seq]
            out.append(
                Difference(
                    "checkpoint", c.name, "rows", f"{rows} rows {digest.hex()[:16]}",
                    f"recorded {c.delta_rows} rows {c.delta_digest.hex()[:16]}",
                )
            )  # fmt: skip
        if c.seq in events and events[c.seq] != c.events:
            out.append(
                Difference(
                    "checkpoint", c.name, "events", str(events[c.seq]), f"recorded {c.events}"
                )
            )
    return out


@dataclass(frozen=True)
class Archived:
    """Where a tenant's last verified archive ends (ledger/postgres/archive.py): a
    verification of the live log starts there."""

    seq: int
    checkpoint_seq: int
    position: int
    events: int
    """The tenant's events up to `position` (its checkpoint's count)."""


async def archived(conn: Conn, tenant_id: str) -> Archived | None:
    """The tenant's last archive, if it has one."""
    cur = await conn.execute(
        "SELECT a.seq, a.checkpoint_seq, a.last_position, c.events FROM audit_archives a "
        "JOIN audit_checkpoints c ON c.tenant_id = a.tenant_id AND c.seq = a.checkpoint_seq "
        "WHERE a.tenant_id = %s ORDER BY a.seq DESC LIMIT 1",
        (tenant_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return Archived(row["seq"], row["checkpoint_seq"], row["last_position"], row["events"])


def state_differences(
    checkpoint: Checkpoint, rebuilt: dict[str, Digest] | None
) -> list[Difference]:
    """Where a checkpoint's recorded state differs from the log's at its position."""
    out = []
    for kind in cp.KINDS:
        mine = checkpoint.state[kind]
        theirs = (rebuilt or {}).get(kind, Digest())
        if (mine.rows, mine.total) != (theirs.rows, theirs.total):
            out.append(
                Difference(
                    "checkpoint", checkpoint.name, kind, _digest_text(mine), _digest_text(theirs)
                )
            )
    return out


def _digest_text(d: Digest) -> str:
    return f"{d.rows} rows, sum {d.to_json()['sum'][-16:]}"


def next_checkpoint(
    last: Checkpoint | None,
    tenant_id: str,
    position: int,
    events: int,
    changes: list[cp.Change],
    taken_at: datetime,
) -> tuple[Checkpoint, list[tuple[str, str, str | None]]]:
    """The checkpoint that follows `last` after `changes`, and its own rows."""
    state = {k: Digest(d.rows, d.total) for k, d in (last.state if last else {}).items()}
    for kind in cp.KINDS:
        state.setdefault(kind, Digest())
    rows = []
    for kind, key, old, new in changes:
        if old is not None:
            state[kind].add((kind, key, old), -1)
        if new is not None:
            state[kind].add((kind, key, new))
        rows.append((kind, key, new))
    made = Checkpoint(
        tenant_id=tenant_id,
        seq=(last.seq if last else 0) + 1,
        position=position,
        events=events,
        taken_at=taken_at,
        state=state,
        delta_rows=len(rows),
        delta_digest=cp.delta_digest(rows),
        prev_hash=last.hash if last else GENESIS_HASH,
    )
    return Checkpoint(**{**made.__dict__, "hash": made.expected_hash()}), rows


async def write(conn: Conn, c: Checkpoint, rows: list[tuple[str, str, str | None]]) -> None:
    """Insert the checkpoint and its rows (in the caller's transaction)."""
    await conn.execute(
        f"INSERT INTO audit_checkpoints ({_COLUMNS}) "  # noqa: S608
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            c.tenant_id, c.seq, c.position, c.events, c.taken_at, json.dumps(c.state_json()),
            c.delta_rows, c.delta_digest, c.prev_hash, c.hash,
        ),
    )  # fmt: skip
    copy_sql = "COPY audit_checkpoint_rows (tenant_id, seq, kind, key, value) FROM STDIN"
    async with conn.cursor() as cur, cur.copy(copy_sql) as copy:
        for kind, key, value in rows:
            await copy.write_row((c.tenant_id, c.seq, kind, key, value))


# The tenants due for a checkpoint. The tenants are found by a skip scan of the
# (tenant_id, position) index, one probe per tenant (a DISTINCT would read the whole log every
# time); the events since a tenant's last checkpoint are counted only up to n.
DUE_SQL = """
WITH RECURSIVE tenants AS (
    (SELECT tenant_id FROM events ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT e.tenant_id FROM events e WHERE e.tenant_id > t.tenant_id
            ORDER BY e.tenant_id LIMIT 1)
    FROM tenants t WHERE t.tenant_id IS NOT NULL
)
SELECT t.tenant_id
FROM tenants t
LEFT JOIN LATERAL (
    SELECT c.position, c.taken_at FROM audit_checkpoints c
    WHERE c.tenant_id = t.tenant_id ORDER BY c.seq DESC LIMIT 1
) last ON true
CROSS JOIN LATERAL (
    SELECT count(*) AS n FROM (
        SELECT 1 FROM events e
        WHERE e.tenant_id = t.tenant_id AND e.position > coalesce(last.position, 0)
        LIMIT greatest(%(n)s, 1)
    ) newer
) since
WHERE t.tenant_id IS NOT NULL AND since.n > 0
  AND ((%(n)s > 0 AND since.n >= %(n)s)
       OR (%(s)s > 0 AND coalesce(last.taken_at, '-infinity')
                         <= now() - make_interval(secs => %(s)s)))
ORDER BY t.tenant_id
"""
