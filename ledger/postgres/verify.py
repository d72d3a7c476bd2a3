"""VerifyAudit's work, cut into parts that run in worker processes.

Rebuilding projections is CPU work (every event is decoded, hashed and folded), so it must not
run on a server's event loop, where it would stall every Reserve for as long as a chunk takes.
A tenant is cut into parts that share nothing: each of `buckets` user parts takes the users
whose `hashtext(user_id)` falls in its bucket and checks everything of theirs (user and
conversation accounts, streams, reservations, usage, limiters), and hands over what its events
did to the tenant's own account and limiters (replay.Effects: a few integers an event); the
tenant part, run after them, reads only the tenant's own events, checks their streams, and
folds them with the effects in log order (replay.EffectFold), so no row is read or decoded
twice. Every part imports one exported snapshot, so together they see exactly the log and the
projections that a single transaction would.

The design before the handoff, where the tenant part read and decoded every event of the
tenant again, rows were hashed and their JSON read by the reference codec alone, and events
folded by the domain's reference functions (not its quick path, which the parts of a handoff
use: replay.QuickProjection) with Python's cycle collector on (_collector_paused), is kept as
`Part.before_handoff` (LedgerAudit's
`before_handoff`): only the bench, which measures both side by side, and the tests that
prove both report the same use it.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from operator import attrgetter
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import set_json_loads

from ledger import archive, codec
from ledger import checkpoints as cp
from ledger.checkpoints import KINDS, Digest
from ledger.domain import rate_limit_keys
from ledger.model import (
    Account,
    AccountKey,
    BalanceResult,
    Event,
    RateLimit,
    RateLimitKey,
    RateLimitSet,
    Reservation,
    TokensReserved,
)
from ledger.money import PricePoint
from ledger.postgres.errors import translate
from ledger.postgres.rows import (
    ACCOUNT_COLUMNS,
    RATE_LIMIT_COLUMNS,
    RESERVATION_COLUMNS,
    account_from_row,
    price_from_row,
    rate_limit_from_row,
    reservation_from_row,
    scope_where,
)
from ledger.reads import DIFFERENCE_KINDS, Difference, Scope, VerifyReport
from ledger.replay import ChainVerifier, EffectFold, Effects, Projection, QuickProjection
from ledger.usage import (
    COUNTER_NAMES,
    UsageCounters,
    UsageKey,
    add_usage,
    quick_add_usage,
)

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
    since_seq: int = 0
    """Start from this checkpoint's state: read only the events after `since`."""
    seeded: tuple[str, ...] = KINDS
    """The kinds of state that checkpoint has rows of: a key of another kind is not looked
    up there (it starts absent, as it would if looked up)."""
    since: int = 0
    until: int = 0
    """Read events up to this position only (0: all of them)."""
    passes: tuple[tuple[int, int], ...] = ()
    """(seq, position) of the checkpoints whose state this part sums on its way."""
    collect: bool = False
    """Return the state items that changed since the checkpoint (for the next one)."""
    own_rows: tuple[int, ...] = ()
    """The checkpoints whose own rows this part counts and digests (one part does)."""
    base: tuple[int, int] = (0, 0)
    """(archive seq, its checkpoint's seq): the events up to `since` were archived; start
    from the stream heads the archive recorded and the whole state at its checkpoint."""
    before_handoff: bool = False
    """Verify by the design before the handoff (see the module's doc), for the bench: the
    tenant part reads every event itself, by the reference codec."""

    @property
    def handoff(self) -> bool:
        """Whether the part is in a handoff: a user part of a tenant's plan hands its
        events' effects on the tenant's account over (check_users), and the tenant part
        reads only the tenant's own events and folds those effects."""
        split = self.tenant_level != self.users and not self.scope.user_id
        return split and not self.before_handoff

    def in_scope(self, key: AccountKey) -> bool:
        """Whether `key` is the part's and its scope's (for state read from a checkpoint)."""
        s = self.scope
        return self.keep(key) and (not s.user_id or key.user_id == s.user_id) and (
            not s.conversation_id or key.conversation_id == s.conversation_id)  # fmt: skip

    def keep(self, key: AccountKey) -> bool:
        """Whether this part checks the account (and streams, limiters) of `key`."""
        return self.users if key.user_id else self.tenant_level

    def events_where(self) -> tuple[str, tuple[Any, ...]]:
        """The events this part reads: all of the scope's when it checks the tenant's account
        (which sums them all), else only its users'."""
        where, params = scope_where(self.scope)
        if self.since:
            where, params = where + " AND position > %s", (*params, self.since)
        if self.until:
            where, params = where + " AND position <= %s", (*params, self.until)
        if self.tenant_level and not self.users and self.handoff:
            return where + " AND user_id = ''", params
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


