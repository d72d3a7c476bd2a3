"""A client that cancels or times out mid-call leaves either the whole effect or none of it,
and its retry with the same request converges on one effect."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import ServerThread, new_id

RETRY_TIMEOUT_S = 30


def _events(url: str, tenant: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT event_type, idempotency_key, reservation_id FROM events WHERE tenant_id = %s",
            (tenant,),
        ).fetchall()


def test_timed_out_call_completes_whole_and_its_retry_gets_the_same_answer(
    ledger: ServerThread, database_url: str
) -> None:
    """A call stuck on a row lock times out at the client; the server still applies all of
    it once the lock is free, and the retry returns that result without a second effect."""
    tenant = new_id("t")
    request = pb.ReserveRequest(
        idempotency_key=new_id("k"), tenant_id=tenant, user_id="u", model="m", amount=10
    )
    with ledger.stub() as stub:
        stub.RecordUsage(
            pb.RecordUsageRequest(
                idempotency_key=new_id("u"),
                tenant_id=tenant,
                user_id="u",
                model="m",
                usage=pb.Usage(input_tokens=1),
            )
        )
        with psycopg.connect(database_url) as blocker:
            blocker.execute(
                "SELECT 1 FROM accounts WHERE tenant_id = %s AND user_id = '' FOR UPDATE",
                (tenant,),
            )
            try:
                stub.Reserve(request, timeout=0.3)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                raise AssertionError("the call should have timed out on the lock")
        # the lock is released: the server finishes the call it had started
        retried = stub.Reserve(request, timeout=RETRY_TIMEOUT_S)
        assert stub.Reserve(request, timeout=RETRY_TIMEOUT_S) == retried
    reserved = [e for e in _events(database_url, tenant) if e[0] == "TokensReserved"]
    assert reserved == [
        ("TokensReserved", request.idempotency_key, retried.reservation.reservation_id)
    ]


def test_random_deadlines_and_cancellations_converge_on_one_effect_each(
    ledger: ServerThread, database_url: str
) -> None:
    """Reserve and Commit calls with deadlines of a few milliseconds, or cancelled right
    away, then retried until they succeed: each key and each commit is applied exactly once."""
    tenant = new_id("t")
    rng = random.Random(7)
    interrupted: list[str] = []
    with grpc.insecure_channel(ledger.target) as channel:
        stub = pb_grpc.LedgerServiceStub(channel)

        def impatient(method: grpc.UnaryUnaryMultiCallable, request: object) -> None:
            if rng.random() < 0.5:
                call = method.future(request)
                time.sleep(rng.uniform(0, 0.004))
                if call.cancel():
                    interrupted.append("cancelled")
                return
            try:
                method(request, timeout=rng.uniform(0.0005, 0.02))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                interrupted.append("deadline")

        def cycle(n: int) -> tuple[str, int]:
            reserve = pb.ReserveRequest(
                idempotency_key=f"k{n}", tenant_id=tenant, user_id=f"u{n % 4}", model="m",
                amount=50,
            )  # fmt: skip
            impatient(stub.Reserve, reserve)
            rid = stub.Reserve(reserve, timeout=RETRY_TIMEOUT_S).reservation.reservation_id
            commit = pb.CommitRequest(
                tenant_id=tenant, reservation_id=rid, usage=pb.Usage(input_tokens=n % 50)
            )
            impatient(stub.Commit, commit)
            stub.Commit(commit, timeout=RETRY_TIMEOUT_S)
            return rid, n % 50

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(cycle, range(120)))
        balance = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant))

    assert {"cancelled", "deadline"} <= set(interrupted), "no call was interrupted"
    events = _events(database_url, tenant)
    reserved = sorted(e[1] for e in events if e[0] == "TokensReserved")
    committed = sorted(e[2] for e in events if e[0] == "ReservationCommitted")
    assert reserved == sorted(f"k{n}" for n in range(120))
    assert committed == sorted(rid for rid, _ in results)
    assert (balance.balance.held, balance.balance.used) == (0, sum(u for _, u in results))
