"""Budget alerts over gRPC: SetBudgetAlerts, the crossing logged as an event and shown on the
balance, and POSTed to a webhook (a real HTTP server here) that is retried when it fails."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import ServerThread, call_fails, event_count, new_id, verify_tenant


class Receiver:
    """An HTTP server that records the JSON bodies POSTed to it; the first `fail_first` answer
    503, as a receiver being restarted would."""

    def __init__(self, fail_first: int) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.attempts += 1
                ok = receiver.attempts > fail_first
                if ok:
                    receiver.bodies.append(body)
                self.send_response(200 if ok else 503)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/alerts"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def wait_for(self, bodies: int, timeout_s: float = 15) -> None:
        """Until `bodies` were received or the time is up (the assertions then say what came)."""
        deadline = time.monotonic() + timeout_s
        while len(self.bodies) < bodies and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.http.shutdown()


def _alerts(tenant: str, *thresholds: int, key: str = "") -> pb.SetBudgetAlertsRequest:
    return pb.SetBudgetAlertsRequest(
        idempotency_key=key or new_id("a"), tenant_id=tenant, user_id="u",
        thresholds_percent=list(thresholds),
    )  # fmt: skip


def _use(stub: pb_grpc.LedgerServiceStub, tenant: str, tokens: int) -> None:
    stub.RecordUsage(
        pb.RecordUsageRequest(
            idempotency_key=new_id("r"), tenant_id=tenant, user_id="u", model="m",
            usage=pb.Usage(input_tokens=tokens),
        )
    )  # fmt: skip


def _crossings(replay: list[pb.ReplayHistoryResponse]) -> list[dict[str, Any]]:
    """The data of the BudgetThresholdCrossed events of a replay, in log order."""
    return [
        json.loads(e.data_json)
        for r in replay
        for e in r.events
        if e.event_type == "BudgetThresholdCrossed"
    ]


def test_crossing_a_threshold_is_logged_shown_and_posted(
    database_url: str, receiver: Receiver
) -> None:
    server = ServerThread(database_url, alert_webhook_url=receiver.url).start()
    tenant = new_id("t")
    try:
        with server.stub() as stub:
            stub.SetQuota(
                pb.SetQuotaRequest(
                    idempotency_key=new_id("q"), tenant_id=tenant, user_id="u", limit=1_000,
                    period=pb.PERIOD_DAY,
                )
            )  # fmt: skip
            set_ = stub.SetBudgetAlerts(_alerts(tenant, 80, 50))
            assert list(set_.balance.alert_thresholds_percent) == [50, 80]
            _use(stub, tenant, 450)
            _use(stub, tenant, 100)  # 55 %: crosses 50
            _use(stub, tenant, 300)  # 85 %: crosses 80
            _use(stub, tenant, 10)
            balance = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="u"))
            replay = list(stub.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant)))
        receiver.wait_for(2)
    finally:
        server.stop()
    assert list(balance.balance.alerts_crossed_percent) == [50, 80]
    assert [c["threshold_percent"] for c in _crossings(replay)] == [50, 80]
    assert [(b["threshold_percent"], b["used"], b["capacity"]) for b in receiver.bodies] == [
        (50, 550, 1_000),
        (80, 850, 1_000),
    ]
    assert receiver.attempts == 3  # the first POST was refused (503) and retried


def test_set_budget_alerts_refuses_bad_input_and_writes_nothing(
    stub: pb_grpc.LedgerServiceStub, database_url: str
) -> None:
    tenant = new_id("t")
    before = event_count(database_url)
    for request, field in (
        (_alerts(tenant, 0), "thresholds_percent[0]"),
        (_alerts(tenant, 1_001), "thresholds_percent[0]"),
        (_alerts(tenant, 50, 50), "thresholds_percent"),
        (_alerts(tenant, *range(1, 12)), "thresholds_percent"),
        (_alerts(tenant, 50, key=" "), "idempotency_key"),
        (pb.SetBudgetAlertsRequest(idempotency_key="k", tenant_id="", thresholds_percent=[50]),
         "tenant_id"),
        (pb.SetBudgetAlertsRequest(idempotency_key="k", tenant_id=tenant, conversation_id="c",
                                   thresholds_percent=[50]), "conversation_id"),
    ):  # fmt: skip
        seen = call_fails(stub.SetBudgetAlerts, request)
        assert seen.code is grpc.StatusCode.INVALID_ARGUMENT, (request, seen)
        assert field in [f for f, _ in seen.field_violations], (request, seen)
    assert event_count(database_url) == before


def test_a_money_budget_crosses_the_thresholds_on_its_own_and_says_its_currency(
    database_url: str,
) -> None:
    """The thresholds watch the tokens and the money budget apart: each budget crosses each
    threshold once, a money crossing carries the currency and its figures in micro-units."""
    receiver = Receiver(fail_first=0)
    server = ServerThread(database_url, alert_webhook_url=receiver.url).start()
    tenant = new_id("t")
    try:
        with server.stub() as stub:
            dollar_per_mtok = pb.Price(model="m", currency="USD", input_micros_per_mtok=1_000_000)
            stub.SetPrices(
                pb.SetPricesRequest(
                    idempotency_key=new_id("p"), tenant_id=tenant, prices=[dollar_per_mtok]
                )
            )  # a token costs 1 µ
            stub.SetQuota(pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant,
                                             user_id="u", limit=2_000, period=pb.PERIOD_DAY,
                                             money_limit_micros=1_000))  # fmt: skip
            stub.SetBudgetAlerts(_alerts(tenant, 50, 80))
            _use(stub, tenant, 600)  # tokens 30 %, money 60 %: money crosses 50
            _use(stub, tenant, 300)  # tokens 45 %, money 90 %: money crosses 80
            _use(stub, tenant, 200)  # tokens 55 %: tokens cross 50; money 110 %, nothing new
            balance = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="u")).balance
            replay = list(stub.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant)))
        receiver.wait_for(3)
    finally:
        server.stop()
        receiver.http.shutdown()
    assert list(balance.alerts_crossed_percent) == [50]
    assert list(balance.money.alerts_crossed_percent) == [50, 80]
    assert [(c["threshold_percent"], c.get("currency")) for c in _crossings(replay)] == [
        (50, "USD"),
        (80, "USD"),
        (50, None),
    ]
    bodies = [
        (b["budget"], b["threshold_percent"], b["used"], b["capacity"], b.get("currency"))
        for b in receiver.bodies
    ]
    assert bodies == [
        ("money", 50, 600, 1_000, "USD"),
        ("money", 80, 900, 1_000, "USD"),
        ("tokens", 50, 1_100, 2_000, None),
    ]
    assert len({b["alert_id"] for b in receiver.bodies}) == 3
    assert verify_tenant(database_url, tenant).differences == []
