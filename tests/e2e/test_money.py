"""Money over the real API: prices in force across a change, costs in reports equal to
tokens times the price in force to the micro-unit (an exact rational reference, rounded up per
event), replay and as_of in money, money budgets under 64 concurrent clients, and bad inputs
refused with nothing written."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from math import ceil

import grpc
import psycopg
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import Clock, ServerThread, call_fails, new_id, stamp, verify_tenant

Stub = pb_grpc.LedgerServiceStub
CLIENTS = 64
MTOK = 10**6


@pytest.fixture
def clock() -> Clock:
    # In the future, as in test_budget_policy: the real-clock server's sweeper shares the db.
    return Clock(datetime(2099, 5, 1, 9, 0, tzinfo=UTC))


@pytest.fixture
def api(database_url: str, clock: Clock) -> Iterator[Stub]:
    server = ServerThread(
        database_url, clock=clock, sweep_interval_s=3600, cheaper_models={"gpt-4o": "gpt-4o-mini"}
    ).start()
    with server.stub() as stub:
        yield stub
    server.stop()


def price(model: str, inp: int, out: int, cached: int, currency: str = "USD",
          at: datetime | None = None) -> pb.Price:  # fmt: skip
    p = pb.Price(model=model, currency=currency, input_micros_per_mtok=inp,
                 output_micros_per_mtok=out, cached_input_micros_per_mtok=cached)  # fmt: skip
    if at is not None:
        p.effective_from.CopyFrom(stamp(at))
    return p


def set_prices(stub: Stub, tenant: str, *prices: pb.Price) -> pb.SetPricesResponse:
    return stub.SetPrices(
        pb.SetPricesRequest(idempotency_key=new_id("p"), tenant_id=tenant, prices=prices)
    )


def reserve(stub: Stub, tenant: str, user: str, amount: int, **fields: object) -> pb.Reservation:
    request = pb.ReserveRequest(idempotency_key=new_id("r"), tenant_id=tenant, user_id=user,
                                model=fields.pop("model", "gpt-4o"), amount=amount,
                                **fields)  # type: ignore[arg-type]  # fmt: skip
    return stub.Reserve(request).reservation


def commit(
    stub: Stub, tenant: str, rid: str, inp: int, out: int, cached: int = 0
) -> pb.Reservation:
    usage = pb.Usage(input_tokens=inp, output_tokens=out, cached_input_tokens=cached)
    return stub.Commit(
        pb.CommitRequest(tenant_id=tenant, reservation_id=rid, usage=usage)
    ).reservation


def reference_cost(usage: tuple[int, int, int], p: tuple[int, int, int]) -> int:
    """Tokens times price, exactly, rounded up to the micro-unit (the ledger's stated rule)."""
    return ceil(Fraction(sum(u * q for u, q in zip(usage, p, strict=True)), MTOK))


def usage_by_model(stub: Stub, tenant: str, since: datetime) -> dict[str, pb.UsageRow]:
    q = pb.UsageQuery(tenant_id=tenant, from_time=stamp(since),
                      to_time=stamp(since + timedelta(days=2)),
                      group_by=[pb.USAGE_DIMENSION_MODEL])  # fmt: skip
    reply = stub.QueryUsage(pb.QueryUsageRequest(query=q))
    assert reply.currency == "USD"
    return {r.model: r for r in reply.rows}


def test_costs_follow_the_price_in_force_and_reports_equal_tokens_times_price(
    api: Stub, clock: Clock, database_url: str
) -> None:
    tenant, t0 = new_id("t"), clock.now
    p1, p2 = (2_500_000, 10_000_000, 1_250_000), (3_000_000, 12_000_000, 1_500_000)
    set_prices(api, tenant, price("gpt-4o", *p1))
    set_prices(api, tenant, price("gpt-4o", *p2, at=t0 + timedelta(hours=2)))
    expected, charged = 0, []
    for step_h, usage in ((0, (1_234, 567, 89)), (1, (7, 3, 0)), (3, (40_000, 1_001, 999))):
        clock.now = t0 + timedelta(hours=step_h, minutes=1)
        res = reserve(api, tenant, "ann", 50_000, ttl_seconds=600)
        done = commit(api, tenant, res.reservation_id, *usage)
        in_force = p1 if step_h < 2 else p2
        assert done.cost_micros == reference_cost(usage, in_force)
        assert done.cost_micros <= res.money_held_micros
        expected += done.cost_micros
        charged.append(done.cost_micros)
    clock.now = t0 + timedelta(hours=3, minutes=5)
    api.RecordUsage(pb.RecordUsageRequest(idempotency_key=new_id("u"), tenant_id=tenant,
                                          user_id="ann", model="no-price-model",
                                          usage=pb.Usage(input_tokens=77)))  # fmt: skip
    recorded = api.RecordUsage(pb.RecordUsageRequest(
        idempotency_key=new_id("u"), tenant_id=tenant, user_id="ann", model="gpt-4o",
        usage=pb.Usage(output_tokens=333)))  # fmt: skip
    expected += reference_cost((0, 333, 0), p2)
    charged.append(reference_cost((0, 333, 0), p2))
    assert recorded.balance.money.used_total_micros == sum(charged)
    rows = usage_by_model(api, tenant, t0 - timedelta(hours=1))
    assert rows["gpt-4o"].cost_micros == expected and rows["gpt-4o"].unpriced_tokens == 0
    assert rows["no-price-model"].cost_micros == 0 and rows["no-price-model"].unpriced_tokens == 77
    user = api.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann"))
    assert user.currency == "USD" and user.balance.money.used_total_micros == expected
    # as_of in money: between the second and third calls only the first two were charged.
    at = stamp(t0 + timedelta(hours=2))
    between = api.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann", as_of=at))
    assert between.balance.money.used_total_micros == charged[0] + charged[1]
    assert between.currency == "USD"
    # Replay carries the prices and each cost as the log recorded them.
    events = [
        e for r in api.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant)) for e in r.events
    ]
    assert [e.event_type for e in events].count("PriceSet") == 2
    assert sum(1 for e in events if '"cost":' in e.data_json) == 4
    report = verify_tenant(database_url, tenant)
    assert not report.breaks and not report.differences, report.differences[:5]
    # A price edited in the table (around the ledger) is found: the log says otherwise.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE prices SET output_per_mtok = 1 WHERE tenant_id = %s AND "
                     "effective_from > %s", (tenant, t0))  # fmt: skip
    found = verify_tenant(database_url, tenant).differences
    assert [(d.kind, d.field) for d in found] == [("price", "price")]


