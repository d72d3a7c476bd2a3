"""Budget policy over the real API: rate limits and hierarchies under concurrency, period
boundaries on a clock the test moves, grants, adjustments, partial grants and suggestions.

Each test runs its own server on a fake clock that only the test moves, so "one window" and
"the instant before midnight" are exact.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import Clock, ServerThread, call_fails, failure, new_id, stamp, verify_tenant

Stub = pb_grpc.LedgerServiceStub
CLIENTS = 64
CHEAPER = {"gpt-4o": "gpt-4o-mini"}


@pytest.fixture
def clock() -> Clock:
    # In the future: the session's real-clock server shares the database, and its sweeper
    # would expire holds whose fake expiry is already past in real time.
    return Clock(datetime(2099, 3, 7, 12, 0, tzinfo=UTC))


@pytest.fixture
def server(database_url: str, clock: Clock) -> Iterator[ServerThread]:
    # No sweeper: expiry is not what these tests are about, and holds live 10 minutes.
    ledger = ServerThread(
        database_url, clock=clock, sweep_interval_s=3600, cheaper_models=CHEAPER
    ).start()
    yield ledger
    ledger.stop()


@pytest.fixture
def api(server: ServerThread) -> Iterator[Stub]:
    with server.stub() as stub:
        yield stub


def assert_log_explains_projections(url: str, tenant: str) -> None:
    report = verify_tenant(url, tenant)
    assert not report.breaks and not report.differences, report.differences[:5]


def quota(stub: Stub, tenant: str, user: str = "", conv: str = "", **fields: object) -> pb.Balance:
    request = pb.SetQuotaRequest(
        idempotency_key=new_id("q"), tenant_id=tenant, user_id=user, conversation_id=conv,
        **fields,  # type: ignore[arg-type]
    )  # fmt: skip
    return stub.SetQuota(request).balance


def rate_limit(stub: Stub, tenant: str, user: str = "", model: str = "", **fields: int) -> None:
    stub.SetRateLimit(
        pb.SetRateLimitRequest(
            idempotency_key=new_id("rl"), tenant_id=tenant, user_id=user, model=model, **fields
        )
    )


def reserve(
    stub: Stub, tenant: str, user: str, amount: int, conv: str = "", **fields: object
) -> pb.ReserveResponse:
    request = pb.ReserveRequest(
        idempotency_key=new_id("r"), tenant_id=tenant, user_id=user, conversation_id=conv,
        model="gpt-4o", amount=amount, ttl_seconds=600, **fields,  # type: ignore[arg-type]
    )  # fmt: skip
    return stub.Reserve(request)


def commit(stub: Stub, tenant: str, rid: str, output: int) -> pb.CommitResponse:
    return stub.Commit(
        pb.CommitRequest(tenant_id=tenant, reservation_id=rid, usage=pb.Usage(output_tokens=output))
    )


def balance(stub: Stub, tenant: str, user: str = "", conv: str = "") -> pb.Balance:
    request = pb.GetBalanceRequest(tenant_id=tenant, user_id=user, conversation_id=conv)
    return stub.GetBalance(request).balance


def hammer(target: str, attempts: list[pb.ReserveRequest]) -> tuple[list[int], list[str]]:
    """Send `attempts` from CLIENTS threads at once; returns the granted amounts and the
    reasons of the refusals."""
    granted: list[int] = []
    refused: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(mine: list[pb.ReserveRequest]) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            start.wait()
            for request in mine:
                try:
                    amount = stub.Reserve(request, timeout=60).reservation.amount
                    with lock:
                        granted.append(amount)
                except grpc.RpcError as exc:
                    with lock:
                        refused.append(failure(exc).reason)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, [attempts[i::CLIENTS] for i in range(CLIENTS)]))
    return granted, refused


def reserve_requests(tenant: str, n: int, amount: int, **fields: object) -> list[pb.ReserveRequest]:
    rng = random.Random(n)
    return [
        pb.ReserveRequest(
            idempotency_key=new_id("r"), tenant_id=tenant, user_id=f"u{rng.randrange(50)}",
            model="gpt-4o", amount=amount, ttl_seconds=600, **fields,  # type: ignore[arg-type]
        )
        for _ in range(n)
    ]  # fmt: skip


# --- rate limits ------------------------------------------------------------------------------


def test_token_rate_limit_holds_under_64_concurrent_clients_within_one_window(
    server: ServerThread, api: Stub, clock: Clock, database_url: str
) -> None:
    """64 clients at one instant get exactly the limit's worth of tokens, every other call is
    RATE_LIMITED; half a minute later exactly half a minute's worth more gets through."""
    tenant = new_id("t")
    rate_limit(api, tenant, tokens_per_minute=10_000)
    granted, refused = hammer(server.target, reserve_requests(tenant, 192, 100))
    assert sum(granted) == 10_000 and len(granted) == 100
    assert refused == ["RATE_LIMITED"] * 92
    clock.advance(30)
    granted, refused = hammer(server.target, reserve_requests(tenant, 128, 100))
    assert sum(granted) == 5_000
    assert set(refused) == {"RATE_LIMITED"}
    assert_log_explains_projections(database_url, tenant)


