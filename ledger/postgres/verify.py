"""VerifyAudit's work, cut into parts that run in worker processes.

Rebuilding projections is CPU work (every event is decoded, hashed and folded), so it must not
run on a server's event loop, where it would stall every Reserve for as long as a chunk takes.
A tenant is cut into parts that share nothing: each of `buckets` user parts takes the users
whose `hashtext(user_id)` falls in its bucket and checks everything of theirs (user and
conversation accounts, streams, reservations, usage, limiters); the tenant part reads every
event, because the tenant's own account and limiters add up all of them, and checks those and
the tenant's own streams. Every part imports one exported snapshot, so together they see
exactly the log and the projections that a single transaction would.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from ledger import codec
from ledger.model import Account, AccountKey, BalanceResult, RateLimit, RateLimitKey
from ledger.postgres.errors import translate
from ledger.postgres.rows import (
    ACCOUNT_COLUMNS,
    RATE_LIMIT_COLUMNS,
    RESERVATION_COLUMNS,
    account_from_row,
    account_key,
    rate_limit_from_row,
    reservation_from_row,
    scope_where,
)
from ledger.reads import DIFFERENCE_KINDS, Difference, Scope, VerifyReport
from ledger.replay import ChainVerifier, Projection
from ledger.usage import COUNTER_NAMES, UsageCounters, UsageKey, add_usage

SyncConn = psycopg.Connection[dict[str, Any]]

# The columns a check reads, with their types for a binary COPY (the fastest way to read).
_EVENT_TYPES = {"position": "bigint", **codec.EVENT_COLUMNS, **codec.CHAIN_COLUMNS}


@dataclass(frozen=True)
class Part:
    """One share of a verification: the tenant's own accounts (`tenant_level`), its users'
    (`users`), or both; with `buckets` > 1, only the users in `bucket`."""

    scope: Scope
    tenant_level: bool
    users: bool
    bucket: int = 0
    buckets: int = 1

    def keep(self, key: AccountKey) -> bool:
        """Whether this part checks the account (and streams, limiters) of `key`."""
        return self.users if key.user_id else self.tenant_level

    def events_where(self) -> tuple[str, tuple[Any, ...]]:
        """The events this part reads: all of the scope's when it checks the tenant's account
        (which sums them all), else only its users'."""
        where, params = scope_where(self.scope)
        return self._users_only(where, params) if not self.tenant_level else (where, params)

    def rows_where(self) -> tuple[str, tuple[Any, ...]]:
        """The projection rows this part compares."""
        where, params = scope_where(self.scope)
        if not self.users:
            return where + " AND user_id = ''", params
        return self._users_only(where, params) if not self.tenant_level else (where, params)

    def _users_only(self, where: str, params: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        where += " AND user_id <> ''"
        if self.buckets > 1:
            where += " AND (hashtext(user_id) & 2147483647) %% %s = %s"
            params += (self.buckets, self.bucket)
        return where, params


def plan(scope: Scope, workers: int) -> list[Part]:
    """The parts of a verification for `workers` processes, longest first. A user's scope is one
    part without the tenant's account (which needs the whole tenant's log)."""
    if scope.user_id:
        return [Part(scope, tenant_level=False, users=True)]
    if workers <= 1:
        return [Part(scope, tenant_level=True, users=True)]
    # The tenant part costs about a quarter of all the user parts together (one account per
    # event instead of two, no chains, usage or reservations); three buckets per worker keep
    # the workers evenly loaded behind it (bench: 5 equal parts on 2 workers took 3 rounds).
    buckets = 3 * workers
    return [
        Part(scope, tenant_level=True, users=False),
        *(Part(scope, False, True, bucket, buckets) for bucket in range(buckets)),
    ]


def merge(reports: list[VerifyReport]) -> VerifyReport:
    """One report from the parts' reports, in a stable order."""
    out = VerifyReport()
    for r in reports:
        out.events_checked += r.events_checked
        out.streams_checked += r.streams_checked
        out.breaks += r.breaks
        out.differences += r.differences
    out.breaks.sort(key=lambda b: (str(b.stream), b.version))
    out.differences.sort(key=lambda d: (DIFFERENCE_KINDS.index(d.kind), d.key, d.field))
    return out


# --- in a worker process ------------------------------------------------------------------


def worker_started() -> None:
    """A worker ignores Ctrl-C: the terminal sends it to the whole process group, and the
    server that owns the worker stops it (LedgerAudit.close)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check(conninfo: str, snapshot: str, part: Part) -> VerifyReport:
    """Verify one part on the exported `snapshot`: recompute its chains, rebuild its
    projections from the log in one pass in log order, and compare them with the live rows."""
    with _reading(conninfo, snapshot) as conn:
        report = VerifyReport()
        chains, rebuilt = ChainVerifier(), Projection(keep=part.keep)
        usage: dict[UsageKey, UsageCounters] = {}
        where, params = part.events_where()
        for row in _event_rows(conn, where, params):
            mine = part.keep(AccountKey(row["tenant_id"], row["user_id"]))
            if mine:
                chains.feed(row)
            try:  # a tampered row may not even decode; the chain check names it too
                event = codec.event_from_row(row)
            except (KeyError, ValueError, TypeError) as exc:
                if mine:
                    report.differences.append(
                        Difference("event", str(row["position"]), "*", "unreadable", repr(exc))
                    )
                continue
            rebuilt.feed(event)
            if mine:
                add_usage(usage, event)
        live = _Live.read(conn, *part.rows_where())
    report.events_checked, report.streams_checked = chains.checked, len(chains.heads)
    report.breaks = chains.breaks
    report.differences += _compare("account", live.accounts, rebuilt.accounts, str, Account)
    report.differences += _compare_streams(live.streams, chains.heads)
    report.differences += _compare(
        "reservation", live.reservations, rebuilt.reservations, lambda r: r
    )
    report.differences += _compare("usage", live.usage, usage, _usage_key_text)
    report.differences += _compare(
        "rate_limit", live.rate_limits, rebuilt.rate_limits, _rate_limit_key_text
    )
    return report


def balance_at(conninfo: str, key: AccountKey, as_of: datetime) -> BalanceResult:
    """The balance of `key` and its ancestors as it stood at `as_of`, folded from the log."""
    lineage = key.lineage()
    projection = Projection(keep=lineage.__contains__)
    with _reading(conninfo, None) as conn:
        where, params = scope_where(Scope(key.tenant_id))
        for row in _event_rows(conn, where + " AND occurred_at <= %s", (*params, as_of)):
            projection.feed(codec.event_from_row(row))
    accounts = [projection.accounts.get(k, Account(k)).rolled(as_of) for k in lineage]
    return BalanceResult(balance=accounts[-1], ancestors=tuple(accounts[:-1]))


@contextmanager
def _reading(conninfo: str, snapshot: str | None) -> Iterator[SyncConn]:
    """A read-only repeatable-read transaction, on `snapshot` when given. Database errors
    leave as StoreUnavailable or RuntimeError: a worker's exceptions cross a process boundary,
    and psycopg's do not survive pickling."""
    try:
        with psycopg.connect(conninfo, row_factory=dict_row) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            if snapshot:  # SET takes no parameters: the id is quoted as a literal
                set_snapshot = sql.SQL("SET TRANSACTION SNAPSHOT {}").format(snapshot)
                conn.execute(set_snapshot)
            yield conn
    except psycopg.Error as exc:
        raise _portable(exc) from None


def _portable(exc: psycopg.Error) -> Exception:
    kind = type(translate(exc))
    if kind is type(exc):
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return kind(f"the database cannot be read: {exc}")


def _event_rows(conn: SyncConn, where: str, params: tuple[Any, ...]) -> Iterator[dict[str, Any]]:
    """Event rows in log order, streamed by a binary COPY."""
    names = tuple(_EVENT_TYPES)
    query = f"COPY (SELECT {', '.join(names)} FROM events WHERE {where} ORDER BY position) "  # noqa: S608
    with conn.cursor() as cur, cur.copy(query + "TO STDOUT (FORMAT BINARY)", params) as copy:
        copy.set_types(list(_EVENT_TYPES.values()))
        for values in copy.rows():
            yield dict(zip(names, values, strict=True))


@dataclass
class _Live:
    accounts: dict[AccountKey, Account] = field(default_factory=dict)
    streams: dict[AccountKey, tuple[int, bytes]] = field(default_factory=dict)
    reservations: dict[str, Any] = field(default_factory=dict)
    usage: dict[UsageKey, UsageCounters] = field(default_factory=dict)
    rate_limits: dict[RateLimitKey, RateLimit] = field(default_factory=dict)

    @classmethod
    def read(cls, conn: SyncConn, where: str, params: tuple[Any, ...]) -> _Live:
        """The live projection rows selected by `where`."""
        out = cls()

        def rows(columns: str, table: str) -> Iterator[dict[str, Any]]:
            query = f"SELECT {columns} FROM {table} WHERE {where}"  # noqa: S608
            return conn.execute(query, params)

        for row in rows(ACCOUNT_COLUMNS, "accounts"):
            out.accounts[account_key(row)] = account_from_row(row)
            out.streams[account_key(row)] = (row["stream_version"], bytes(row["head_hash"]))
        for row in rows(RESERVATION_COLUMNS, "reservations"):
            out.reservations[row["reservation_id"]] = reservation_from_row(row)
        for row in rows(RATE_LIMIT_COLUMNS, "rate_limits"):
            rl = rate_limit_from_row(row)
            out.rate_limits[rl.key] = rl
        for row in rows("*", "usage_hourly"):
            key = UsageKey(
                row["tenant_id"], row["hour"], row["user_id"], row["conversation_id"],
                row["model"],
            )  # fmt: skip
            out.usage[key] = UsageCounters(**{c: row[c] for c in COUNTER_NAMES})
        return out


def _usage_key_text(key: UsageKey) -> str:
    return f"{key.tenant_id}/{key.user_id}/{key.conversation_id}@{key.hour.isoformat()}:{key.model}"


def _rate_limit_key_text(key: RateLimitKey) -> str:
    return f"{key.account}:{key.model or '*'}"


def _compare_streams(
    live: dict[AccountKey, tuple[int, bytes]], heads: dict[AccountKey, tuple[int, bytes]]
) -> list[Difference]:
    out = []
    for key in live.keys() | heads.keys():
        a, b = live.get(key, (0, codec.GENESIS_HASH)), heads.get(key, (0, codec.GENESIS_HASH))
        if a != b:
            out.append(
                Difference(
                    "stream", str(key), "head", f"{a[0]}:{a[1].hex()}", f"{b[0]}:{b[1].hex()}"
                )
            )
    return out


def _compare(
    kind: str,
    live: dict[Any, Any],
    rebuilt: dict[Any, Any],
    name: Callable[[Any], str],
    default: Callable[[Any], Any] | None = None,
) -> list[Difference]:
    """Field by field differences between two maps of dataclasses. With `default`, a key
    missing on one side compares with default(key): an account row exists once anything was
    written for it, and one with no events equals a new one."""
    out = []
    for key in live.keys() | rebuilt.keys():
        a = live.get(key) or (default(key) if default else None)
        b = rebuilt.get(key) or (default(key) if default else None)
        if a == b:
            continue
        if a is None or b is None:
            out.append(Difference(kind, name(key), "*", _text(a), _text(b)))
            continue
        for f in fields(a):
            if not f.compare:  # derived from the time of reading, not state
                continue
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                out.append(Difference(kind, name(key), f.name, _text(va), _text(vb)))
    return out


def _text(value: Any) -> str:
    return "(missing)" if value is None else str(value)
