"""The ledger's promises, proven through the real gRPC server on a real PostgreSQL."""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import Clock, ServerThread, call_fails, event_count, new_id, verify_tenant

Stub = pb_grpc.LedgerServiceStub


def set_quota(stub: Stub, tenant: str, user: str = "", conv: str = "", limit: int = 0) -> None:
    stub.SetQuota(
        pb.SetQuotaRequest(
            idempotency_key=new_id("q"),
            tenant_id=tenant,
            user_id=user,
            conversation_id=conv,
            limit=limit,
            period=pb.PERIOD_DAY,
        )
    )


def reserve_request(tenant: str, user: str, amount: int, **kw: object) -> pb.ReserveRequest:
    fields: dict[str, object] = {
        "idempotency_key": new_id("r"),
        "tenant_id": tenant,
        "user_id": user,
        "model": "gpt-4o",
        "amount": amount,
    }
    fields.update(kw)
    return pb.ReserveRequest(**fields)  # type: ignore[arg-type]


def usage(inp: int, out: int = 0, cached: int = 0) -> pb.Usage:
    return pb.Usage(input_tokens=inp, output_tokens=out, cached_input_tokens=cached)


def balance(stub: Stub, tenant: str, user: str = "", conv: str = "") -> pb.GetBalanceResponse:
    return stub.GetBalance(
        pb.GetBalanceRequest(tenant_id=tenant, user_id=user, conversation_id=conv)
    )


@pytest.fixture
def events(database_url: str) -> Callable[[], int]:
    """How many events the test database holds now."""
    return lambda: event_count(database_url)


def projection_matches_replay(url: str, tenant: str) -> None:
    """Assert the live projections equal a rebuild from the log, and every chain verifies."""
    report = verify_tenant(url, tenant)
    assert report.events_checked > 0
    assert report.breaks == [] and report.differences == []


def test_reserve_commit_balance_round_trip(stub: Stub) -> None:
    """Reserve holds on every level; commit charges the usage and releases the rest."""
    t, u = new_id("t"), "alice"
    set_quota(stub, t, u, limit=10_000)
    r = stub.Reserve(reserve_request(t, u, 1_500, conversation_id="c1", labels={"feature": "x"}))
    assert r.reservation.state == pb.RESERVATION_STATE_HELD
    assert r.reservation.amount == 1_500
    assert r.reservation.labels == {"feature": "x"}
    assert r.balance.held == 1_500 and r.balance.conversation_id == "c1"
    assert balance(stub, t, u).reservable == 8_500

    c = stub.Commit(
        pb.CommitRequest(
            tenant_id=t, reservation_id=r.reservation.reservation_id, usage=usage(900, 300, 50)
        )
    )
    assert (c.committed, c.released, c.overage, c.late) == (1_250, 250, 0, False)
    assert c.reservation.state == pb.RESERVATION_STATE_COMMITTED
    b = balance(stub, t, u, "c1")
    tenant_b, user_b = b.ancestors
    assert (user_b.limit, user_b.held, user_b.used, user_b.available) == (10_000, 0, 1_250, 8_750)
    assert (tenant_b.used, b.balance.used) == (1_250, 1_250)
    assert not tenant_b.HasField("limit") and not tenant_b.HasField("available")
    assert user_b.period == pb.PERIOD_DAY and user_b.HasField("resets_at")
    got = stub.GetReservation(
        pb.GetReservationRequest(tenant_id=t, reservation_id=r.reservation.reservation_id)
    )
    assert got.reservation.usage == usage(900, 300, 50)


def test_refusal_names_level_figures_and_what_fits(stub: Stub, events: Callable[[], int]) -> None:
    """A reservation over a limit is RESOURCE_EXHAUSTED with ErrorInfo, QuotaFailure and the
    requested / available / limit figures, and appends nothing."""
    t = new_id("t")
    set_quota(stub, t, limit=1_000)  # tenant-wide
    set_quota(stub, t, "bob", limit=5_000)
    stub.Reserve(reserve_request(t, "bob", 700))
    before = events()
    f = call_fails(stub.Reserve, reserve_request(t, "bob", 400))
    assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f.reason == "BUDGET_EXHAUSTED"
    assert f.metadata == {
        "requested": "400",
        "available": "300",
        "limit": "1000",
        "scope": "tenant",
        "account": t,
        "reservable": "300",
        "compact_context": "true",
        "resets_at": f.metadata["resets_at"],
    }
    assert f.metadata["resets_at"].endswith("T00:00:00+00:00")  # the next UTC midnight
    assert f.quota_violations and f.quota_violations[0][0] == f"tenant:{t}"
    assert "requested 400" in f.message and "300 available" in f.message
    assert "limit 1000" in f.message and "at most 300" in f.message
    assert events() == before
    stub.Reserve(reserve_request(t, "bob", 300))  # exactly what fits


