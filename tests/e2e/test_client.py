"""The Python client (services.client) against a real ledger server: every RPC through the
blocking and the asyncio client, hold() (success, exception, retry with the same key after a
forced UNAVAILABLE), typed errors from ErrorInfo, and bad inputs refused with clear errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import (
    AsyncLedgerClient,
    BadCredentials,
    BadTarget,
    BudgetExhausted,
    DeadlineExceeded,
    HoldError,
    IdempotencyKeyReused,
    InvalidArgument,
    LedgerClient,
    LedgerUnavailable,
    PermissionDenied,
    RateLimited,
    ReservationEnded,
    ReservationNotFound,
    Unauthenticated,
)
from services.client.errors import from_serialized_status
from tests.grpc_proxy import LOSE_REPLY, LOSE_REQUEST, FlakyProxy
from tests.support import ServerThread, create_key, free_port, new_id, stamp


@pytest.fixture
def client(ledger: ServerThread) -> Iterator[LedgerClient]:
    with LedgerClient(ledger.target) as c:
        yield c


@pytest.fixture
def tenant(client: LedgerClient) -> str:
    """A tenant whose user `ann` may spend 1,000 tokens (no period)."""
    t = new_id("t")
    client.set_quota(tenant_id=t, user_id="ann", limit=1_000, period=pb.PERIOD_NONE)
    return t


def _held(client: LedgerClient, tenant: str, user: str = "ann") -> tuple[int, int]:
    balance = client.get_balance(tenant_id=tenant, user_id=user).balance
    return balance.held, balance.used


def _last_hour(tenant: str) -> pb.UsageQuery:
    now = datetime.now(UTC)
    return pb.UsageQuery(
        tenant_id=tenant,
        from_time=stamp(now - timedelta(hours=1)),
        to_time=stamp(now + timedelta(hours=1)),
    )


# --- every RPC ---------------------------------------------------------------------------------


def test_reserve_commit_rollback_and_reads_through_the_blocking_client(
    client: LedgerClient, tenant: str
) -> None:
    r = client.reserve(tenant_id=tenant, user_id="ann", model="gpt-4o", amount=300)
    assert r.reservation.state == pb.RESERVATION_STATE_HELD and r.reservation.amount == 300
    assert r.reservation.labels == {} and _held(client, tenant) == (300, 0)
    usage = pb.Usage(input_tokens=100, output_tokens=50, cached_input_tokens=20)
    c = client.commit(tenant_id=tenant, reservation_id=r.reservation.reservation_id, usage=usage)
    assert (c.committed, c.released, c.overage) == (170, 130, 0)
    got = client.get_reservation(tenant_id=tenant, reservation_id=r.reservation.reservation_id)
    assert got.reservation.state == pb.RESERVATION_STATE_COMMITTED
    assert got.reservation.usage == usage
    r2 = client.reserve(tenant_id=tenant, user_id="ann", model="gpt-4o", amount=50)
    rb = client.rollback(tenant_id=tenant, reservation_id=r2.reservation.reservation_id)
    assert rb.released == 50 and _held(client, tenant) == (0, 170)
    assert client.get_balance(tenant_id=tenant, user_id="ann").reservable == 830
    stats = client.get_output_stats(tenant_id=tenant, user_id="ann", model="gpt-4o", min_samples=1)
    assert (stats.samples, stats.p95_output_tokens) == (1, 50)
    prices = [pb.Price(model="gpt-4o", currency="USD", input_micros_per_mtok=1)]
    assert client.set_prices(tenant_id=tenant, prices=prices).prices[0].currency == "USD"
    assert client.list_prices(tenant_id=tenant).currency == "USD"


def test_a_write_without_a_key_gets_a_fresh_one_and_a_given_key_is_one_outcome(
    client: LedgerClient, tenant: str
) -> None:
    a = client.reserve(tenant_id=tenant, user_id="ann", model="m", amount=10)
    b = client.reserve(tenant_id=tenant, user_id="ann", model="m", amount=10)
    assert a.reservation.reservation_id != b.reservation.reservation_id
    c = client.reserve(idempotency_key="k-1", tenant_id=tenant, user_id="ann", model="m", amount=5)
    d = client.reserve(idempotency_key="k-1", tenant_id=tenant, user_id="ann", model="m", amount=5)
    assert c.reservation.reservation_id == d.reservation.reservation_id
    assert _held(client, tenant) == (25, 0)


def test_admin_rpcs_set_rate_limits_alerts_grants_and_adjustments(
    client: LedgerClient, tenant: str
) -> None:
    limit = client.set_rate_limit(tenant_id=tenant, user_id="ann", tokens_per_minute=600)
    assert limit.rate_limit.tokens_per_minute == 600
    alerts = client.set_budget_alerts(tenant_id=tenant, user_id="ann", thresholds_percent=[50])
    assert list(alerts.balance.alert_thresholds_percent) == [50]
    expires = stamp(datetime.now(UTC) + timedelta(days=1))
    grant = client.grant_tokens(
        tenant_id=tenant, user_id="ann", amount=200, expires_at=expires, reason="promo"
    )
    assert grant.balance.granted == 200 and grant.balance.available == 1_200
    adjusted = client.adjust_balance(tenant_id=tenant, user_id="ann", tokens=30, reason="fix")
    assert adjusted.balance.used == 30


def test_batches_give_each_item_its_outcome_and_a_refused_item_decodes_to_its_typed_error(
    client: LedgerClient, tenant: str
) -> None:
    items = [
        pb.ReserveRequest(user_id="ann", model="m", amount=600),
        pb.ReserveRequest(user_id="ann", model="m", amount=600),  # does not fit after the first
    ]
    reserved = client.reserve_batch(tenant_id=tenant, items=items)
    first, second = reserved.results
    assert first.WhichOneof("outcome") == "reserved"
    refusal = from_serialized_status(second.refused)
    assert isinstance(refusal, BudgetExhausted) and refusal.available == 400
    rid = first.reserved.reservation.reservation_id
    committed = client.commit_batch(
        tenant_id=tenant,
        items=[pb.CommitRequest(reservation_id=rid, usage=pb.Usage(output_tokens=5))],
    )
    assert committed.results[0].committed.committed == 5
    again = client.rollback_batch(tenant_id=tenant, items=[pb.RollbackRequest(reservation_id=rid)])
    ended = from_serialized_status(again.results[0].refused)
    assert isinstance(ended, ReservationEnded) and ended.state == "committed"


def test_usage_queries_replay_verify_and_the_event_feed(client: LedgerClient, tenant: str) -> None:
    client.record_usage(
        tenant_id=tenant, user_id="ann", model="gpt-4o", usage=pb.Usage(input_tokens=7)
    )
    query = _last_hour(tenant)
    page = client.query_usage(query=query)
    assert [row.input_tokens for row in page.rows] == [7]
    assert [r.row.usage_records for r in client.export_usage(query=query)] == [1]
    chunks = list(client.replay_history(tenant_id=tenant))
    events = [e.event_type for chunk in chunks for e in chunk.events]
    assert events == ["QuotaSet", "UsageRecorded"]
    assert chunks[-1].end.complete and chunks[-1].end.events == len(events)
    report = client.verify_audit(tenant_id=tenant)
    assert report.chains_ok and report.projections_match and report.events_checked == len(events)
    feed = client.subscribe_events(tenant_id=tenant, timeout_s=5)
    followed = [next(feed).event.event_type for _ in range(len(events))]
    assert followed == events


def test_a_stream_that_runs_past_its_deadline_ends_deadline_exceeded(
    client: LedgerClient, tenant: str
) -> None:
    feed = client.subscribe_events(tenant_id=tenant, timeout_s=0.5)
    with pytest.raises(DeadlineExceeded):
        list(feed)


def test_every_rpc_through_the_asyncio_client(ledger: ServerThread) -> None:
    async def run() -> list[str]:
        t = new_id("t")
        async with AsyncLedgerClient(ledger.target) as c:
            await c.set_quota(tenant_id=t, user_id="ann", limit=500, period=pb.PERIOD_DAY)
            await c.set_rate_limit(tenant_id=t, user_id="ann", requests_per_minute=1000)
            await c.set_budget_alerts(tenant_id=t, user_id="ann", thresholds_percent=[90])
            await c.grant_tokens(tenant_id=t, user_id="ann", amount=10, reason="r")
            await c.adjust_balance(tenant_id=t, user_id="ann", tokens=-5, reason="r")
            r = await c.reserve(tenant_id=t, user_id="ann", model="m", amount=100)
            rid = r.reservation.reservation_id
            await c.commit(tenant_id=t, reservation_id=rid, usage=pb.Usage(output_tokens=40))
            await c.get_reservation(tenant_id=t, reservation_id=rid)
            b = await c.reserve_batch(
                tenant_id=t, items=[pb.ReserveRequest(user_id="ann", model="m", amount=3)]
            )
            rid2 = b.results[0].reserved.reservation.reservation_id
            await c.rollback(tenant_id=t, reservation_id=rid2)
            r3 = await c.reserve(tenant_id=t, user_id="ann", model="m", amount=4)
            rid3 = r3.reservation.reservation_id
            await c.commit_batch(
                tenant_id=t,
                items=[pb.CommitRequest(reservation_id=rid3, usage=pb.Usage(input_tokens=1))],
            )
            r4 = await c.reserve(tenant_id=t, user_id="ann", model="m", amount=4)
            await c.rollback_batch(
                tenant_id=t,
                items=[pb.RollbackRequest(reservation_id=r4.reservation.reservation_id)],
            )
            await c.record_usage(
                tenant_id=t, user_id="ann", model="m", usage=pb.Usage(input_tokens=2)
            )
            balance = await c.get_balance(tenant_id=t, user_id="ann")
            assert (balance.balance.used, balance.balance.held) == (40 - 5 + 1 + 2, 0)
            query = _last_hour(t)
            assert (await c.query_usage(query=query)).rows[0].total_tokens == 43
            assert [x.row.commits async for x in c.export_usage(query=query)] == [2]
            assert (await c.verify_audit(tenant_id=t)).chains_ok
            events = [
                e.event_type async for chunk in c.replay_history(tenant_id=t) for e in chunk.events
            ]
            feed = c.subscribe_events(tenant_id=t, timeout_s=5)
            followed = [(await anext(feed)).event.event_type for _ in events]
            assert followed == events
            return events

    events = asyncio.run(run())
    assert events.count("ReservationCommitted") >= 2 and "ReservationRolledBack" in events


# --- hold() ------------------------------------------------------------------------------------


def test_hold_reserves_on_enter_and_commits_what_the_block_reports(
    client: LedgerClient, tenant: str
) -> None:
    with client.hold(tenant_id=tenant, user_id="ann", model="gpt-4o", amount=400) as h:
        assert h.granted == 400 and not h.partial and _held(client, tenant) == (400, 0)
        h.report(input_tokens=120, output_tokens=80, cached_input_tokens=10)
    assert h.committed is not None and h.committed.released == 190
    assert _held(client, tenant) == (0, 210)


def test_hold_rolls_back_when_the_block_raises_and_the_exception_goes_on(
    client: LedgerClient, tenant: str
) -> None:
    hold = client.hold(tenant_id=tenant, user_id="ann", model="gpt-4o", amount=400)
    with pytest.raises(RuntimeError, match="model failed"), hold as h:
        h.report(input_tokens=1)
        raise RuntimeError("model failed")
    assert h.rolled_back is not None and h.rolled_back.released == 400
    state = client.get_reservation(tenant_id=tenant, reservation_id=h.reservation_id)
    assert state.reservation.state == pb.RESERVATION_STATE_ROLLED_BACK
    assert _held(client, tenant) == (0, 0)


def test_hold_that_reports_nothing_is_rolled_back(client: LedgerClient, tenant: str) -> None:
    with client.hold(tenant_id=tenant, user_id="ann", model="m", amount=10) as h:
        pass
    assert h.state == "rolled back" and _held(client, tenant) == (0, 0)


def test_hold_with_min_amount_takes_a_partial_grant(client: LedgerClient, tenant: str) -> None:
    with client.hold(tenant_id=tenant, user_id="ann", model="m", amount=5_000, min_amount=100) as h:
        assert h.partial and h.granted == 1_000
        h.report(output_tokens=999)
    assert _held(client, tenant) == (0, 999)


@pytest.mark.parametrize("lose", [LOSE_REQUEST, LOSE_REPLY])
def test_hold_retried_by_grpc_after_a_forced_unavailable_sends_the_same_key_and_holds_once(
    ledger: ServerThread, tenant: str, client: LedgerClient, lose: str
) -> None:
    """A proxy fails the first Reserve and the first Commit UNAVAILABLE (before the ledger saw
    them, or after it answered); gRPC's retry policy sends the identical request again, and
    the ledger holds and commits once."""
    proxy = FlakyProxy(ledger.target, {"Reserve": 1, "Commit": 1}, lose).start()
    try:
        flaky = LedgerClient(proxy.target)
        with flaky, flaky.hold(tenant_id=tenant, user_id="ann", model="m", amount=300) as h:
            assert _held(client, tenant) == (300, 0)
            h.report(input_tokens=40)
    finally:
        proxy.stop()
    first, second = proxy.sent("Reserve")
    assert (
        first == second and pb.ReserveRequest.FromString(first).idempotency_key == h.idempotency_key
    )
    assert len(proxy.sent("Commit")) == 2
    assert _held(client, tenant) == (0, 40)


def test_with_one_attempt_the_forced_unavailable_reaches_the_caller_as_ledger_unavailable(
    ledger: ServerThread, tenant: str
) -> None:
    proxy = FlakyProxy(ledger.target, {"Reserve": 1}, LOSE_REQUEST).start()
    try:
        with (
            LedgerClient(proxy.target, max_attempts=1) as flaky,
            pytest.raises(LedgerUnavailable, match="the request was lost"),
        ):
            flaky.reserve(tenant_id=tenant, user_id="ann", model="m", amount=1)
    finally:
        proxy.stop()
    assert len(proxy.sent("Reserve")) == 1


def test_a_refusal_is_not_retried(ledger: ServerThread, tenant: str) -> None:
    """Only UNAVAILABLE and DEADLINE_EXCEEDED are retryable: a budget refusal is sent once."""
    proxy = FlakyProxy(ledger.target).start()
    try:
        with LedgerClient(proxy.target) as c, pytest.raises(BudgetExhausted):
            c.reserve(tenant_id=tenant, user_id="ann", model="m", amount=10_000)
    finally:
        proxy.stop()
    assert len(proxy.sent("Reserve")) == 1


def test_hold_committed_twice_or_used_out_of_order_is_a_clear_error(
    client: LedgerClient, tenant: str
) -> None:
    h = client.hold(tenant_id=tenant, user_id="ann", model="m", amount=10)
    with pytest.raises(HoldError, match="never reserved"):
        h.commit(pb.Usage(input_tokens=1))
    with pytest.raises(HoldError, match="not reserved yet"):
        _ = h.granted
    with h:
        with pytest.raises(HoldError, match="nothing to commit"):
            h.commit()
        with pytest.raises(HoldError, match="output_tokens must be a non-negative int"):
            h.report(output_tokens=-1)
        h.commit(pb.Usage(input_tokens=3))
        with pytest.raises(HoldError, match=f"{h.reservation_id}: it was already committed"):
            h.commit(pb.Usage(input_tokens=3))
        with pytest.raises(HoldError, match="already committed"):
            h.rollback()
        with pytest.raises(HoldError, match="already committed"):
            h.report(input_tokens=1)
    with pytest.raises(HoldError, match="entered once"), h:
        pass
    assert _held(client, tenant) == (0, 3)


def test_async_hold_commits_on_success_and_rolls_back_on_error(
    ledger: ServerThread, tenant: str, client: LedgerClient
) -> None:
    async def run() -> None:
        async with AsyncLedgerClient(ledger.target) as c:
            async with c.hold(tenant_id=tenant, user_id="ann", model="m", amount=100) as h:
                h.report(output_tokens=60)
            assert h.committed is not None and h.committed.committed == 60
            with pytest.raises(ValueError, match="boom"):
                async with c.hold(tenant_id=tenant, user_id="ann", model="m", amount=100) as h2:
                    raise ValueError("boom")
            assert h2.rolled_back is not None
            with pytest.raises(HoldError, match="already rolled back"):
                await h2.commit(pb.Usage(input_tokens=1))

    asyncio.run(run())
    assert _held(client, tenant) == (0, 60)


def test_a_hold_whose_rollback_fails_keeps_the_blocks_exception_with_a_note(
    ledger: ServerThread, tenant: str
) -> None:
    proxy = FlakyProxy(ledger.target, {"Rollback": 4}, LOSE_REQUEST).start()
    try:
        c = LedgerClient(proxy.target)
        with (
            c,
            pytest.raises(KeyError) as caught,
            c.hold(tenant_id=tenant, user_id="ann", model="m", amount=10),
        ):
            raise KeyError("x")
    finally:
        proxy.stop()
    assert any("the hold ends at its expiry" in note for note in caught.value.__notes__)


# --- typed errors --------------------------------------------------------------------------------


def test_budget_exhausted_carries_requested_available_reservable_resets_at_and_advice(
    client: LedgerClient,
) -> None:
    t = new_id("t")
    client.set_quota(tenant_id=t, user_id="ann", limit=100, period=pb.PERIOD_DAY)
    with pytest.raises(BudgetExhausted) as caught:
        client.reserve(tenant_id=t, user_id="ann", model="gpt-4o", amount=250)
    e = caught.value
    assert (e.requested, e.available, e.limit, e.reservable) == (250, 100, 100, 100)
    assert e.scope == "user" and e.account == f"{t}/ann"
    assert e.resets_at is not None and e.resets_at > datetime.now(UTC)
    assert e.suggestion.max_amount_now == 100 and e.suggestion.resets_at == e.resets_at
    assert e.reason == "BUDGET_EXHAUSTED" and "requested 250" in e.message


def test_rate_limited_carries_retry_after(client: LedgerClient, tenant: str) -> None:
    client.set_rate_limit(tenant_id=tenant, user_id="ann", tokens_per_minute=100)
    client.reserve(tenant_id=tenant, user_id="ann", model="m", amount=90)
    with pytest.raises(RateLimited) as caught:
        client.reserve(tenant_id=tenant, user_id="ann", model="m", amount=60)
    e = caught.value
    assert e.kind == "tokens" and e.per_minute == 100 and e.reservable == 10
    assert e.retry_after is not None and timedelta(0) < e.retry_after <= timedelta(seconds=60)


def test_other_refusals_map_to_their_classes(client: LedgerClient, tenant: str) -> None:
    with pytest.raises(InvalidArgument) as bad:
        client.reserve(tenant_id=tenant, user_id="ann", model="m", amount=-1)
    assert [f for f, _ in bad.value.field_violations] == ["amount"]
    with pytest.raises(ReservationNotFound):
        client.commit(tenant_id=tenant, reservation_id="rsv_nope", usage=pb.Usage(input_tokens=1))
    client.reserve(idempotency_key="same", tenant_id=tenant, user_id="ann", model="m", amount=1)
    with pytest.raises(IdempotencyKeyReused) as reused:
        client.reserve(idempotency_key="same", tenant_id=tenant, user_id="ann", model="m", amount=2)
    assert reused.value.field == "amount"


def test_a_missing_or_wrong_api_key_is_unauthenticated_and_a_reader_cannot_reserve(
    database_url: str,
) -> None:
    server = ServerThread(database_url, auth_mode="api_key").start()
    t = new_id("t")
    try:
        with (
            LedgerClient(server.target) as anonymous,
            pytest.raises(Unauthenticated, match="no API key"),
        ):
            anonymous.get_balance(tenant_id=t, user_id="ann")
        reader = create_key(database_url, t, "reader")
        with LedgerClient(server.target, api_key=reader.token) as c:
            assert c.get_balance(tenant_id=t, user_id="ann").balance.tenant_id == t
            with pytest.raises(PermissionDenied, match="writer"):
                c.reserve(tenant_id=t, user_id="ann", model="m", amount=1)
        forged = "tlk_" + "0" * 16 + "_" + "1" * 64
        with LedgerClient(server.target, api_key=forged) as c, pytest.raises(Unauthenticated):
            c.get_balance(tenant_id=t, user_id="ann")
    finally:
        server.stop()


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("localhost", "not host:port"),
        ("127.0.0.1:0", "not host:port"),
        ("127.0.0.1:99999", "not host:port"),
        ("http://127.0.0.1:50051", "not host:port"),
        ("a b:1", "whitespace"),
    ],
)
def test_a_bad_target_is_refused_at_construction(target: str, said: str) -> None:
    with pytest.raises(BadTarget, match=said):
        LedgerClient(target)
    with pytest.raises(BadTarget, match=said):
        AsyncLedgerClient(target)


def test_a_target_where_nothing_listens_fails_fast_naming_it() -> None:
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with LedgerClient(target, timeout_s=5) as c, pytest.raises(LedgerUnavailable, match=target):
        c.get_balance(tenant_id="t", user_id="u")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"api_key": ""}, "API key is empty"),
        ({"api_key": "sk-openai-style"}, "API key is malformed"),
        ({"client_certificate": "/x.pem"}, "go together"),
        ({"root_certificates": "/nonexistent/ca.pem"}, "cannot be read"),
        ({"timeout_s": 0}, "positive"),
        ({"max_attempts": 6}, "max_attempts must be 1 to 5"),
    ],
)
def test_bad_credentials_and_settings_are_refused_with_what_to_do(
    kwargs: dict[str, object], said: str
) -> None:
    with pytest.raises((BadCredentials, ValueError), match=said):
        LedgerClient("127.0.0.1:50051", **kwargs)  # type: ignore[arg-type]


def test_a_field_the_request_does_not_have_is_a_type_error_naming_it(client: LedgerClient) -> None:
    with pytest.raises(TypeError, match="ReserveRequest has no field amout"):
        client.reserve(tenant_id="t", user_id="u", model="m", amout=5)  # type: ignore[call-arg]


def test_tls_and_mtls_to_a_tls_ledger_with_its_ca(database_url: str, tmp_path: Path) -> None:
    """TLS verified by a private CA works; mTLS with a client certificate works; plaintext to
    a TLS port is unavailable (with one attempt: no point retrying a protocol mismatch)."""
    import grpc

    from tests.certs import CertAuthority

    ca = CertAuthority(tmp_path / "ca")
    key, chain = ca.server().read()
    creds = grpc.ssl_server_credentials([(key, chain)])
    server = ServerThread(database_url, credentials=creds).start()
    t = new_id("t")
    client_pair = ca.client("billing-svc")
    try:
        with LedgerClient(f"localhost:{server.port}", root_certificates=ca.cert) as c:
            assert c.get_balance(tenant_id=t, user_id="u").balance.tenant_id == t
        with LedgerClient(
            f"localhost:{server.port}", root_certificates=ca.cert,
            client_certificate=client_pair.cert, client_key=client_pair.key,
        ) as m:  # fmt: skip
            assert m.get_balance(tenant_id=t, user_id="u").balance.tenant_id == t
        plain = LedgerClient(f"localhost:{server.port}", max_attempts=1)
        with plain, pytest.raises(LedgerUnavailable):
            plain.get_balance(tenant_id=t, user_id="u")
    finally:
        server.stop()