def test_request_rate_limit_holds_under_64_concurrent_clients(
    server: ServerThread, api: Stub
) -> None:
    """With 30 requests per minute on a user, 64 simultaneous calls let exactly 30 through; the
    refusal says when the next one fits (60 s / 30 = 2 s) in RetryInfo."""
    tenant = new_id("t")
    rate_limit(api, tenant, "u7", requests_per_minute=30)
    attempts = [
        pb.ReserveRequest(
            idempotency_key=new_id("r"), tenant_id=tenant, user_id="u7", model="gpt-4o", amount=1
        )
        for _ in range(CLIENTS)
    ]
    granted, refused = hammer(server.target, attempts)
    assert len(granted) == 30 and refused == ["RATE_LIMITED"] * 34
    one_more = pb.ReserveRequest()
    one_more.CopyFrom(attempts[0])
    one_more.idempotency_key = new_id("r")
    f = call_fails(api.Reserve, one_more)
    assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f.metadata["kind"] == "requests" and f.retry_delay_s == pytest.approx(2.0)


def test_partial_grants_under_a_rate_limit_add_up_to_the_limit_exactly(
    server: ServerThread, api: Stub
) -> None:
    """Calls that accept partial grants share out exactly a minute's worth: the grants add up
    to the limit, none is below its min_amount, and the one that found less than its minimum
    was refused."""
    tenant = new_id("t")
    rate_limit(api, tenant, model="gpt-4o", tokens_per_minute=1_000)
    granted, refused = hammer(server.target, reserve_requests(tenant, 64, 300, min_amount=7))
    assert sum(granted) >= 1_000 - 6 and sum(granted) <= 1_000
    assert all(7 <= g <= 300 for g in granted)
    assert set(refused) == {"RATE_LIMITED"}


def test_rate_limit_of_another_model_does_not_apply(api: Stub) -> None:
    """A per-model limit binds that model only; a tenant-wide all-models limit binds every one."""
    tenant = new_id("t")
    rate_limit(api, tenant, model="llama-3", tokens_per_minute=10)
    assert reserve(api, tenant, "u", 1_000).reservation.amount == 1_000  # gpt-4o: no limit
    rate_limit(api, tenant, tokens_per_minute=1_500)  # a new limiter starts with a full minute
    assert reserve(api, tenant, "u", 1_000).reservation.amount == 1_000
    f = call_fails(api.Reserve, pb.ReserveRequest(
        idempotency_key=new_id("r"), tenant_id=tenant, user_id="u", model="gpt-4o", amount=501,
    ))  # fmt: skip
    assert f.reason == "RATE_LIMITED" and f.metadata["reservable"] == "500"
    assert f.metadata["model"] == "" and f.metadata["per_minute"] == "1500"


# --- hierarchy under concurrency --------------------------------------------------------------


def test_no_level_is_overspent_under_concurrency_across_many_users(
    server: ServerThread, api: Stub, database_url: str
) -> None:
    """A tenant (day), 100 users (rolling 5 h) and their conversations (no period), hammered by
    64 clients asking for more than the tenant has: at the end no level's used plus held is
    above its limit, the tenant limit is reached, and the log rebuilds every projection."""
    tenant = new_id("t")
    quota(api, tenant, limit=20_000, period=pb.PERIOD_DAY)
    rng = random.Random(5)
    users = [f"u{i}" for i in range(100)]
    for u in users:
        quota(api, tenant, u, limit=400, period=pb.PERIOD_ROLLING, window_hours=5)
    for u in users[:20]:
        quota(api, tenant, u, "c0", limit=150, period=pb.PERIOD_NONE)
    attempts = [
        pb.ReserveRequest(
            idempotency_key=new_id("r"), tenant_id=tenant, user_id=rng.choice(users),
            conversation_id=rng.choice(("", "c0")), model="gpt-4o", amount=rng.randint(10, 120),
            min_amount=rng.choice((0, 5)), ttl_seconds=600,
        )
        for _ in range(640)
    ]  # fmt: skip
    granted, refused = hammer(server.target, attempts)
    assert set(refused) <= {"BUDGET_EXHAUSTED"}, sorted(set(refused))
    tenant_balance = balance(api, tenant)
    assert tenant_balance.held == sum(granted) <= 20_000, (tenant_balance, sum(granted))
    assert tenant_balance.held > 20_000 - 120, tenant_balance  # demand exceeded the limit
    for u in users:
        b = balance(api, tenant, u)
        assert b.held + b.used <= 400
        if u in users[:20]:
            c = balance(api, tenant, u, "c0")
            assert c.held + c.used <= 150
    assert_log_explains_projections(database_url, tenant)


