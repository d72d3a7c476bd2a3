"""ReserveBatch, CommitBatch and RollbackBatch: many items of one tenant in one call, each with
its own outcome, with the guarantees of the single calls (no overspend, one key one outcome,
retries write nothing); a bad item is refused alone, a bad batch as a whole."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from google.rpc import error_details_pb2, status_pb2

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import call_fails, event_count, new_id

LIMIT = 1_000


def _quota(stub: pb_grpc.LedgerServiceStub, tenant: str, limit: int = LIMIT) -> None:
    stub.SetQuota(
        pb.SetQuotaRequest(
            idempotency_key=new_id("q"), tenant_id=tenant, limit=limit, period=pb.PERIOD_NONE
        )
    )


def _item(amount: int, key: str = "", user: str = "u", tenant: str = "") -> pb.ReserveRequest:
    return pb.ReserveRequest(
        idempotency_key=key or new_id("k"), tenant_id=tenant, user_id=user, model="m",
        amount=amount,
    )  # fmt: skip


def _refusal(raw: bytes) -> tuple[int, str, dict[str, str]]:
    """Code, ErrorInfo reason and metadata of an item's serialized google.rpc.Status."""
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
    return status.code, info.reason, dict(info.metadata)


def test_each_item_has_its_own_outcome_and_a_bad_one_is_refused_alone(
    stub: pb_grpc.LedgerServiceStub,
) -> None:
    tenant = new_id("t")
    _quota(stub, tenant, 100)
    items = [
        _item(60),
        _item(0),  # malformed
        _item(10, tenant="someone-else"),  # another tenant's
        _item(60),  # does not fit after the first
        _item(40),
    ]
    results = stub.ReserveBatch(pb.ReserveBatchRequest(tenant_id=tenant, items=items)).results
    kinds = [r.WhichOneof("outcome") for r in results]
    assert kinds == ["reserved", "refused", "refused", "refused", "reserved"]
    assert [_refusal(results[i].refused)[1] for i in (1, 2, 3)] == [
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "BUDGET_EXHAUSTED",
    ]
    assert _refusal(results[3].refused)[2]["available"] == "40"
    rids = [
        r.reserved.reservation.reservation_id
        for r in results
        if r.WhichOneof("outcome") == "reserved"
    ]
    ended = stub.CommitBatch(
        pb.CommitBatchRequest(
            tenant_id=tenant,
            items=[pb.CommitRequest(reservation_id=rid, usage=pb.Usage(input_tokens=5))
                   for rid in [*rids, "rsv_unknown"]],
        )
    ).results  # fmt: skip
    assert [r.WhichOneof("outcome") for r in ended] == ["committed", "committed", "refused"]
    assert _refusal(ended[2].refused)[1] == "RESERVATION_NOT_FOUND"
    balance = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant)).balance
    assert (balance.held, balance.used) == (0, 10)


def test_a_retried_batch_gets_the_same_outcomes_and_writes_nothing(
    stub: pb_grpc.LedgerServiceStub, database_url: str
) -> None:
    tenant = new_id("t")
    _quota(stub, tenant, 100)
    request = pb.ReserveBatchRequest(
        tenant_id=tenant, items=[_item(50), _item(50), _item(50), _item(50, key="twice")]
    )
    request.items.append(_item(50, key="twice"))  # the same key twice in one batch
    first = stub.ReserveBatch(request).results
    before = event_count(database_url)
    again = stub.ReserveBatch(request).results
    assert list(again) == list(first)
    assert event_count(database_url) == before
    kinds = [r.WhichOneof("outcome") for r in first]
    assert kinds == ["reserved", "reserved", "refused", "refused", "refused"]
    assert first[3] == first[4]


def test_concurrent_batches_never_overspend(stub: pb_grpc.LedgerServiceStub) -> None:
    tenant = new_id("t")
    _quota(stub, tenant)

    def batch(n: int) -> list[pb.ReserveBatchResult]:
        items = [_item(7, user=f"u{(n * 50 + i) % 40}") for i in range(50)]
        return list(
            stub.ReserveBatch(pb.ReserveBatchRequest(tenant_id=tenant, items=items)).results
        )

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(batch, range(16)) for r in rs]
    granted = sum(
        r.reserved.reservation.amount for r in results if r.WhichOneof("outcome") == "reserved"
    )
    assert granted == LIMIT - LIMIT % 7  # 142 holds of 7: no more fit, none was refused early
    balance = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant)).balance
    assert balance.held == granted


def test_rollback_batch_releases_each_hold_once(stub: pb_grpc.LedgerServiceStub) -> None:
    tenant = new_id("t")
    _quota(stub, tenant)
    results = stub.ReserveBatch(
        pb.ReserveBatchRequest(tenant_id=tenant, items=[_item(100) for _ in range(5)])
    ).results
    rids = [r.reserved.reservation.reservation_id for r in results]
    request = pb.RollbackBatchRequest(
        tenant_id=tenant, items=[pb.RollbackRequest(reservation_id=rid) for rid in rids]
    )
    first = stub.RollbackBatch(request).results
    assert [r.rolled_back.released for r in first] == [100] * 5
    assert list(stub.RollbackBatch(request).results) == list(first)
    assert stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant)).balance.held == 0


def test_a_bad_batch_is_refused_whole_and_writes_nothing(
    stub: pb_grpc.LedgerServiceStub, database_url: str
) -> None:
    tenant = new_id("t")
    before = event_count(database_url)
    for request, field in (
        (pb.ReserveBatchRequest(tenant_id=tenant), "items"),
        (pb.ReserveBatchRequest(tenant_id=tenant, items=[_item(1)] * 101), "items"),
        (pb.ReserveBatchRequest(tenant_id="", items=[_item(1)]), "tenant_id"),
        (pb.ReserveBatchRequest(tenant_id="a b", items=[_item(1)]), "tenant_id"),
    ):
        seen = call_fails(stub.ReserveBatch, request)
        assert seen.code is grpc.StatusCode.INVALID_ARGUMENT
        assert field in [f for f, _ in seen.field_violations]
    for call, empty in (
        (stub.CommitBatch, pb.CommitBatchRequest(tenant_id=tenant)),
        (stub.RollbackBatch, pb.RollbackBatchRequest(tenant_id=tenant)),
    ):
        assert call_fails(call, empty).code is grpc.StatusCode.INVALID_ARGUMENT
    assert event_count(database_url) == before