def plan(scope: Scope, workers: int, own_rows: tuple[int, ...] = (), **options: Any) -> list[Part]:
    """`plan_parts`, with the digests of the `own_rows` checkpoints' rows given to the last
    part (they are CPU work too, kept off the caller's event loop; the first part, the
    tenant's, is the longest already)."""
    parts = plan_parts(scope, workers, **options)
    parts[-1] = replace(parts[-1], own_rows=own_rows)
    return parts


def plan_parts(scope: Scope, workers: int, **options: Any) -> list[Part]:
    """The parts of a verification for `workers` processes, the tenant's first. A user's scope
    is one part without the tenant's account (which needs the whole tenant's log). `options`
    are Part's checkpoint fields (and `before_handoff`), the same for every part. The tenant
    part folds the user parts' effects, so it runs after them (LedgerAudit._run_parts)."""
    if scope.user_id:
        return [Part(scope, tenant_level=False, users=True, **options)]
    if workers <= 1:
        return [Part(scope, tenant_level=True, users=True, **options)]
    # Three buckets per worker keep the workers evenly loaded on a machine others share, and
    # the last round short (the tenant part waits for it); before the handoff, the tenant part
    # cost about a quarter of all the user parts together, and the buckets balanced behind it
    # (bench: 5 equal parts on 2 workers took 3 rounds). From a checkpoint, a part's fixed
    # costs (its queries for the keys it touched) outweigh its share of the few events: one
    # bucket per worker.
    buckets = workers if options.get("since_seq") else 3 * workers
    return [
        Part(scope, tenant_level=True, users=False, **options),
        *(Part(scope, False, True, bucket, buckets, **options) for bucket in range(buckets)),
    ]


def merge(reports: list[VerifyReport]) -> VerifyReport:
    """One report from the parts' reports, in a stable order."""
    out = VerifyReport()
    for r in reports:
        out.events_checked += r.events_checked
        out.streams_checked += r.streams_checked
        out.breaks += r.breaks
        out.differences += r.differences
        out.changes += r.changes
        out.own_rows |= r.own_rows
        for seq, sums in r.sums.items():
            mine = out.sums.setdefault(seq, {kind: Digest() for kind in KINDS})
            for kind, digest in sums.items():
                mine[kind].merge(digest)
    out.breaks.sort(key=lambda b: (str(b.stream), b.version))
    out.differences.sort(key=lambda d: (DIFFERENCE_KINDS.index(d.kind), d.key, d.field))
    return out


# --- in a worker process ------------------------------------------------------------------

CHUNK_ROWS = 20_000
"""Rows decoded at a time: from a checkpoint, the keys they touch are read in one query."""


def worker_started(server: int) -> None:
    """A worker ignores Ctrl-C: the terminal sends it to the whole process group, and the
    `server` process that owns the worker stops it (LedgerAudit.close). A server killed
    outright (SIGKILL, out of memory) stops nothing, and its workers, which are the fork
    server's children and not its own, would wait for work for ever: a worker ends as soon
    as its server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(server,), name="server-watch", daemon=True).start()


def _end_with(server: int) -> None:
    try:
        gone = os.pidfd_open(server)  # readable once the process has ended
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd here (not Linux 5.3+): ask once a second
        while _alive(server):
            time.sleep(1)
    else:
        select.select([gone], [], [])
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def check(
    conninfo: str,
    snapshot: str,
    part: Part,
    chunk_rows: int = CHUNK_ROWS,
    effects: list[Effects] | None = None,
) -> VerifyReport:
    """Verify one part on the exported `snapshot`: recompute its chains, rebuild its
    projections from the log in one pass in log order, and compare them with the live rows.
    From a checkpoint (`part.since_seq`), only the events after it are read, each key they
    touch starts from its state at the checkpoint, and only those keys are compared. The
    tenant part of a handoff folds the user parts' `effects` with its own events."""
    return _check(conninfo, snapshot, part, chunk_rows, effects)[0]


def check_users(
    conninfo: str, snapshot: str, part: Part, chunk_rows: int = CHUNK_ROWS
) -> tuple[VerifyReport, Effects]:
    """`check` of a user part of a handoff, with the effects of its events on the tenant's
    account and limiters."""
    report, effects = _check(conninfo, snapshot, part, chunk_rows, None)
    assert effects is not None, "only a user part of a handoff has effects"
    return report, effects