def test_conversation_limit_applies_below_user(stub: Stub) -> None:
    """A conversation's own limit refuses even when the user has room."""
    t = new_id("t")
    set_quota(stub, t, "carol", "c1", limit=100)
    f = call_fails(stub.Reserve, reserve_request(t, "carol", 101, conversation_id="c1"))
    assert f.metadata["scope"] == "conversation"
    stub.Reserve(reserve_request(t, "carol", 101, conversation_id="c2"))


def test_concurrent_reservations_never_overspend(ledger: ServerThread, database_url: str) -> None:
    """64 concurrent clients reserving, committing and rolling back against one user's limit
    never hold + use more than the limit; the final balance equals a replay of the log."""
    t, u, limit = new_id("t"), "hot", 20_000
    clients, rounds = 64, 12
    with ledger.stub() as s:
        set_quota(s, t, u, limit=limit)
    channels = [grpc.insecure_channel(ledger.target) for _ in range(8)]
    committed_total = 0
    refused = 0
    lock = threading.Lock()

    def client(n: int) -> None:
        nonlocal committed_total, refused
        stub = pb_grpc.LedgerServiceStub(channels[n % len(channels)])
        rng = random.Random(n)
        for _ in range(rounds):
            amount = rng.randint(100, 900)
            try:
                r = stub.Reserve(reserve_request(t, u, amount, conversation_id=f"c{n % 5}"))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                with lock:
                    refused += 1
                continue
            rid = r.reservation.reservation_id
            assert r.balance.held >= amount
            if rng.random() < 0.2:
                stub.Rollback(pb.RollbackRequest(tenant_id=t, reservation_id=rid))
                continue
            used = rng.randint(0, amount)
            stub.Commit(pb.CommitRequest(tenant_id=t, reservation_id=rid, usage=usage(used)))
            with lock:
                committed_total += used

    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
    finally:
        for ch in channels:
            ch.close()
    with ledger.stub() as s:
        user = balance(s, t, u).balance
    assert user.held == 0
    assert user.used == committed_total <= limit
    assert refused > 0, "the limit was never reached: the test proved nothing"
    projection_matches_replay(database_url, t)


def test_no_overspend_while_holds_are_open(ledger: ServerThread) -> None:
    """64 clients racing for one budget: the holds granted never add up to more than it."""
    t, u, limit = new_id("t"), "race", 10_000
    with ledger.stub() as s:
        set_quota(s, t, u, limit=limit)
    granted: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with grpc.insecure_channel(ledger.target) as ch:
            stub = pb_grpc.LedgerServiceStub(ch)
            for _ in range(6):
                try:
                    r = stub.Reserve(reserve_request(t, u, 333))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    continue
                with lock:
                    granted.append(r.reservation.amount)

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(client, range(64)))
    assert sum(granted) <= limit
    assert len(granted) == limit // 333  # every token that fitted was granted
    with ledger.stub() as s:
        assert balance(s, t, u).balance.held == sum(granted)