def test_a_money_budget_is_never_overspent_by_64_concurrent_clients(api: Stub) -> None:
    tenant, limit = new_id("t"), 2_000_000  # 2 USD
    set_prices(api, tenant, price("gpt-4o", 2_500_000, 10_000_000, 1_250_000))
    api.SetQuota(pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant,
                                    user_id="ann", period=pb.PERIOD_DAY,
                                    money_limit_micros=limit))  # fmt: skip
    refused, granted = [0], [0]
    lock = threading.Lock()
    peak = [0]

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(6):
            amount = rnd.randint(1_000, 40_000)
            prompt = rnd.randint(0, amount)
            try:
                res = reserve(api, tenant, "ann", amount, prompt_tokens=prompt, min_amount=1)
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                with lock:
                    refused[0] += 1
                continue
            balance = api.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann"))
            money = balance.balance.money
            with lock:
                granted[0] += 1
                peak[0] = max(peak[0], money.held_micros + money.used_micros)
            got = res.amount
            cached = rnd.randint(0, min(prompt, got))
            done = commit(api, tenant, res.reservation_id,
                          min(prompt, got) - cached, got - min(prompt, got), cached)  # fmt: skip
            assert done.cost_micros <= res.money_held_micros

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    money = api.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann")).balance.money
    assert refused[0] > 0 and granted[0] > 0  # the budget did bind
    assert money.held_micros == 0 and money.used_micros <= limit and peak[0] <= limit


