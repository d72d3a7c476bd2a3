"""Values of the read side: scopes, usage queries and rows, logged events, verification and
rebuild reports. Pure: validation and the servers' conversion use them without any I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger.checkpoints import Change, Digest
from ledger.model import AccountKey, Usage
from ledger.replay import ChainBreak
from ledger.usage import UsageCounters


@dataclass(frozen=True)
class Scope:
    """A tenant, one user of it, or one conversation of that user."""

    tenant_id: str
    user_id: str = ""
    conversation_id: str = ""


@dataclass(frozen=True)
class UsageQuery:
    tenant_id: str
    from_time: datetime
    to_time: datetime
    group_by: tuple[str, ...] = ()  # of GROUP_NAMES
    user_id: str = ""
    conversation_id: str = ""
    model: str = ""
    time_zone: str = "UTC"  # of DAY groups


@dataclass(frozen=True)
class OutputStatsQuery:
    """Output tokens of recent calls of a model: the user's, or the tenant's when the user
    has fewer than `min_samples` (an empty user_id asks for the tenant's directly)."""

    tenant_id: str
    user_id: str
    model: str
    window_hours: int
    min_samples: int


OUTPUT_STATS_SCOPES = ("user", "tenant", "none")
"""Whose calls the figures are of; "none": not even the tenant had min_samples (the figures
are the tenant's few, for what they are worth)."""


@dataclass(frozen=True)
class OutputStats:
    scope: str  # of OUTPUT_STATS_SCOPES
    samples: int
    p50: int
    p95: int
    max: int
    user_samples: int
    """The user's own calls in the window (also when the tenant's figures were used)."""


GROUP_NAMES = ("user", "conversation", "model", "day", "hour")
"""What usage can be grouped by."""


@dataclass(frozen=True)
class UsageRow:
    user_id: str
    conversation_id: str
    model: str
    period_start: datetime | None
    counters: UsageCounters


@dataclass(frozen=True)
class LoggedEvent:
    """One event as the log holds it: its stored fields, and what the database assigned
    (position, recorded_at, the writing transaction's id)."""

    position: int
    key: AccountKey
    version: int
    event_type: str
    occurred_at: datetime
    recorded_at: datetime
    model: str
    reservation_id: str
    amount: int
    usage: Usage
    idempotency_key: str
    actor: str
    trace_id: str
    data: dict[str, Any]
    transaction_id: int
    prev_hash: bytes
    hash: bytes


DIFFERENCE_KINDS = (
    "checkpoint", "event", "account", "stream", "reservation", "usage", "rate_limit", "price",
)  # fmt: skip


@dataclass(frozen=True)
class Difference:
    kind: str  # one of DIFFERENCE_KINDS
    key: str
    field: str
    live: str
    rebuilt: str


@dataclass
class VerifyReport:
    events_checked: int = 0
    streams_checked: int = 0
    breaks: list[ChainBreak] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    from_checkpoint: int = 0
    """The seq of the checkpoint an incremental verification started from; 0: the whole log."""
    from_position: int = 0
    """The position of that checkpoint: only events after it were read."""
    checkpoints_checked: int = 0
    """Checkpoints whose chain (and, in a full verification, state) were checked."""
    sums: dict[int, dict[str, Digest]] = field(default_factory=dict)
    """A part's digests of its state at each checkpoint it passed (merged by the caller)."""
    own_rows: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    """Checkpoint seq -> how many rows it has in audit_checkpoint_rows now, and their digest."""
    changes: list[Change] = field(default_factory=list)
    """The state items that changed since the checkpoint started from (for the next one)."""


@dataclass(frozen=True)
class RebuildReport:
    """What a rebuild replayed and wrote."""

    events: int
    events_under_lock: int  # appended while the log was folded, folded holding the lock
    lock_held_s: float  # how long the tenant's writers waited for the rebuild (at most)
    accounts: int
    reservations: int
    usage_rows: int
    rate_limits: int
