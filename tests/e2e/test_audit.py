"""Audit and usage over the real server: replay, balances as of a past instant, verification
that finds tampering, usage queries and exports, and a follower that never skips an event."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest

from ledger import codec
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import Clock, ServerThread, call_fails, cycle, new_id, stamp

Stub = pb_grpc.LedgerServiceStub


def replay(
    stub: Stub, **fields: object
) -> tuple[list[pb.LedgerEvent], list[pb.StreamHead], pb.ReplayEnd]:
    """Events, stream heads and end of a replay; checks the chunks come in that order."""
    answers = list(stub.ReplayHistory(pb.ReplayHistoryRequest(**fields)))  # type: ignore[arg-type]
    kinds = [("events" if a.events else "") + ("heads" if a.heads else "") for a in answers]
    assert answers[-1].HasField("end") and not answers[-1].events and not answers[-1].heads
    assert kinds[:-1] == sorted(kinds[:-1], key=lambda k: k != "events")
    assert all(k in ("events", "heads") for k in kinds[:-1])
    events = [e for a in answers for e in a.events]
    heads = [h for a in answers for h in a.heads]
    return events, heads, answers[-1].end


def test_replay_streams_every_event_in_order_and_ends_at_the_heads(
    stub: Stub, history: str
) -> None:
    events, heads, end = replay(stub, tenant_id=history)
    assert [e.event_type for e in events].count("TokensReserved") == 4
    assert [e.position for e in events] == sorted(e.position for e in events)
    assert end.complete and end.events == len(events) == 10
    assert end.last_position == events[-1].position
    last = {}
    for e in events:
        last[(e.user_id, e.conversation_id)] = (e.version, e.hash)
    assert end.streams == len(heads) == 5
    assert {(h.user_id, h.conversation_id): (h.version, h.hash) for h in heads} == last


def test_an_auditor_can_recompute_every_hash_from_the_replay(stub: Stub, history: str) -> None:
    """The streamed fields are enough to re-verify the chain without the ledger's code: the
    hash is sha256(prev_hash || canonical JSON of the hashed fields)."""
    events, _, _ = replay(stub, tenant_id=history)
    heads: dict[tuple[str, str], bytes] = {}
    for e in events:
        body = {
            "tenant_id": e.tenant_id,
            "user_id": e.user_id,
            "conversation_id": e.conversation_id,
            "version": e.version,
            "event_type": e.event_type,
            "occurred_at": e.occurred_at.ToDatetime(tzinfo=UTC).isoformat(timespec="microseconds"),
            "model": e.model,
            "reservation_id": e.reservation_id,
            "amount": e.amount,
            "input_tokens": e.usage.input_tokens,
            "output_tokens": e.usage.output_tokens,
            "cached_input_tokens": e.usage.cached_input_tokens,
            "idempotency_key": e.idempotency_key,
            "actor": e.actor,
            "trace_id": e.trace_id,
            "data": json.loads(e.data_json),
        }
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        prev = heads.get((e.user_id, e.conversation_id), bytes(32))
        assert e.prev_hash == prev
        assert hashlib.sha256(prev + canonical.encode()).digest() == e.hash
        heads[(e.user_id, e.conversation_id)] = e.hash


def test_replay_scopes_positions_and_limits(stub: Stub, history: str) -> None:
    everything, _, _ = replay(stub, tenant_id=history)
    bob, _, _ = replay(stub, tenant_id=history, user_id="bob")
    assert bob == [e for e in everything if e.user_id == "bob"]
    conv, heads, _ = replay(stub, tenant_id=history, user_id="ann", conversation_id="c2")
    assert {e.conversation_id for e in conv} == {"c2"} and len(heads) == 1
    later, _, _ = replay(stub, tenant_id=history, from_position=everything[5].position)
    assert later == everything[5:]
    first, _, end = replay(stub, tenant_id=history, max_events=3)
    assert first == everything[:3] and not end.complete and end.last_position == first[-1].position


def test_balance_as_of_a_past_instant_is_computed_from_the_log(database_url: str) -> None:
    # The clock is ahead of the wall clock: the suite's shared server sweeps the same database
    # by the wall clock, and would expire a hold placed at a past instant while it is held.
    start = datetime(2099, 3, 1, 12, 0, tzinfo=UTC)
    clock = Clock(start)
    server = ServerThread(database_url, clock=clock, sweep_interval_s=3600).start()
    tenant = new_id("t")
    try:
        with server.stub() as stub:
            stub.SetQuota(
                pb.SetQuotaRequest(
                    idempotency_key=new_id("q"), tenant_id=tenant, user_id="cy", limit=1_000,
                    period=pb.PERIOD_DAY,
                )
            )  # fmt: skip
            clock.advance(60)
            rid = stub.Reserve(
                pb.ReserveRequest(
                    idempotency_key=new_id("k"), tenant_id=tenant, user_id="cy", model="m",
                    amount=400,
                )
            ).reservation.reservation_id  # fmt: skip
            clock.advance(60)
            stub.Commit(
                pb.CommitRequest(
                    tenant_id=tenant, reservation_id=rid, usage=pb.Usage(input_tokens=250)
                )
            )
            clock.advance(86_400)

            def at(minutes: float) -> pb.Balance:
                when = start + timedelta(minutes=minutes)
                req = pb.GetBalanceRequest(tenant_id=tenant, user_id="cy", as_of=stamp(when))
                return stub.GetBalance(req).balance

            assert at(0.5).HasField("limit") and (at(0.5).held, at(0.5).used) == (0, 0)
            assert (at(1.5).held, at(1.5).used, at(1.5).available) == (400, 0, 600)
            assert (at(2.5).held, at(2.5).used, at(2.5).available) == (0, 250, 750)
            assert at(24 * 60 + 1).used == 0  # the next day
            live = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="cy"))
            assert live.balance == at(24 * 60 + 2)
            # "the future" is the server's clock's: a day past the wall clock of the machine
            # running the test is in its past, an hour past its own clock is refused
            tomorrow = datetime.now(UTC) + timedelta(days=1)
            req = pb.GetBalanceRequest(tenant_id=tenant, user_id="cy", as_of=stamp(tomorrow))
            assert not stub.GetBalance(req).balance.HasField("limit")  # before the quota was set
            for later in (timedelta(hours=1), timedelta(days=400)):
                f = call_fails(
                    stub.GetBalance,
                    pb.GetBalanceRequest(tenant_id=tenant, as_of=stamp(clock.now + later)),
                )
                assert f.code == grpc.StatusCode.INVALID_ARGUMENT
                assert [v[0] for v in f.field_violations] == ["as_of"]
    finally:
        server.stop()


def verify(stub: Stub, tenant: str, user: str = "") -> pb.VerifyAuditResponse:
    return stub.VerifyAudit(pb.VerifyAuditRequest(tenant_id=tenant, user_id=user))


def superuser(url: str, sql: str, *params: object) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off: superuser only
        conn.execute(sql, params)


def test_an_untouched_history_verifies(stub: Stub, history: str) -> None:
    report = verify(stub, history)
    assert report.chains_ok and report.projections_match
    assert (report.events_checked, report.streams_checked) == (10, 5)
    assert not report.breaks and not report.differences
    bob = verify(stub, history, "bob")
    assert bob.chains_ok and bob.projections_match and bob.events_checked == 5


def test_an_edited_event_is_named_by_verification(
    stub: Stub, history: str, database_url: str
) -> None:
    superuser(
        database_url,
        "UPDATE events SET input_tokens = 1 WHERE tenant_id = %s AND user_id = 'ann' "
        "AND conversation_id = 'c2' AND version = 2",
        history,
    )
    report = verify(stub, history)
    assert not report.chains_ok
    assert [(b.stream.conversation_id, b.version, b.problem) for b in report.breaks] == [
        ("c2", 2, "hash does not match the event's content")
    ]
    # the edit also makes the rebuilt usage differ from what was recorded live
    assert {(d.kind, d.field) for d in report.differences} >= {("account", "used_total")}


def test_a_deleted_event_is_found_as_a_gap(stub: Stub, history: str, database_url: str) -> None:
    superuser(
        database_url,
        "DELETE FROM events WHERE tenant_id = %s AND user_id = 'bob' AND conversation_id = 'c9' "
        "AND version = 1",
        history,
    )
    report = verify(stub, history)
    assert [(b.stream.conversation_id, b.version, b.problem) for b in report.breaks] == [
        ("c9", 2, "version 2 follows 0")
    ]
    # the deleted TokensReserved leaves its reservation with no origin in the log
    missing = [d for d in report.differences if d.kind == "reservation"]
    assert [(d.field, d.rebuilt) for d in missing] == [("*", "(missing)")]


def test_edited_projections_are_listed_field_by_field(
    stub: Stub, history: str, database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE accounts SET used_total = used_total - 100 WHERE tenant_id = %s "
            "AND user_id = 'ann' AND conversation_id = ''",
            (history,),
        )
        conn.execute(
            "UPDATE usage_hourly SET output_tokens = 0 WHERE tenant_id = %s AND user_id = 'bob' "
            "AND conversation_id = 'c9'",
            (history,),
        )
    report = verify(stub, history)
    assert report.chains_ok and not report.projections_match
    diffs = {(d.kind, d.key.split("@")[0], d.field, d.live, d.rebuilt) for d in report.differences}
    assert ("account", f"{history}/ann", "used_total", "252", "352") in diffs
    assert any(d[0] == "usage" and d[2] == "output_tokens" for d in diffs)
    assert len(report.differences) == 2


def usage(stub: Stub, tenant: str, *groups: int, **filters: str) -> list[pb.UsageRow]:
    now = datetime.now(UTC)
    query = pb.UsageQuery(
        tenant_id=tenant,
        from_time=stamp(now - timedelta(days=1)),
        to_time=stamp(now + timedelta(hours=1)),
        group_by=list(groups),
        **filters,
    )
    return list(stub.QueryUsage(pb.QueryUsageRequest(query=query)).rows)


def test_usage_totals_group_and_filter(stub: Stub, history: str) -> None:
    (total,) = usage(stub, history)
    assert (total.input_tokens, total.output_tokens, total.cached_input_tokens) == (360, 3, 5)
    assert total.total_tokens == 368
    assert (total.reservations, total.commits, total.rollbacks, total.usage_records) == (4, 3, 1, 1)
    assert total.overage_tokens == 101
    by_user = {r.user_id: r.total_tokens for r in usage(stub, history, pb.USAGE_DIMENSION_USER)}
    assert by_user == {"ann": 352, "bob": 16}
    by_model = usage(stub, history, pb.USAGE_DIMENSION_MODEL, user_id="ann")
    assert {r.model: r.input_tokens for r in by_model} == {"gpt-4o": 50, "llama-3": 300}
    by_day = usage(stub, history, pb.USAGE_DIMENSION_DAY)
    assert len(by_day) == 1 and by_day[0].period_start.ToDatetime().hour == 0
    convs = usage(stub, history, pb.USAGE_DIMENSION_CONVERSATION)
    assert [(r.user_id, r.conversation_id) for r in convs] == [
        ("ann", "c1"), ("ann", "c2"), ("bob", ""), ("bob", "c9")
    ]  # fmt: skip


def test_usage_days_follow_the_query_time_zone(database_url: str) -> None:
    """Two calls an hour apart, 14:30 and 15:30 UTC: one UTC day, but two days in Tokyo
    (23:30 and 00:30 local), each starting at its local midnight."""
    clock = Clock(datetime(2099, 1, 1, 14, 30, tzinfo=UTC))
    server = ServerThread(database_url, clock=clock).start()
    tenant = new_id("t")
    try:
        with server.stub() as stub:
            cycle(stub, tenant, "ann", "c1", 100, 60)
            clock.advance(3600)
            cycle(stub, tenant, "ann", "c1", 100, 40)

            def days(time_zone: str) -> list[tuple[datetime, int]]:
                query = pb.UsageQuery(
                    tenant_id=tenant,
                    from_time=stamp(datetime(2098, 12, 31, tzinfo=UTC)),
                    to_time=stamp(datetime(2099, 1, 3, tzinfo=UTC)),
                    group_by=[pb.USAGE_DIMENSION_DAY],
                    time_zone=time_zone,
                )
                rows = stub.QueryUsage(pb.QueryUsageRequest(query=query)).rows
                return [(r.period_start.ToDatetime(UTC), r.input_tokens) for r in rows]

            assert days("") == days("UTC") == [(datetime(2099, 1, 1, tzinfo=UTC), 100)]
            assert days("Asia/Tokyo") == [
                (datetime(2098, 12, 31, 15, tzinfo=UTC), 60),
                (datetime(2099, 1, 1, 15, tzinfo=UTC), 40),
            ]
    finally:
        server.stop()


def test_usage_pages_and_export_agree(stub: Stub, history: str) -> None:
    now = datetime.now(UTC)
    query = pb.UsageQuery(
        tenant_id=history,
        from_time=stamp(now - timedelta(days=1)),
        to_time=stamp(now + timedelta(hours=1)),
        group_by=[pb.USAGE_DIMENSION_CONVERSATION, pb.USAGE_DIMENSION_MODEL],
    )
    pages, token = [], ""
    while True:
        page = stub.QueryUsage(pb.QueryUsageRequest(query=query, page_size=3, page_token=token))
        pages.append(list(page.rows))
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 1]
    exported = [r.row for r in stub.ExportUsage(pb.ExportUsageRequest(query=query))]
    assert exported == [row for p in pages for row in p]
    other = pb.UsageQuery()
    other.CopyFrom(query)
    other.model = "gpt-4o"
    f = call_fails(
        stub.QueryUsage,
        pb.QueryUsageRequest(query=other, page_token=stub.QueryUsage(
            pb.QueryUsageRequest(query=query, page_size=1)).next_page_token),
    )  # fmt: skip
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.field_violations[0][0] == "page_token"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tenant_id": ""}, "query.tenant_id"),
        ({"from_time": None}, "query.from_time"),
        ({"to_days": -2}, "query.to_time"),
        ({"to_days": 500}, "query.to_time"),
        ({"group_by": [0]}, "query.group_by"),
        ({"group_by": [4, 5]}, "query.group_by"),
        ({"group_by": [1, 1]}, "query.group_by"),
        ({"model": "bad model"}, "query.model"),
        ({"time_zone": "Mars/Olympus_Mons"}, "query.time_zone"),
        ({"time_zone": "not a zone"}, "query.time_zone"),
        # days start at 18:30 UTC there: inside an hourly bucket
        ({"time_zone": "Asia/Kolkata", "group_by": [4]}, "query.time_zone"),
    ],
)
def test_bad_usage_queries_are_refused(stub: Stub, change: dict[str, object], field: str) -> None:
    now = datetime.now(UTC)
    query = pb.UsageQuery(
        tenant_id=str(change.get("tenant_id", "t")),
        to_time=stamp(now + timedelta(days=int(change.get("to_days", 1)))),  # type: ignore[call-overload]
        group_by=change.get("group_by", []),  # type: ignore[arg-type]
        model=str(change.get("model", "")),
        time_zone=str(change.get("time_zone", "")),
    )
    if "from_time" not in change:
        query.from_time.CopyFrom(stamp(now))
    for call in (
        lambda: stub.QueryUsage(pb.QueryUsageRequest(query=query)),
        lambda: list(stub.ExportUsage(pb.ExportUsageRequest(query=query))),
    ):
        try:
            call()
        except grpc.RpcError as exc:
            from tests.support import failure

            f = failure(exc)
            assert f.code == grpc.StatusCode.INVALID_ARGUMENT
            assert field in [v[0] for v in f.field_violations]
        else:
            raise AssertionError("a bad usage query was answered")


def test_bad_replay_verify_and_subscribe_requests_are_refused(stub: Stub) -> None:
    cases = [
        (stub.VerifyAudit, pb.VerifyAuditRequest(tenant_id=""), "tenant_id"),
        (stub.VerifyAudit, pb.VerifyAuditRequest(tenant_id="t", user_id="a b"), "user_id"),
    ]
    for method, request, field in cases:
        f = call_fails(method, request)
        assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.field_violations[0][0] == field
    for request, field in [
        (pb.ReplayHistoryRequest(tenant_id=""), "tenant_id"),
        (pb.ReplayHistoryRequest(tenant_id="t", max_events=-1), "max_events"),
        (pb.ReplayHistoryRequest(tenant_id="t", from_position=-5), "from_position"),
        (pb.ReplayHistoryRequest(tenant_id="t", conversation_id="c"), "conversation_id"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ReplayHistory(request))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
    for request in [
        pb.SubscribeEventsRequest(after_cursor="nope"),
        pb.SubscribeEventsRequest(from_position=-1),
        pb.SubscribeEventsRequest(tenant_id="a b"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(stub.SubscribeEvents(request)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- the follower ---------------------------------------------------------------------------


def _raw_event(conn: psycopg.Connection[tuple[object, ...]], tenant: str, stream: str) -> int:
    row = conn.execute(
        """INSERT INTO events (tenant_id, user_id, conversation_id, version, event_type,
               occurred_at, model, reservation_id, amount, input_tokens, output_tokens,
               cached_input_tokens, idempotency_key, actor, trace_id, data, prev_hash, hash)
           VALUES (%s, %s, '', 1, 'UsageRecorded', now(), 'm', '', 0, 1, 0, 0, '', '', '',
               '{}', %s, %s) RETURNING position""",
        (tenant, stream, codec.GENESIS_HASH, codec.GENESIS_HASH),
    ).fetchone()
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


class Follower:
    """SubscribeEvents in a thread, collecting (position, cursor) until stopped."""

    def __init__(self, target: str, tenant: str, after_cursor: str = "") -> None:
        self.seen: list[tuple[int, str]] = []
        self._channel = grpc.insecure_channel(target)
        self._call = pb_grpc.LedgerServiceStub(self._channel).SubscribeEvents(
            pb.SubscribeEventsRequest(tenant_id=tenant, after_cursor=after_cursor)
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for answer in self._call:
                self.seen.append((answer.event.position, answer.cursor))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED

    def wait_for(self, count: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < count:
            assert time.monotonic() < deadline, f"saw {self.seen}, wanted {count}"
            time.sleep(0.02)

    def stop(self) -> None:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()


@pytest.fixture
def follow(ledger: ServerThread) -> Iterator[type[Follower]]:
    started: list[Follower] = []

    class Tracked(Follower):
        def __init__(self, tenant: str, after_cursor: str = "") -> None:
            super().__init__(ledger.target, tenant, after_cursor)
            started.append(self)

    yield Tracked
    for f in started:
        f.stop()


def test_follower_sees_transactions_that_commit_out_of_position_order(
    database_url: str, follow: type[Follower]
) -> None:
    """Transaction A takes a position, B a later one and commits first; A commits after.
    Read by position, a follower would pass A's gap and never see it; this one sees both."""
    tenant = new_id("t")
    follower = follow(tenant)
    with psycopg.connect(database_url) as a, psycopg.connect(database_url) as b:
        first = _raw_event(a, tenant, "a")  # A holds the earlier position, uncommitted
        second = _raw_event(b, tenant, "b")
        b.commit()
        time.sleep(0.6)  # several polls while A is open
        assert follower.seen == [], "B was delivered while A, before it, could still commit"
        a.commit()
    assert first < second
    follower.wait_for(2)
    time.sleep(0.3)
    assert [p for p, _ in follower.seen] == [first, second]