def test_a_rise_waits_for_live_holds_and_a_cut_applies_at_once(api: Stub, clock: Clock) -> None:
    tenant = new_id("t")
    set_prices(api, tenant, price("gpt-4o", 2_000_000, 8_000_000, 1_000_000))
    held = reserve(api, tenant, "ann", 10_000, ttl_seconds=600)
    expiry = held.expires_at.ToDatetime(tzinfo=UTC)
    rise = call_fails(api.SetPrices, pb.SetPricesRequest(
        idempotency_key=new_id("p"), tenant_id=tenant,
        prices=[price("gpt-4o", 2_000_000, 9_000_000, 1_000_000)]))  # fmt: skip
    assert rise.code is grpc.StatusCode.FAILED_PRECONDITION and rise.reason == "PRICE_REFUSED"
    assert rise.metadata["earliest"] == expiry.isoformat()
    listed = api.ListPrices(pb.ListPricesRequest(tenant_id=tenant)).prices
    assert [p.output_micros_per_mtok for p in listed] == [8_000_000]  # nothing written
    set_prices(api, tenant, price("gpt-4o", 1_000_000, 4_000_000, 500_000))  # a cut: at once
    done = commit(api, tenant, held.reservation_id, 5_000, 5_000)
    assert done.cost_micros == reference_cost((5_000, 5_000, 0), (1_000_000, 4_000_000, 500_000))
    # The rise, scheduled for when that hold would have ended, bounds holds that span it.
    set_prices(api, tenant, price("gpt-4o", 2_000_000, 9_000_000, 1_000_000, at=expiry))
    spanning = reserve(api, tenant, "bob", 1_000, ttl_seconds=600)
    assert spanning.money_held_micros == reference_cost((0, 1_000, 0), (0, 9_000_000, 0))
    clock.now = expiry + timedelta(seconds=1)
    after = commit(api, tenant, spanning.reservation_id, 0, 1_000)
    assert after.cost_micros == spanning.money_held_micros  # charged at the price in force


def test_a_money_budget_on_a_model_without_a_price_is_refused(api: Stub) -> None:
    tenant = new_id("t")
    set_prices(api, tenant, price("gpt-4o", 1, 1, 1))
    api.SetQuota(pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant,
                                    period=pb.PERIOD_MONTH,
                                    money_limit_micros=5_000_000))  # fmt: skip
    before = api.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann"))
    refused = call_fails(api.Reserve, pb.ReserveRequest(
        idempotency_key=new_id("r"), tenant_id=tenant, user_id="ann", model="unpriced-x",
        amount=100))  # fmt: skip
    assert refused.code is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.reason == "PRICE_MISSING" and "unpriced-x" in refused.message
    assert api.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann")) == before


def test_a_money_refusal_names_the_money_figures(api: Stub) -> None:
    tenant = new_id("t")
    set_prices(api, tenant, price("gpt-4o", 1_000_000, 1_000_000, 1_000_000))  # 1 µ a token
    api.SetQuota(pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant, user_id="ann",
                                    period=pb.PERIOD_DAY, money_limit_micros=500))  # fmt: skip
    refused = call_fails(api.Reserve, pb.ReserveRequest(
        idempotency_key=new_id("r"), tenant_id=tenant, user_id="ann", model="gpt-4o",
        amount=800))  # fmt: skip
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.metadata["currency"] == "USD" and refused.metadata["reservable"] == "500"
    assert "500 µUSD available" in refused.message
    partial = reserve(api, tenant, "ann", 800, min_amount=100)
    assert partial.amount == 500 and partial.money_held_micros == 500


