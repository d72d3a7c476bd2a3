"""SIGTERM's graceful stop: calls in flight finish, new calls are refused."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import ServerThread, new_id

REFUSAL_WAIT_S = 10


def test_in_flight_call_finishes_during_graceful_stop(database_url: str) -> None:
    server = ServerThread(database_url, sweep_interval_s=3600).start()
    tenant = new_id("t")
    reserve = pb.ReserveRequest(
        idempotency_key=new_id("k"), tenant_id=tenant, user_id="u", model="m", amount=10
    )
    with server.stub() as stub:
        stub.SetQuota(
            pb.SetQuotaRequest(
                idempotency_key=new_id("q"), tenant_id=tenant, limit=100, period=pb.PERIOD_NONE
            )
        )
        with psycopg.connect(database_url) as blocker, ThreadPoolExecutor(2) as pool:
            # Hold the tenant's row lock, so the Reserve below is stuck inside the server.
            blocker.execute(
                "SELECT 1 FROM accounts WHERE tenant_id = %s AND user_id = '' FOR UPDATE",
                (tenant,),
            )
            in_flight = pool.submit(stub.Reserve, reserve, timeout=30)
            time.sleep(0.5)
            assert not in_flight.done(), "the call was not held in flight"
            stopping = pool.submit(server.stop, 20)

            deadline = time.monotonic() + REFUSAL_WAIT_S
            while True:  # new calls are refused, retryably, once the stop has begun
                with grpc.insecure_channel(server.target) as fresh:
                    other = pb.GetBalanceRequest(tenant_id=tenant)
                    try:
                        pb_grpc.LedgerServiceStub(fresh).GetBalance(other, timeout=1)
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        break
                assert time.monotonic() < deadline, "new calls were still served"
                time.sleep(0.05)

            assert not in_flight.done()
            blocker.rollback()  # release the lock: the in-flight call may now finish
            result = in_flight.result(timeout=30)
            stopping.result(timeout=30)
    assert result.reservation.amount == 10
    assert result.reservation.state == pb.RESERVATION_STATE_HELD


def test_stop_ends_followers_instead_of_waiting_out_the_grace_period(database_url: str) -> None:
    """SubscribeEvents never ends by itself; a graceful stop ends it at once."""
    server = ServerThread(database_url, sweep_interval_s=3600).start()
    channel = grpc.insecure_channel(server.target)
    stream = pb_grpc.LedgerServiceStub(channel).SubscribeEvents(
        pb.SubscribeEventsRequest(tenant_id=new_id("t"))
    )
    with ThreadPoolExecutor(1) as pool:
        drained = pool.submit(lambda: list(stream))
        time.sleep(0.5)  # the follower is polling
        started = time.monotonic()
        server.stop(20)
        assert time.monotonic() - started < 5
        assert drained.result(timeout=10) == []
    channel.close()