def test_retried_reserve_returns_first_response_and_appends_nothing(
    stub: Stub, events: Callable[[], int]
) -> None:
    t = new_id("t")
    req = reserve_request(t, "dave", 500, labels={"a": "1"})
    first = stub.Reserve(req)
    stub.Commit(
        pb.CommitRequest(
            tenant_id=t, reservation_id=first.reservation.reservation_id, usage=usage(10)
        )
    )
    before = events()
    again = stub.Reserve(req)
    assert again == first  # the first response, though the hold has since been committed
    assert events() == before


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount": 501}, "amount"),
        ({"user_id": "erin"}, "user_id"),
        ({"model": "gpt-4.1"}, "model"),
        ({"conversation_id": "c9"}, "conversation_id"),
        ({"labels": {"a": "2"}}, "labels"),
    ],
)
def test_same_key_with_a_different_request_names_the_field(
    stub: Stub, events: Callable[[], int], change: dict[str, object], field: str
) -> None:
    t = new_id("t")
    req = reserve_request(t, "dave", 500, labels={"a": "1"})
    stub.Reserve(req)
    changed = pb.ReserveRequest()
    changed.CopyFrom(req)
    for name, value in change.items():
        if name == "labels":
            changed.labels.clear()
            changed.labels.update(value)  # type: ignore[arg-type]
        else:
            setattr(changed, name, value)
    before = events()
    f = call_fails(stub.Reserve, changed)
    assert f.code == grpc.StatusCode.ALREADY_EXISTS
    assert f.reason == "IDEMPOTENCY_KEY_REUSED"
    assert f.metadata == {"field": field}
    assert field in f.message
    assert events() == before


def test_key_reused_for_another_operation_is_refused(stub: Stub) -> None:
    t = new_id("t")
    req = reserve_request(t, "dave", 500)
    stub.Reserve(req)
    f = call_fails(
        stub.RecordUsage,
        pb.RecordUsageRequest(
            idempotency_key=req.idempotency_key,
            tenant_id=t,
            user_id="dave",
            model="gpt-4o",
            usage=usage(1),
        ),
    )
    assert f.code == grpc.StatusCode.ALREADY_EXISTS and f.metadata == {"field": "operation"}


def test_retried_commit_returns_first_response_and_appends_nothing(
    stub: Stub, events: Callable[[], int]
) -> None:
    t = new_id("t")
    r = stub.Reserve(reserve_request(t, "eve", 100))
    req = pb.CommitRequest(
        tenant_id=t, reservation_id=r.reservation.reservation_id, usage=usage(60, 20)
    )
    first = stub.Commit(req)
    stub.RecordUsage(  # the balance moves on; a retry still returns the first response
        pb.RecordUsageRequest(
            idempotency_key=new_id("u"), tenant_id=t, user_id="eve", model="m", usage=usage(5)
        )
    )
    before = events()
    assert stub.Commit(req) == first
    assert events() == before
    req.usage.output_tokens = 21
    f = call_fails(stub.Commit, req)
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f.reason == "RESERVATION_ENDED" and f.metadata == {"state": "committed"}
    assert "output_tokens=20" in f.message and "output_tokens=21" in f.message
    assert events() == before


def test_retried_rollback_returns_first_response_and_appends_nothing(
    stub: Stub, events: Callable[[], int]
) -> None:
    t = new_id("t")
    r = stub.Reserve(reserve_request(t, "eve", 100))
    req = pb.RollbackRequest(tenant_id=t, reservation_id=r.reservation.reservation_id)
    first = stub.Rollback(req)
    assert first.released == 100 and first.balance.held == 0
    assert first.reservation.state == pb.RESERVATION_STATE_ROLLED_BACK
    before = events()
    assert stub.Rollback(req) == first
    assert events() == before


def test_retried_record_usage_and_set_quota_append_nothing(
    stub: Stub, events: Callable[[], int]
) -> None:
    t = new_id("t")
    ru = pb.RecordUsageRequest(
        idempotency_key=new_id("u"), tenant_id=t, user_id="fay", model="m", usage=usage(7, 3)
    )
    sq = pb.SetQuotaRequest(
        idempotency_key=new_id("q"), tenant_id=t, user_id="fay", limit=50, period=pb.PERIOD_MONTH
    )
    first_ru, first_sq = stub.RecordUsage(ru), stub.SetQuota(sq)
    assert first_ru.balance.used == 10 and first_sq.balance.available == 40
    before = events()
    assert stub.RecordUsage(ru) == first_ru
    assert stub.SetQuota(sq) == first_sq
    assert events() == before
    assert balance(stub, t, "fay").balance.used == 10