def test_the_suggestion_names_the_cheaper_model_with_its_price(api: Stub) -> None:
    tenant = new_id("t")
    mini = price("gpt-4o-mini", 150_000, 600_000, 75_000)
    set_prices(api, tenant, price("gpt-4o", 2_500_000, 10_000_000, 1_250_000), mini)
    api.SetQuota(pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant, user_id="ann",
                                    period=pb.PERIOD_DAY, money_limit_micros=5_000))  # fmt: skip
    request = pb.ReserveRequest(idempotency_key=new_id("r"), tenant_id=tenant, user_id="ann",
                                model="gpt-4o", amount=1_000, min_amount=1)  # fmt: skip
    suggestion = api.Reserve(request).suggestion
    assert suggestion.cheaper_model == "gpt-4o-mini"
    got = suggestion.cheaper_model_price
    assert (got.model, got.output_micros_per_mtok, got.currency) == ("gpt-4o-mini", 600_000, "USD")
    refused = call_fails(api.Reserve, pb.ReserveRequest(
        idempotency_key=new_id("r"), tenant_id=tenant, user_id="ann", model="gpt-4o",
        amount=1_000))  # fmt: skip
    assert refused.metadata["cheaper_model"] == "gpt-4o-mini"
    assert refused.metadata["cheaper_model_price"] == (
        "USD micro-units per 1M tokens: input 150000, output 600000, cached input 75000"
    )


BAD_PRICES = [
    (price("gpt-4o", -1, 0, 0), "prices[1].input_micros_per_mtok"),
    (price("gpt-4o", 0, 10**10 + 1, 0), "prices[1].output_micros_per_mtok"),
    (price("gpt-4o", 1, 1, 1, currency="XYZ"), "prices[1].currency"),
    (price("gpt-4o", 1, 1, 1, currency="usd"), "prices[1].currency"),
    (price("gpt-4o", 1, 1, 1, currency=""), "prices[1].currency"),
    (price("", 1, 1, 1), "prices[1].model"),
    (price("gpt-4o", 1, 1, 1, at=datetime(2098, 1, 1, tzinfo=UTC)), "prices[1].effective_from"),
    (price("gpt-4o", 1, 1, 1, at=datetime(2101, 1, 1, tzinfo=UTC)), "prices[1].effective_from"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_PRICES)
def test_bad_prices_are_refused_with_nothing_written(api: Stub, bad: pb.Price, field: str) -> None:
    tenant = new_id("t")
    good = price("gpt-4o-mini", 150_000, 600_000, 75_000)
    request = pb.SetPricesRequest(idempotency_key=new_id("p"), tenant_id=tenant,
                                  prices=[good, bad])  # fmt: skip
    f = call_fails(api.SetPrices, request)
    assert f.code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in [v[0] for v in f.field_violations], f.field_violations
    assert not api.ListPrices(pb.ListPricesRequest(tenant_id=tenant)).prices


def test_a_second_currency_and_empty_or_oversized_calls_are_refused(api: Stub) -> None:
    tenant = new_id("t")
    set_prices(api, tenant, price("gpt-4o", 1, 1, 1))
    other = call_fails(api.SetPrices, pb.SetPricesRequest(
        idempotency_key=new_id("p"), tenant_id=tenant,
        prices=[price("claude", 1, 1, 1, currency="EUR")]))  # fmt: skip
    assert other.reason == "PRICE_REFUSED" and other.metadata["currency"] == "USD"
    for prices in ([], [price(f"m{i}", 1, 1, 1) for i in range(1_001)]):
        f = call_fails(api.SetPrices, pb.SetPricesRequest(
            idempotency_key=new_id("p"), tenant_id=tenant, prices=prices))  # fmt: skip
        assert [v[0] for v in f.field_violations] == ["prices"]
    twice = call_fails(api.SetPrices, pb.SetPricesRequest(
        idempotency_key=new_id("p"), tenant_id=tenant,
        prices=[price("a", 1, 1, 1), price("a", 2, 2, 2)]))  # fmt: skip
    assert "prices[1].model" in [v[0] for v in twice.field_violations]
    assert [p.model for p in api.ListPrices(pb.ListPricesRequest(tenant_id=tenant)).prices] == [
        "gpt-4o"
    ]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SetQuotaRequest(tenant_id="t", period=pb.PERIOD_DAY, money_limit_micros=-1),
         "money_limit_micros"),
        (pb.ReserveRequest(tenant_id="t", user_id="u", model="m", amount=5, prompt_tokens=6),
         "prompt_tokens"),
        (pb.GrantTokensRequest(tenant_id="t", money_micros=-5), "money_micros"),
        (pb.GrantTokensRequest(tenant_id="t"), "amount"),
        (pb.AdjustBalanceRequest(tenant_id="t", reason="r", money_micros=10**16), "money_micros"),
        (pb.ListPricesRequest(tenant_id="t", model="bad model"), "model"),
    ],
)  # fmt: skip
def test_bad_money_fields_are_refused(api: Stub, request_: object, field: str) -> None:
    name = type(request_).__name__.removesuffix("Request")
    if hasattr(request_, "idempotency_key"):
        request_.idempotency_key = new_id("k")  # type: ignore[attr-defined]
    f = call_fails(getattr(api, name), request_)
    assert f.code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in [v[0] for v in f.field_violations], f.field_violations