# --- period boundaries ------------------------------------------------------------------------


def test_day_in_a_time_zone_resets_exactly_at_its_local_midnight(api: Stub, clock: Clock) -> None:
    """A day quota in Asia/Tokyo is spent until 14:59:59.999999 UTC and fits again at 15:00 UTC;
    the refusal names that instant. A hold placed before midnight and committed after is
    charged to the day it was placed in: the new day starts at 0."""
    tenant = new_id("t")
    quota(api, tenant, "u", limit=1_000, period=pb.PERIOD_DAY, time_zone="Asia/Tokyo")
    clock.now = datetime(2099, 3, 9, 14, 59, 59, 999_999, tzinfo=UTC)
    spanning = reserve(api, tenant, "u", 600).reservation.reservation_id
    f = call_fails(api.Reserve, _request(tenant, "u", 401))
    assert f.reason == "BUDGET_EXHAUSTED" and f.metadata["resets_at"] == "2099-03-09T15:00:00+00:00"
    clock.now = datetime(2099, 3, 9, 15, 0, tzinfo=UTC)
    commit(api, tenant, spanning, 600)
    b = balance(api, tenant, "u")
    assert (b.used, b.held, b.available) == (0, 0, 1_000)
    assert b.period_start.ToDatetime(tzinfo=UTC) == clock.now
    assert reserve(api, tenant, "u", 1_000).reservation.amount == 1_000


def test_month_resets_at_the_first_of_the_month_without_double_counting(
    api: Stub, clock: Clock
) -> None:
    """Usage of January counts in January only; February starts at 0 and the tenant-wide total
    (period none) still has both months exactly once."""
    tenant = new_id("t")
    clock.now = datetime(2099, 1, 31, 23, 59, 59, tzinfo=UTC)
    quota(api, tenant, limit=10_000, period=pb.PERIOD_NONE)
    quota(api, tenant, "u", limit=500, period=pb.PERIOD_MONTH)
    commit(api, tenant, reserve(api, tenant, "u", 500).reservation.reservation_id, 450)
    assert call_fails(api.Reserve, _request(tenant, "u", 51)).reason == "BUDGET_EXHAUSTED"
    clock.advance(1)
    commit(api, tenant, reserve(api, tenant, "u", 500).reservation.reservation_id, 300)
    assert balance(api, tenant, "u").used == 300
    assert balance(api, tenant).used == 750


def test_rolling_window_frees_usage_exactly_when_it_leaves_the_window(
    api: Stub, clock: Clock
) -> None:
    """With a 3-hour rolling window, usage charged at 10:xx counts until 12:59:59 and stops
    counting at 13:00; usage at 11:xx still counts then."""
    tenant = new_id("t")
    quota(api, tenant, "u", limit=1_000, period=pb.PERIOD_ROLLING, window_hours=3)
    clock.now = datetime(2099, 5, 4, 10, 30, tzinfo=UTC)
    commit(api, tenant, reserve(api, tenant, "u", 700).reservation.reservation_id, 700)
    clock.now = datetime(2099, 5, 4, 11, 5, tzinfo=UTC)
    commit(api, tenant, reserve(api, tenant, "u", 300).reservation.reservation_id, 200)
    clock.now = datetime(2099, 5, 4, 12, 59, 59, tzinfo=UTC)
    f = call_fails(api.Reserve, _request(tenant, "u", 101))
    assert (
        f.metadata["available"] == "100" and f.metadata["resets_at"] == "2099-05-04T13:00:00+00:00"
    )
    clock.now = datetime(2099, 5, 4, 13, 0, tzinfo=UTC)
    b = balance(api, tenant, "u")
    assert (b.used, b.available) == (200, 800)
    assert reserve(api, tenant, "u", 800).reservation.amount == 800


def _request(tenant: str, user: str, amount: int, **fields: object) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        idempotency_key=new_id("r"), tenant_id=tenant, user_id=user, model="gpt-4o",
        amount=amount, ttl_seconds=600, **fields,  # type: ignore[arg-type]
    )  # fmt: skip


# --- grants, adjustments, partial grants, suggestions -----------------------------------------