def test_ended_reservations_refuse_the_other_ending(stub: Stub) -> None:
    """A reservation ends exactly once: commit after rollback and rollback after commit are
    FAILED_PRECONDITION naming the state."""
    t = new_id("t")
    a = stub.Reserve(reserve_request(t, "gus", 10)).reservation.reservation_id
    b = stub.Reserve(reserve_request(t, "gus", 10)).reservation.reservation_id
    stub.Rollback(pb.RollbackRequest(tenant_id=t, reservation_id=a))
    stub.Commit(pb.CommitRequest(tenant_id=t, reservation_id=b, usage=usage(1)))
    f = call_fails(stub.Commit, pb.CommitRequest(tenant_id=t, reservation_id=a, usage=usage(1)))
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.metadata == {"state": "rolled_back"}
    assert "RecordUsage" in f.message
    f = call_fails(stub.Rollback, pb.RollbackRequest(tenant_id=t, reservation_id=b))
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.metadata == {"state": "committed"}


def test_reservation_ids_are_scoped_to_their_tenant(stub: Stub) -> None:
    t = new_id("t")
    rid = stub.Reserve(reserve_request(t, "hal", 10)).reservation.reservation_id
    f = call_fails(
        stub.Commit, pb.CommitRequest(tenant_id=new_id("t"), reservation_id=rid, usage=usage(1))
    )
    assert f.code == grpc.StatusCode.NOT_FOUND


def test_overage_is_recorded_in_full(stub: Stub, database_url: str) -> None:
    """Usage above the hold is charged in full and reported, even past the limit."""
    t = new_id("t")
    set_quota(stub, t, "ivy", limit=1_000)
    r = stub.Reserve(reserve_request(t, "ivy", 800))
    c = stub.Commit(
        pb.CommitRequest(
            tenant_id=t, reservation_id=r.reservation.reservation_id, usage=usage(900, 400)
        )
    )
    assert (c.committed, c.released, c.overage) == (800, 0, 500)
    user = balance(stub, t, "ivy").balance
    assert (user.used, user.available) == (1_300, 0)
    f = call_fails(stub.Reserve, reserve_request(t, "ivy", 1))
    assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    projection_matches_replay(database_url, t)


def test_record_usage_is_never_refused_for_budget(stub: Stub) -> None:
    t = new_id("t")
    set_quota(stub, t, "jo", limit=10)
    r = stub.RecordUsage(
        pb.RecordUsageRequest(
            idempotency_key=new_id("u"), tenant_id=t, user_id="jo", model="m", usage=usage(50)
        )
    )
    assert r.balance.used == 50