def test_follower_resumes_after_its_cursor_without_gaps_or_duplicates(
    stub: Stub, history: str, follow: type[Follower]
) -> None:
    everything, _, _ = replay(stub, tenant_id=history)
    first = follow(history)
    first.wait_for(10)
    resume_at = first.seen[4][1]
    first.stop()
    second = follow(history, resume_at)
    second.wait_for(5)
    cycle(stub, history, "dan", "", 9, 3)  # new events arrive while it follows
    second.wait_for(7)
    time.sleep(0.3)
    positions = [p for p, _ in first.seen[:5] + second.seen]
    assert positions[:10] == [e.position for e in everything]
    assert len(positions) == len(set(positions)) == 12


def test_verification_during_writes_reads_one_consistent_snapshot(
    ledger: ServerThread, history: str
) -> None:
    """Verifying while the tenant keeps writing compares the log and the projections as of the
    same instant, so it never reports a difference that is only a race."""
    stop, writing = threading.Event(), threading.Event()

    def write() -> None:
        with ledger.stub() as writer:
            while not stop.is_set():
                cycle(writer, history, "eve", "c1", 20, 5)
                writing.set()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert writing.wait(10)
        with ledger.stub() as stub:
            reports = [verify(stub, history) for _ in range(8)]
    finally:
        stop.set()
        thread.join(30)
    assert all(r.chains_ok and r.projections_match for r in reports), [
        list(r.differences)[:3] for r in reports
    ]
    assert reports[-1].events_checked > reports[0].events_checked  # writes went on meanwhile