def test_grant_tops_up_a_prepaid_account_until_it_expires(
    api: Stub, clock: Clock, database_url: str
) -> None:
    """A limit of 0 plus a grant of 1,000 lets 1,000 be spent; what is left lapses at the
    grant's expiry. The grant is an event with its reason."""
    tenant = new_id("t")
    quota(api, tenant, "u", limit=0, period=pb.PERIOD_MONTH)
    expiry = clock.now + timedelta(hours=1)
    granted = api.GrantTokens(
        pb.GrantTokensRequest(
            idempotency_key=new_id("g"), tenant_id=tenant, user_id="u", amount=1_000,
            expires_at=stamp(expiry), reason="support ticket 42",
        )
    ).balance  # fmt: skip
    assert (granted.granted, granted.available) == (1_000, 1_000)
    commit(api, tenant, reserve(api, tenant, "u", 600).reservation.reservation_id, 600)
    b = balance(api, tenant, "u")
    assert (b.granted, b.used, b.available) == (400, 0, 400)
    assert b.grants[0].expires_at.ToDatetime(tzinfo=UTC) == expiry
    clock.now = expiry
    assert call_fails(api.Reserve, _request(tenant, "u", 1)).reason == "BUDGET_EXHAUSTED"
    events = [e for e in _replay(api, tenant) if e.event_type == "TokensGranted"]
    assert len(events) == 1 and '"reason":"support ticket 42"' in events[0].data_json
    assert_log_explains_projections(database_url, tenant)


def test_grants_first_spares_the_period_quota(api: Stub) -> None:
    """With GRANT_ORDER_GRANTS_FIRST, usage draws the grant before the day's quota."""
    tenant = new_id("t")
    quota(api, tenant, "u", limit=100, period=pb.PERIOD_DAY,
          grant_order=pb.GRANT_ORDER_GRANTS_FIRST)  # fmt: skip
    api.GrantTokens(pb.GrantTokensRequest(
        idempotency_key=new_id("g"), tenant_id=tenant, user_id="u", amount=50, reason="promo",
    ))  # fmt: skip
    commit(api, tenant, reserve(api, tenant, "u", 80).reservation.reservation_id, 80)
    b = balance(api, tenant, "u")
    assert (b.granted, b.used, b.available) == (0, 30, 70)


def test_adjustment_corrects_usage_at_every_level_and_is_recorded(
    api: Stub, database_url: str
) -> None:
    """A credit of 300 on a user lowers the user's and the tenant's usage by 300; the event
    carries the signed amount and the reason."""
    tenant = new_id("t")
    quota(api, tenant, limit=5_000, period=pb.PERIOD_DAY)
    commit(api, tenant, reserve(api, tenant, "u", 1_000).reservation.reservation_id, 1_000)
    after = api.AdjustBalance(
        pb.AdjustBalanceRequest(
            idempotency_key=new_id("a"), tenant_id=tenant, user_id="u", tokens=-300,
            reason="refund: truncated answer",
        )
    ).balance  # fmt: skip
    assert after.used == 700 and balance(api, tenant).used == 700
    adjusted = [e for e in _replay(api, tenant) if e.event_type == "BalanceAdjusted"]
    assert adjusted[0].amount == -300 and "truncated answer" in adjusted[0].data_json
    assert_log_explains_projections(database_url, tenant)


def test_soft_limit_warns_and_suggests_then_partial_grant_then_refusal_with_advice(
    api: Stub,
) -> None:
    """Past the 80 % soft threshold Reserve still succeeds, with a warning and a suggestion
    (what fits now, a cheaper model, compaction, when the day resets). A request larger than
    what is left gets the rest when it accepts a partial grant, and a refusal carrying the
    same advice when it does not."""
    tenant = new_id("t")
    quota(api, tenant, "u", limit=1_000, period=pb.PERIOD_DAY, soft_limit_percent=80)
    r = reserve(api, tenant, "u", 850)
    assert [(w.scope, w.percent_used, w.threshold_percent) for w in r.warnings] == [
        ("user", 85, 80)
    ]
    assert r.suggestion.max_amount_now == 150 and r.suggestion.cheaper_model == "gpt-4o-mini"
    assert r.suggestion.compact_context and r.suggestion.HasField("resets_at")
    assert not r.partial and r.requested == 850
    partial = reserve(api, tenant, "u", 400, min_amount=100)
    assert (partial.reservation.amount, partial.requested, partial.partial) == (150, 400, True)
    f = call_fails(api.Reserve, _request(tenant, "u", 10))
    assert f.reason == "BUDGET_EXHAUSTED" and f.metadata["reservable"] == "0"
    assert f.metadata["cheaper_model"] == "gpt-4o-mini" and "resets_at" in f.metadata
    f = call_fails(api.Reserve, _request(tenant, "u", 400, min_amount=100))
    assert f.reason == "BUDGET_EXHAUSTED" and (
        f.metadata["requested"],
        f.metadata["reservable"],
    ) == ("400", "0")


def _replay(api: Stub, tenant: str) -> list[pb.LedgerEvent]:
    return [
        e
        for chunk in api.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant))
        for e in chunk.events
    ]