def _check(
    conninfo: str,
    snapshot: str,
    part: Part,
    chunk_rows: int,
    effects: list[Effects] | None,
) -> tuple[VerifyReport, Effects | None]:
    fast = not part.before_handoff
    with _reading(conninfo, snapshot, fast) as conn, ExitStack() as more:
        if fast:
            more.enter_context(_collector_paused())
        # The checkpoint's state is read while the COPY streams, so on a second connection
        # on the same snapshot: one connection cannot run a query in the middle of a COPY.
        seeds = more.enter_context(_reading(conninfo, snapshot, fast)) if part.since_seq else conn
        fold = _Fold(part)
        if part.base[0]:
            fold.seed_all(conn)
        if effects is not None:
            fold.take(seeds, effects)
        rows: list[dict[str, Any]] = []
        for row in _event_rows(conn, *part.events_where()):
            rows.append(row)
            if len(rows) == chunk_rows:
                fold.feed(seeds, rows)
                rows = []
        fold.feed(seeds, rows)
        fold.finish(seeds)
        own_rows = {seq: _own_rows(conn, part.scope.tenant_id, seq) for seq in part.own_rows}
        if part.since_seq:
            live = _Live.read(conn, fold.touched.where(part.scope.tenant_id, fold.usage))
        else:
            live = _Live.read(conn, _same(*part.rows_where()))
        if _checks_prices(part):
            live.prices = _live_prices(conn, part.scope.tenant_id)
    report = fold.report_against(live)
    report.own_rows = own_rows
    return report, fold.effects


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a part runs. A part allocates an object or more
    an event and keeps most of them (the state it rebuilds), so the collector's passes kept
    walking ever more live objects: a quarter of a part's time on the bench, for nothing, as
    what a part makes holds no reference cycle and reference counting frees it
    (test_verify_parts.py: after a part, the collector finds nothing). The design before the
    handoff (Part.before_handoff) ran with it on."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _checks_prices(part: Part) -> bool:
    """Whether the part compares the tenant's prices: the tenant's part of a whole-log
    verification, which folds every PriceSet (checkpoints and archives keep no prices)."""
    return part.tenant_level and not (part.since_seq or part.base[0] or part.scope.user_id)


def _live_prices(conn: SyncConn, tenant_id: str) -> dict[tuple[str, datetime], PricePoint]:
    rows = conn.execute(_PRICES_SQL, (tenant_id,)).fetchall()
    return {(p.model, p.effective_from): p for p in map(price_from_row, rows)}


_PRICES_SQL = """SELECT model, effective_from, currency, input_per_mtok, output_per_mtok,
       cached_input_per_mtok FROM prices WHERE tenant_id = %s"""


def _own_rows(conn: SyncConn, tenant_id: str, seq: int) -> tuple[int, bytes]:
    """How many rows a checkpoint has now, and their digest (checkpoints.delta_digest): the
    database writes and orders the lines (_OWN_LINES_SQL), streamed here to be hashed."""
    h, rows = hashlib.sha256(), 0
    with conn.cursor() as cur, cur.copy(_OWN_LINES_SQL, (tenant_id, seq)) as copy:
        copy.set_types(["bytea"])
        for (line,) in copy.rows():
            h.update(line)
            rows += 1
    return rows, h.digest()


# checkpoints.delta_digest's lines, written by PostgreSQL: to_json of a text escapes exactly
# what json.dumps does with ensure_ascii=False (", \, and the control characters, those
# without a short escape as \u00xx in lower case), and the "C" collation orders by byte,
# which in UTF-8 is the order of code points. tests/integration/test_own_rows_digest.py holds
# the digest equal to delta_digest's on random texts.
_OWN_LINES_SQL = """COPY (
    SELECT convert_to('[' || to_json(kind)::text || ',' || to_json(key)::text || ','
                      || coalesce(to_json(value)::text, 'null') || E']\n', 'UTF8')
    FROM audit_checkpoint_rows WHERE tenant_id = %s AND seq = %s
    ORDER BY kind COLLATE "C", key COLLATE "C"
) TO STDOUT (FORMAT BINARY)"""


def _same(where: str, params: tuple[Any, ...]) -> Callable[[str], tuple[str, tuple[Any, ...]]]:
    return lambda table: (where, params)


def _json(keys: list[Any]) -> str:
    """The keys a query asks for, as one JSON document of lists (one call to write; an array
    parameter costs a call an element)."""
    return orjson.dumps(keys).decode()