def test_caller_trace_is_continued_and_stored_with_the_event(stub: Stub, database_url: str) -> None:
    """A caller's W3C traceparent is continued by the server and its trace id is recorded
    with every event the call appends."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    t = new_id("t")
    stub.Reserve(
        reserve_request(t, "olga", 5),
        metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")],
    )
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT trace_id FROM events WHERE tenant_id = %s", (t,)).fetchall()
    assert rows == [(trace_id,)]


def test_health_and_reflection_are_served(ledger: ServerThread) -> None:
    with grpc.insecure_channel(ledger.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "tokenledger.v1.LedgerService"):
            got = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert got.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert "tokenledger.v1.LedgerService" in names


# --- expiry, with a clock the test moves ----------------------------------------------------


@pytest.fixture
def clocked(database_url: str, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """A server of its own whose clock the test moves; the sweeper runs every 50 ms unless the
    test is marked to disable it."""
    sweep = 3600.0 if request.node.get_closest_marker("no_sweeper") else 0.05
    server = ServerThread(database_url, clock=Clock(), sweep_interval_s=sweep).start()
    yield server
    server.stop()


def wait_for_state(stub: Stub, tenant: str, rid: str, state: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    req = pb.GetReservationRequest(tenant_id=tenant, reservation_id=rid)
    while stub.GetReservation(req).reservation.state != state:
        assert time.monotonic() < deadline, "the reservation never reached the state"
        time.sleep(0.02)


def test_sweeper_expires_overdue_holds_and_releases_them(clocked: ServerThread) -> None:
    t = new_id("t")
    with clocked.stub() as stub:
        set_quota(stub, t, "kim", limit=1_000)
        r = stub.Reserve(reserve_request(t, "kim", 600, ttl_seconds=30))
        assert balance(stub, t, "kim").balance.held == 600
        clocked.clock.advance(31)
        wait_for_state(stub, t, r.reservation.reservation_id, pb.RESERVATION_STATE_EXPIRED)
        user = balance(stub, t, "kim").balance
        assert (user.held, user.used, user.available) == (0, 0, 1_000)


@pytest.mark.no_sweeper
def test_touching_the_account_expires_overdue_holds(clocked: ServerThread) -> None:
    """With no sweeper, the next Reserve on the tenant expires the overdue hold first, so the
    tokens it held are available to that very call."""
    t = new_id("t")
    with clocked.stub() as stub:
        set_quota(stub, t, "lee", limit=1_000)
        old = stub.Reserve(reserve_request(t, "lee", 900, ttl_seconds=30))
        clocked.clock.advance(31)
        new = stub.Reserve(reserve_request(t, "lee", 900))
        assert new.balance.held == 900
        got = stub.GetReservation(
            pb.GetReservationRequest(tenant_id=t, reservation_id=old.reservation.reservation_id)
        )
        assert got.reservation.state == pb.RESERVATION_STATE_EXPIRED


@pytest.mark.no_sweeper
def test_commit_after_expiry_is_recorded_and_flagged_late(
    clocked: ServerThread, database_url: str
) -> None:
    t = new_id("t")
    with clocked.stub() as stub:
        set_quota(stub, t, "max", limit=1_000)
        r = stub.Reserve(reserve_request(t, "max", 400, ttl_seconds=10))
        rid = r.reservation.reservation_id
        clocked.clock.advance(11)
        req = pb.CommitRequest(tenant_id=t, reservation_id=rid, usage=usage(300, 200))
        c = stub.Commit(req)
        assert c.late and c.reservation.state == pb.RESERVATION_STATE_EXPIRED
        assert (c.committed, c.released, c.overage) == (400, 0, 100)
        user = balance(stub, t, "max").balance
        assert (user.held, user.used) == (0, 500)
        before = event_count(database_url)
        assert stub.Commit(req) == c
        assert event_count(database_url) == before
        f = call_fails(stub.Rollback, pb.RollbackRequest(tenant_id=t, reservation_id=rid))
        assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.metadata == {"state": "expired"}
    projection_matches_replay(database_url, t)


@pytest.mark.no_sweeper
def test_daily_quota_resets_at_the_utc_day_boundary(clocked: ServerThread) -> None:
    t = new_id("t")
    with clocked.stub() as stub:
        set_quota(stub, t, "ned", limit=100)
        stub.RecordUsage(
            pb.RecordUsageRequest(
                idempotency_key=new_id("u"), tenant_id=t, user_id="ned", model="m",
                usage=usage(100),
            )
        )  # fmt: skip
        assert call_fails(stub.Reserve, reserve_request(t, "ned", 1)).code == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        clocked.clock.advance(86_400)
        assert balance(stub, t, "ned").balance.used == 0
        stub.Reserve(reserve_request(t, "ned", 100))


def test_store_unavailable_is_reported_as_unavailable() -> None:
    """With the database unreachable a call fails UNAVAILABLE with RetryInfo, never
    UNKNOWN or INTERNAL."""
    unreachable = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"
    server = ServerThread(unreachable, sweep_interval_s=3600, wait_for_database=False).start()
    try:
        with server.stub() as stub:
            f = call_fails(stub.Reserve, reserve_request("t", "u", 1))
            assert f.code == grpc.StatusCode.UNAVAILABLE
            assert f.reason == "STORE_UNAVAILABLE" and f.retry_delay_s == 1
    finally:
        server.stop()


def test_a_call_without_a_trace_gets_its_own_trace_id_when_no_span_is_exported(
    stub: Stub, database_url: str
) -> None:
    """With no span processor (the tests' tracer provider has none) no span is built, yet each
    call still gets a trace id of its own, stored with its events."""
    t = new_id("t")
    for user in ("ana", "ben"):
        stub.Reserve(reserve_request(t, user, 5))
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT trace_id FROM events WHERE tenant_id = %s", (t,)).fetchall()
    ids = {row[0] for row in rows}
    assert len(rows) == 2 and len(ids) == 2
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) and i != "0" * 32 for i in ids)
