"""One key, one outcome: the first answer to an idempotency key, a hold or a refusal for budget
or rate, is the answer to every call with that key, whatever happened to the budget since and
however the twins race."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import ServerThread, call_fails, failure, new_id

LIMIT = 1_000
AMOUNT = 100
PAIRS = 160


def _quota(stub: pb_grpc.LedgerServiceStub, tenant: str, user: str, limit: int) -> None:
    stub.SetQuota(
        pb.SetQuotaRequest(
            idempotency_key=new_id("q"), tenant_id=tenant, user_id=user, limit=limit,
            period=pb.PERIOD_NONE,
        )
    )  # fmt: skip


def _reserve(tenant: str, user: str, key: str, amount: int = AMOUNT) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        idempotency_key=key, tenant_id=tenant, user_id=user, model="m", amount=amount
    )


def _outcome(stub: pb_grpc.LedgerServiceStub, request: pb.ReserveRequest) -> tuple[str, ...]:
    """What a Reserve answered: the hold's id, or the refusal's reason and figures."""
    try:
        r = stub.Reserve(request, timeout=30)
    except grpc.RpcError as exc:
        seen = failure(exc)
        return ("refused", seen.code.name, seen.reason, *sorted(seen.metadata.items()))  # type: ignore[arg-type]
    return ("held", r.reservation.reservation_id, str(r.reservation.amount))


def test_a_refused_key_stays_refused_after_budget_is_freed(stub: pb_grpc.LedgerServiceStub) -> None:
    tenant, user = new_id("t"), "u"
    _quota(stub, tenant, user, LIMIT)
    filler = stub.Reserve(_reserve(tenant, user, new_id("k"), LIMIT))
    key = new_id("k")
    first = call_fails(stub.Reserve, _reserve(tenant, user, key))
    assert (first.code, first.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXHAUSTED")
    stub.Rollback(
        pb.RollbackRequest(tenant_id=tenant, reservation_id=filler.reservation.reservation_id)
    )
    again = call_fails(stub.Reserve, _reserve(tenant, user, key))
    assert again == first  # the same code, message, reason and figures
    reused = call_fails(stub.Reserve, _reserve(tenant, user, key, AMOUNT + 1))
    assert reused.reason == "IDEMPOTENCY_KEY_REUSED"
    assert stub.Reserve(_reserve(tenant, user, new_id("k"))).reservation.amount == AMOUNT


def test_a_rate_refusal_is_the_keys_outcome_too(stub: pb_grpc.LedgerServiceStub) -> None:
    tenant, user = new_id("t"), "u"
    stub.SetRateLimit(
        pb.SetRateLimitRequest(
            idempotency_key=new_id("r"), tenant_id=tenant, user_id=user, requests_per_minute=1
        )
    )
    stub.Reserve(_reserve(tenant, user, new_id("k")))
    key = new_id("k")
    first = call_fails(stub.Reserve, _reserve(tenant, user, key))
    assert first.reason == "RATE_LIMITED"
    assert call_fails(stub.Reserve, _reserve(tenant, user, key)) == first


def test_twins_racing_near_the_limit_get_one_outcome(ledger: ServerThread) -> None:
    """Pairs of clients send the same key at the same instant while a third keeps placing and
    ending holds, so the budget flips between room and none: every pair agrees, and once every
    holder has ended its hold nothing stays held."""
    tenant, user = new_id("t"), "u"
    stop = threading.Event()
    with ledger.stub() as stub:
        _quota(stub, tenant, user, LIMIT)

        def churn() -> None:
            rng = random.Random(7)
            with ledger.stub() as own:
                while not stop.is_set():
                    amount = rng.choice((850, 950, 1_000))
                    try:
                        r = own.Reserve(_reserve(tenant, user, new_id("c"), amount))
                    except grpc.RpcError:
                        continue
                    own.Rollback(
                        pb.RollbackRequest(
                            tenant_id=tenant, reservation_id=r.reservation.reservation_id
                        )
                    )

        def twin(key: str, barrier: threading.Barrier) -> tuple[str, ...]:
            barrier.wait()
            outcome = _outcome(stub, _reserve(tenant, user, key))
            if outcome[0] == "held":  # a holder ends its hold (twins end the same one)
                stub.Rollback(pb.RollbackRequest(tenant_id=tenant, reservation_id=outcome[1]))
            return outcome

        churner = threading.Thread(target=churn, daemon=True)
        churner.start()
        disagreements, kinds = [], set()
        try:
            with ThreadPoolExecutor(2) as pool:
                for _ in range(PAIRS):
                    key, barrier = new_id("k"), threading.Barrier(2)
                    a, b = pool.map(twin, (key, key), (barrier, barrier))
                    kinds.add(a[0])
                    if a != b:
                        disagreements.append((key, a, b))
        finally:
            stop.set()
            churner.join(30)
        balance = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id=user))
    assert disagreements == []
    assert kinds == {"held", "refused"}, "the budget never flipped: the race was not near it"
    assert balance.balance.held == 0