@dataclass
class _Touched:
    """The keys that the events read touched (from a checkpoint: all that may have changed)."""

    streams: set[AccountKey] = field(default_factory=set)
    accounts: set[AccountKey] = field(default_factory=set)
    reservations: set[str] = field(default_factory=set)
    rate_limits: set[RateLimitKey] = field(default_factory=set)
    seen: set[tuple[Any, ...]] = field(default_factory=set)
    """Streams, and (stream, type, model) of events with limiters, already added."""
    pending: list[tuple[str, Any, Callable[[Any], str]]] = field(default_factory=list)
    """(kind, key, its text's function) of each key touched since take_pending."""

    def add(self, part: Part, row: dict[str, Any], event: Event | None) -> None:
        stream = (row["tenant_id"], row["user_id"], row["conversation_id"])
        if stream not in self.seen:  # an event changes at most its stream's lineage
            self.seen.add(stream)
            key = AccountKey(*stream)
            if part.keep(key):
                self._new("stream", self.streams, key, cp.account_key_text)
            for k in key.lineage():
                if part.keep(k):
                    self._new("account", self.accounts, k, cp.account_key_text)
        if event is None:
            return
        # Only these have limiters, the same for every event of a stream, type and model.
        if isinstance(event, TokensReserved | RateLimitSet):
            limiters = (stream, type(event), event.model)
            if limiters not in self.seen:
                self.seen.add(limiters)
                for rk in rate_limit_keys(event):
                    if part.keep(rk.account):
                        self._new("rate_limit", self.rate_limits, rk, cp.rate_limit_key_text)
        if part.users if stream[1] else part.tenant_level:  # keep(event.key)
            rid = getattr(event, "reservation_id", "")
            if rid and type(event) is TokensReserved and not part.collect:
                # A hold makes its reservation anew, whatever it was at the checkpoint; only
                # a fold collecting changes needs to know (the change's old value).
                self.reservations.add(rid)
            elif rid:
                self._new("reservation", self.reservations, rid, str)

    def _new(self, kind: str, keys: set[Any], key: Any, text: Callable[[Any], str]) -> None:
        if key not in keys:
            keys.add(key)
            self.pending.append((kind, key, text))

    def take_pending(self) -> list[tuple[str, Any, Callable[[Any], str]]]:
        """(kind, key, its text's function) for every key touched since the last call."""
        out, self.pending = self.pending, []
        return out

    def where(
        self, tenant_id: str, usage: Iterable[UsageKey]
    ) -> Callable[[str], tuple[str, tuple[Any, ...]]]:
        """The live rows of the touched keys (and of the `usage` hours), table by table. Each
        table's keys go as one JSON document: a parameter that costs one call to write, where
        an array costs a call per element."""
        accounts, limits = self.accounts | self.streams, self.rate_limits
        by_table: dict[str, tuple[str, list[Any]]] = {
            "accounts": (
                "(user_id, conversation_id) IN "
                "(SELECT k->>0, k->>1 FROM json_array_elements(%s::json) AS k)",
                [(k.user_id, k.conversation_id) for k in accounts],
            ),
            "reservations": (
                "reservation_id IN (SELECT k->>0 FROM json_array_elements(%s::json) AS k)",
                [(r,) for r in self.reservations],
            ),
            "rate_limits": (
                "(user_id, conversation_id, model) IN "
                "(SELECT k->>0, k->>1, k->>2 FROM json_array_elements(%s::json) AS k)",
                [(k.account.user_id, k.account.conversation_id, k.model) for k in limits],
            ),
            "usage_hourly": (
                "(hour, user_id, conversation_id, model) IN "
                "(SELECT (k->>0)::timestamptz, k->>1, k->>2, k->>3 "
                "FROM json_array_elements(%s::json) AS k)",
                [(k.hour, k.user_id, k.conversation_id, k.model) for k in usage],
            ),
        }  # fmt: skip

        def where(table: str) -> tuple[str, tuple[Any, ...]]:
            clause, keys = by_table[table]
            return "tenant_id = %s AND " + clause, (tenant_id, _json(keys))

        return where


