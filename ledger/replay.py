"""Rebuild projections from the log, and check the hash chains: what an auditor relies on.

Both use the same evolve functions as the live store, so a difference between a rebuild and the
live tables means the log or the tables were changed outside the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ledger import codec
from ledger.domain import affected, evolve_account, evolve_reservation
from ledger.model import Account, AccountKey, Event, Reservation


@dataclass
class Projection:
    accounts: dict[AccountKey, Account] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)


def replay(events: Iterable[Event]) -> Projection:
    """Fold events (in log order) into accounts and reservations."""
    out = Projection()
    for event in events:
        for key in affected(event):
            out.accounts[key] = evolve_account(out.accounts.get(key, Account(key)), event)
        rid = getattr(event, "reservation_id", "")
        if rid:
            res = evolve_reservation(out.reservations.get(rid), event)
            assert res is not None
            out.reservations[rid] = res
    return out


@dataclass(frozen=True)
class ChainBreak:
    """The first event of a stream whose version or hash does not follow from its predecessor."""

    stream: AccountKey
    version: int
    problem: str


def chain_breaks(rows: Iterable[dict[str, Any]]) -> list[ChainBreak]:
    """Check each stream's rows (ordered by stream, then version): versions 1, 2, 3… without
    gaps, each prev_hash equal to the previous hash, each hash recomputed from the row."""
    breaks: list[ChainBreak] = []
    heads: dict[AccountKey, tuple[int, bytes]] = {}
    broken: set[AccountKey] = set()
    for row in rows:
        key = AccountKey(row["tenant_id"], row["user_id"], row["conversation_id"])
        if key in broken:
            continue
        version, head = heads.get(key, (0, codec.GENESIS_HASH))
        problem = ""
        if row["version"] != version + 1:
            problem = f"version {row['version']} follows {version}"
        elif bytes(row["prev_hash"]) != head:
            problem = "prev_hash is not the previous event's hash"
        elif codec.event_hash(codec.normalize_row(row), head) != bytes(row["hash"]):
            problem = "hash does not match the event's content"
        if problem:
            breaks.append(ChainBreak(key, row["version"], problem))
            broken.add(key)
        heads[key] = (row["version"], bytes(row["hash"]))
    return breaks