def test_money_grants_and_corrections_move_the_money_budget(api: Stub) -> None:
    tenant = new_id("t")
    set_prices(api, tenant, price("gpt-4o", 1_000_000, 1_000_000, 1_000_000))
    api.SetQuota(pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant, user_id="ann",
                                    period=pb.PERIOD_DAY, money_limit_micros=1_000))  # fmt: skip
    granted = api.GrantTokens(pb.GrantTokensRequest(
        idempotency_key=new_id("g"), tenant_id=tenant, user_id="ann", money_micros=500,
        reason="credit")).balance.money  # fmt: skip
    assert granted.granted_micros == 500 and granted.available_micros == 1_500
    adjusted = api.AdjustBalance(pb.AdjustBalanceRequest(
        idempotency_key=new_id("a"), tenant_id=tenant, user_id="ann", money_micros=200,
        reason="manual charge")).balance.money  # fmt: skip
    assert adjusted.used_micros == 200 and adjusted.available_micros == 1_300
    assert reserve(api, tenant, "ann", 5_000, min_amount=1).amount == 1_300


def test_money_soft_limits_warn_and_a_day_quota_resets_at_midnight(api: Stub, clock: Clock) -> None:
    tenant = new_id("t")
    set_prices(api, tenant, price("gpt-4o", 1_000_000, 1_000_000, 1_000_000))  # 1 µ a token
    api.SetQuota(pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant, user_id="ann",
                                    period=pb.PERIOD_DAY, soft_limit_percent=50,
                                    money_limit_micros=1_000))  # fmt: skip
    request = pb.ReserveRequest(idempotency_key=new_id("r"), tenant_id=tenant, user_id="ann",
                                model="gpt-4o", amount=600)  # fmt: skip
    warned = api.Reserve(request)
    assert [(w.account, w.percent_used, w.currency) for w in warned.warnings] == [
        (f"{tenant}/ann", 60, "USD")
    ]
    commit(api, tenant, warned.reservation.reservation_id, 0, 600)
    assert call_fails(api.Reserve, pb.ReserveRequest(
        idempotency_key=new_id("r"), tenant_id=tenant, user_id="ann", model="gpt-4o",
        amount=600)).reason == "BUDGET_EXHAUSTED"  # fmt: skip
    clock.now = clock.now.replace(hour=0) + timedelta(days=1)  # the next day, UTC
    money = api.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann")).balance.money
    assert (money.used_micros, money.available_micros, money.used_total_micros) == (0, 1_000, 600)
    assert reserve(api, tenant, "ann", 600).money_held_micros == 600