class _Fold:
    """One part's rebuild: chains, projections and usage, fed chunk by chunk in log order."""

    def __init__(self, part: Part) -> None:
        self.part = part
        # The design before the handoff folds by the reference functions alone.
        quick = not part.before_handoff
        self.chains = ChainVerifier(quick)
        self.rebuilt = (QuickProjection if quick else Projection)(keep=part.keep)
        self.add_usage = quick_add_usage if quick else add_usage
        self.usage: dict[UsageKey, UsageCounters] = {}
        self.unreadable: list[Difference] = []
        self.touched = _Touched()
        self.old: dict[tuple[str, str], str | None] = {}
        """From a checkpoint, collecting changes: each touched key's value there (None: none)."""
        self.passes = list(part.passes)
        self.sums: dict[int, dict[str, Digest]] = {}
        self.running = cp.RunningDigests()
        """The state's digests at each checkpoint passed, each hashing what changed since."""
        self.effects = Effects() if part.handoff and part.users else None
        """A user part's effects on the tenant's account, for the tenant part."""
        self.handed: EffectFold | None = None
        """The tenant part's: the user parts' effects, fed in log order with its own events."""

    def take(self, conn: SyncConn, effects: list[Effects]) -> None:
        """Fold the user parts' `effects` with this (tenant) part's events. From a
        checkpoint, first seed what they touch, as reading their rows would: the tenant's
        account (any user's row touches it) and its limiters of each model held."""
        self.handed = EffectFold(self.rebuilt, self.part.scope.tenant_id, effects)
        if not self.part.since_seq:
            return
        row = {"tenant_id": self.part.scope.tenant_id, "user_id": "*", "conversation_id": ""}
        if any(e.rows for e in effects):
            self.touched.add(self.part, row, None)
        for model in self.handed.touched_models():
            self.touched.add(self.part, row, self.handed.hold(model))
        self._seed(conn)

    def _hand_until(self, position: int | None) -> None:
        """Feed the handed effects before `position` (None: all), taking each checkpoint's
        digests on the way."""
        handed = self.handed
        if handed is None:
            return
        while (next_at := handed.peek()) is not None and (position is None or next_at < position):
            if self.passes and next_at > self.passes[0][1]:
                self._pass()
                continue
            limit = self.passes[0][1] + 1 if self.passes else None
            if position is not None:
                limit = position if limit is None else min(limit, position)
            handed.feed_until(limit)

    def feed(self, conn: SyncConn, rows: list[dict[str, Any]]) -> None:
        decoded = [(row, self._decode(row)) for row in rows]
        if self.part.since_seq:
            for row, event in decoded:
                self.touched.add(self.part, row, event)
            self._seed(conn)
        users, tenant_level, effects = self.part.users, self.part.tenant_level, self.effects
        if effects is not None:
            effects.rows += len(decoded)
        for row, event in decoded:
            self._hand_until(row["position"])
            while self.passes and row["position"] > self.passes[0][1]:
                self._pass()
            mine = users if row["user_id"] else tenant_level  # keep(), without making a key
            if mine:
                self.chains.feed(row)
            if event is not None:
                self.rebuilt.feed(event)
                if mine:
                    self.add_usage(self.usage, event)
                if effects is not None:
                    effects.add(row["position"], event)

    def _decode(self, row: dict[str, Any]) -> Event | None:
        try:  # a tampered row may not even decode; the chain check names it too
            return codec.event_from_row(row)
        except (KeyError, ValueError, TypeError) as exc:
            if self.part.keep(AccountKey(row["tenant_id"], row["user_id"])):
                self.unreadable.append(
                    Difference("event", str(row["position"]), "*", "unreadable", repr(exc))
                )
            return None

    def _seed(self, conn: SyncConn) -> None:
        """Start each newly touched key from its value at the checkpoint. A key's text is
        made only to look it up (a kind the checkpoint has rows of) or to record its old
        value (collecting the changes for the next checkpoint)."""
        seeded, collect = self.part.seeded, self.part.collect
        new = [
            ((kind, text(key)), key)
            for kind, key, text in self.touched.take_pending()
            if collect or kind in seeded
        ]
        found = self._state_at(conn, [text for text, _ in new if text[0] in seeded])
        for text, key in new:
            value = found.get(text)
            if collect:
                self.old[text] = value
            if value is not None:
                self._install(text[0], key, value)

    def _state_at(self, conn: SyncConn, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The values at the checkpoint of these (kind, key text)s that have one."""
        if not keys:
            return {}
        params = (_json(keys), self.part.scope.tenant_id, self.part.since_seq)
        return {(r["kind"], r["key"]): r["value"] for r in conn.execute(_STATE_AT_SQL, params)}

    def _seed_usage(self, conn: SyncConn) -> None:
        """From a checkpoint, add each usage hour's counters there to what the events after
        it added: counters only add up, so unlike the other kinds of state, a usage hour's
        is looked up after the fold, with no need to know the hours the events touch first."""
        texts = {("usage", cp.usage_key_text(key)): key for key in self.usage}
        found = self._state_at(conn, list(texts) if "usage" in self.part.seeded else [])
        for text, key in texts.items():
            value = found.get(text)
            if self.part.collect:
                self.old[text] = value
            if value is not None:
                self.usage[key].add(cp.parse_usage(value))

    def seed_all(self, conn: SyncConn) -> None:
        """Start from an archive's end: its stream heads, and the whole state of the part's
        share of the scope at its checkpoint."""
        archive_seq, checkpoint_seq = self.part.base
        part = self.part
        params = {"tenant": part.scope.tenant_id, "buckets": part.buckets, "bucket": part.bucket}
        for row in conn.execute(_ARCHIVE_HEADS_SQL, params | {"seq": archive_seq}):
            key = archive.stream_key(row["key"])
            if part.in_scope(key):
                self.chains.heads[key] = cp.parse_stream(row["value"])
        for r in conn.execute(_STATE_ALL_SQL, params | {"seq": checkpoint_seq}):
            key, owner = cp.parse_key(r["kind"], r["key"], r["value"])
            if part.in_scope(owner):
                self._install(r["kind"], key, r["value"])

    def _install(self, kind: str, key: Any, value: str) -> None:
        if kind == "stream":
            self.chains.heads[key] = cp.parse_stream(value)
        elif kind == "account":
            self.rebuilt.seed(cp.parse_account(value))
        elif kind == "reservation":
            self.rebuilt.reservations[key] = cp.parse_reservation(value)
        elif kind == "usage":
            self.usage[key] = cp.parse_usage(value)
        else:
            self.rebuilt.rate_limits[key] = cp.parse_rate_limit(key, value)

    def _sources(self) -> tuple[cp.Source, ...]:
        """This part's rebuilt state, kind by kind, as checkpoints reads it."""
        rebuilt = self.rebuilt
        return (
            cp.Source("stream", self.chains.heads, cp.stream_item),
            cp.Source("account", rebuilt.accounts, lambda _, a: cp.account_item(a)),
            cp.Source("reservation", rebuilt.reservations, lambda _, r: cp.reservation_item(r)),
            cp.Source("usage", self.usage, cp.usage_item, _same_counters, copy.copy),
            cp.Source("rate_limit", rebuilt.rate_limits, lambda _, rl: cp.rate_limit_item(rl)),
        )  # fmt: skip

    def items(self) -> Iterator[cp.Item]:
        """Every item of this part's rebuilt state."""
        for source in self._sources():
            yield from (source.item_of(k, v) for k, v in source.values.items())

    def _pass(self) -> None:
        seq, _ = self.passes.pop(0)
        self.sums[seq] = self.running.take(self._sources())

    def finish(self, conn: SyncConn) -> None:
        """After the last event: the handed effects left, the checkpoints left to pass, and
        from a checkpoint, the usage hours' counters there."""
        self._hand_until(None)
        while self.passes:
            self._pass()
        if self.part.since_seq:
            self._seed_usage(conn)

    def changes(self) -> list[cp.Change]:
        """The items that differ from the checkpoint's (all of them, from none)."""
        if not self.part.since_seq:
            return [(kind, key, None, value) for kind, key, value in self.items()]
        now = {(kind, key): value for kind, key, value in self.items()}
        out: list[cp.Change] = []
        for text, old in self.old.items():
            new = now.get(text)
            if new != old:
                out.append((*text, old, new))
        return out

    def report_against(self, live: _Live) -> VerifyReport:
        report = VerifyReport(breaks=self.chains.breaks, differences=self.unreadable)
        report.events_checked, report.streams_checked = (
            self.chains.checked,
            len(self.touched.streams),
        )
        if not self.part.since_seq:
            report.streams_checked = len(self.chains.heads)
        rebuilt, usage, heads = self.rebuilt, self.usage, self.chains.heads
        if self.part.since_seq:  # only the touched keys: the others were not read
            t = self.touched
            heads = {k: v for k, v in heads.items() if k in t.streams}
            live.streams = {k: v for k, v in live.streams.items() if k in t.streams}
            live.accounts = {k: v for k, v in live.accounts.items() if k in t.accounts}
        diff = report.differences
        old = self.part.before_handoff
        diff += _compare_rows(_ACCOUNTS, live.accounts, rebuilt.accounts, old)
        diff += _compare_streams(live.streams, heads)
        diff += _compare_rows(_RESERVATIONS, live.reservations, rebuilt.reservations, old)
        diff += _compare_rows(_USAGE, live.usage, usage, old)
        diff += _compare("rate_limit", live.rate_limits, rebuilt.rate_limits, _rate_limit_key_text)
        if _checks_prices(self.part):
            diff += _compare("price", live.prices, rebuilt.prices, _price_key_text)
        report.sums = self.sums
        if self.part.collect:
            report.changes = self.changes()
        return report


# The state at a checkpoint of the given keys: per key, its row of the highest seq up to it,
# found by one probe of the primary key each. (A join of the keys with the table let the
# planner hash the table's every row: a cost in proportion to the whole state, not to the
# keys asked for.)
_STATE_AT_SQL = """
SELECT t.kind, t.key, r.value
FROM (SELECT k->>0 AS kind, k->>1 AS key FROM json_array_elements(%s::json) AS k) AS t
CROSS JOIN LATERAL (
    SELECT value FROM audit_checkpoint_rows
    WHERE tenant_id = %s AND kind = t.kind AND key = t.key AND seq <= %s
    ORDER BY seq DESC LIMIT 1
) r
"""


# Starting from an archive (Part.base), each part reads its share: with buckets, the keys
# whose user falls in its bucket, as Part._users_only selects events and rows.
_ARCHIVE_HEADS_SQL = """
SELECT h.key, h.value FROM audit_archives a, jsonb_each_text(a.heads) h
WHERE a.tenant_id = %(tenant)s AND a.seq = %(seq)s
  AND (%(buckets)s <= 1 OR (hashtext((h.key::jsonb)->>1) & 2147483647) %% %(buckets)s
                            = %(bucket)s)
"""
# The whole state at a checkpoint but the stream heads (the archive's are used): per key, its
# row of the highest seq up to it, if that row is not a removal. The user is the key's second
# part (usage keys start with the hour), a reservation's is in its value.
_STATE_ALL_SQL = """
SELECT kind, key, value FROM (
    SELECT DISTINCT ON (kind, key) kind, key, value FROM audit_checkpoint_rows
    WHERE tenant_id = %(tenant)s AND seq <= %(seq)s AND kind <> 'stream'
    ORDER BY kind, key, seq DESC
) latest
WHERE value IS NOT NULL
  AND (%(buckets)s <= 1 OR (hashtext(CASE kind
          WHEN 'reservation' THEN (value::jsonb)->'key'->>1
          WHEN 'usage' THEN (key::jsonb)->>2
          ELSE (key::jsonb)->>1 END) & 2147483647) %% %(buckets)s = %(bucket)s)
"""


def balance_at(conninfo: str, key: AccountKey, as_of: datetime) -> BalanceResult:
    """The balance of `key` and its ancestors as it stood at `as_of`, folded from the log."""
    lineage = key.lineage()
    projection = Projection(keep=lineage.__contains__)
    with _reading(conninfo, None) as conn:
        where, params = scope_where(Scope(key.tenant_id))
        for row in _event_rows(conn, where + " AND occurred_at <= %s", (*params, as_of)):
            projection.feed(codec.event_from_row(row))
    accounts = [projection.accounts.get(k, Account(k)).rolled(as_of) for k in lineage]
    currency = next((p.currency for p in projection.prices.values()), "")
    return BalanceResult(accounts[-1], tuple(accounts[:-1]), currency)


@contextmanager
def _reading(conninfo: str, snapshot: str | None, fast: bool = True) -> Iterator[SyncConn]:
    """A read-only repeatable-read transaction, on `snapshot` when given; JSON is read by
    orjson (`fast`) or by json alone, as before the handoff. Database errors
    leave as StoreUnavailable or RuntimeError: a worker's exceptions cross a process boundary,
    and psycopg's do not survive pickling."""
    try:
        with psycopg.connect(conninfo, row_factory=dict_row) as conn:
            if fast:
                set_json_loads(codec.json_loads, conn)
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


# The live rows' columns, in the order they are read (the key's first); the accounts' last two
# are the stream's head. A reservation's ended_balance is not state a fold compares.
_ACCOUNT_ROW = tuple(c.strip() for c in ACCOUNT_COLUMNS.split(","))
_ACCOUNT_JSON = frozenset({"recent", "grants", "alert_thresholds", "alerts_fired", "money"})
"""Read as PostgreSQL's text of the jsonb, which _account_row writes for lists of integers
(the common case): loading every one of them cost more than comparing texts."""
_ACCOUNT_SELECT = ", ".join(f"{c}::text" if c in _ACCOUNT_JSON else c for c in _ACCOUNT_ROW)
_RESERVATION_ROW = tuple(
    c for c in (c.strip() for c in RESERVATION_COLUMNS.split(",")) if c != "ended_balance"
)
_USAGE_ROW = ("tenant_id", "hour", "user_id", "conversation_id", "model", *COUNTER_NAMES)
_USAGE_KEY = len(_USAGE_ROW) - len(COUNTER_NAMES)

Row = tuple[Any, ...]


@dataclass
class _Live:
    """The live projection rows as read (tuples of the columns above): accounts by key (without
    the head), reservations by id, usage by its key's columns; limiters and prices, which are
    few, as values."""

    accounts: dict[AccountKey, Row] = field(default_factory=dict)
    streams: dict[AccountKey, tuple[int, bytes]] = field(default_factory=dict)
    reservations: dict[str, Row] = field(default_factory=dict)
    usage: dict[Row, Row] = field(default_factory=dict)
    rate_limits: dict[RateLimitKey, RateLimit] = field(default_factory=dict)
    prices: dict[tuple[str, datetime], PricePoint] = field(default_factory=dict)

    @classmethod
    def read(cls, conn: SyncConn, where: Callable[[str], tuple[str, tuple[Any, ...]]]) -> _Live:
        """The live projection rows selected by where(table)."""
        out = cls()

        def rows(columns: str, table: str, factory: Any = tuple_row) -> Iterator[Any]:
            clause, params = where(table)
            query = f"SELECT {columns} FROM {table} WHERE {clause}"  # noqa: S608
            return conn.cursor(row_factory=factory).execute(query, params)

        for row in rows(_ACCOUNT_SELECT, "accounts"):
            key = AccountKey(*row[:3])
            out.accounts[key] = row[:-2]
            out.streams[key] = (row[-2], bytes(row[-1]))
        for row in rows(", ".join(_RESERVATION_ROW), "reservations"):
            out.reservations[row[1]] = row
        for row in rows(", ".join(_USAGE_ROW), "usage_hourly"):
            out.usage[row[:_USAGE_KEY]] = row[_USAGE_KEY:]
        for rl in map(rate_limit_from_row, rows(RATE_LIMIT_COLUMNS, "rate_limits", dict_row)):
            out.rate_limits[rl.key] = rl
        return out


def _same_counters(a: UsageCounters, b: UsageCounters) -> bool:
    return vars(a) == vars(b)


@dataclass(frozen=True)
class _Rows:
    """One kind of projection row, as _compare_rows compares the rebuilt values with the live
    rows: a value as its row would read (`row_of`), a rebuilt key as the live rows are keyed
    (`live_key`), and a live row as the rebuilt key and value it records (`decode`)."""

    kind: str
    row_of: Callable[[Any], Row]
    live_key: Callable[[Any], Any]
    decode: Callable[[Any, Row], tuple[Any, Any]]
    name: Callable[[Any], str]
    default: Callable[[Any], Any] | None = None


_UNLIKE = object()
"""A column value no live row holds: its row is always decoded and compared field by field."""


def _ints_text(values: Iterable[Any]) -> str:
    """PostgreSQL's text of a jsonb list of integers, or of lists of them."""
    return "[" + ", ".join(_ints_text(v) if type(v) is tuple else str(v) for v in values) + "]"


def _account_row(a: Account) -> Row:
    """The accounts row (_ACCOUNT_SELECT but the head) that _decode_account reads as `a`;
    grants and the money side (rare) as _UNLIKE."""
    k = a.key
    return (
        k.tenant_id, k.user_id, k.conversation_id, a.limit, a.period.value, a.window_hours,
        a.time_zone, a.soft_limit_percent, a.grant_order.value, a.held, a.used_total,
        a.used_day, a.day_start, a.used_month, a.month_start, _ints_text(a.recent),
        _UNLIKE if a.grants else "[]", _ints_text(a.alert_thresholds),
        _ints_text(a.alerts_fired), a.alerts_period, None if a.money is None else _UNLIKE,
    )  # fmt: skip


def _reservation_row(r: Reservation) -> Row:
    """The reservations row (_RESERVATION_ROW) that reservation_from_row reads as `r`."""
    k, u = r.key, r.usage
    usage = (None, None, None) if u is None else (
        u.input_tokens, u.output_tokens, u.cached_input_tokens)  # fmt: skip
    return (
        k.tenant_id, r.reservation_id, k.user_id, k.conversation_id, r.model, r.amount,
        r.state.value, r.created_at, r.expires_at, dict(r.labels), *usage, r.late, r.ended_at,
        r.money, r.cost,
    )  # fmt: skip


def _decode_account(key: AccountKey, row: Row) -> tuple[AccountKey, Account]:
    fields = dict(zip(_ACCOUNT_ROW, row, strict=False))
    for name in _ACCOUNT_JSON:
        if isinstance(text := fields[name], str):
            fields[name] = codec.json_loads(text)
    return key, account_from_row(fields)


def _decode_reservation(key: str, row: Row) -> tuple[str, Reservation]:
    return key, reservation_from_row(dict(zip(_RESERVATION_ROW, row, strict=True)))


def _decode_usage(key: Row, row: Row) -> tuple[UsageKey, UsageCounters]:
    return UsageKey(*key), UsageCounters(*row)


def _compare_rows(
    rows: _Rows, live: dict[Any, Row], rebuilt: dict[Any, Any], decode_all: bool = False
) -> list[Difference]:
    """_compare of the `rebuilt` values with the `live` rows as read. A value whose row
    (row_of) equals its live row equals that row decoded (decode reads row_of's row as the
    value: tests/unit/test_live_rows.py), so only the rows that differ, or have no
    counterpart, are decoded and compared field by field. `decode_all`: decode every live
    row first, as the design before the handoff did (for the bench)."""
    live = dict(live)
    mine: dict[Any, Any] = {}
    theirs: dict[Any, Any] = {}
    for key, value in rebuilt.items():
        raw = live.pop(live_key := rows.live_key(key), None)
        if raw is not None and not decode_all and raw == rows.row_of(value):
            continue
        mine[key] = value
        if raw is not None:
            theirs[key] = rows.decode(live_key, raw)[1]
    theirs.update(rows.decode(key, raw) for key, raw in live.items())
    return _compare(rows.kind, theirs, mine, rows.name, rows.default)


def _usage_key_text(key: UsageKey) -> str:
    return f"{key.tenant_id}/{key.user_id}/{key.conversation_id}@{key.hour.isoformat()}:{key.model}"


def _price_key_text(key: tuple[str, datetime]) -> str:
    return f"{key[0]}@{key[1].isoformat()}"


def _rate_limit_key_text(key: RateLimitKey) -> str:
    return f"{key.account}:{key.model or '*'}"


_ACCOUNTS = _Rows("account", _account_row, lambda k: k, _decode_account, str, Account)
_RESERVATIONS = _Rows(
    "reservation", _reservation_row, lambda k: k, _decode_reservation, lambda r: r
)
_USAGE = _Rows(
    "usage",
    attrgetter(*COUNTER_NAMES),
    attrgetter(*_USAGE_ROW[:_USAGE_KEY]),
    _decode_usage,
    _usage_key_text,
)


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
