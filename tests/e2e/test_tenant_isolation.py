"""Tenant isolation: a key scoped to tenant A is refused (PERMISSION_DENIED, nothing appended)
on every RPC of both services when it names tenant B, streams and usage queries included.
The RPC lists come from the service descriptors: a new RPC without a case here fails."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context.server import SERVICE as CONTEXT_SERVICE
from services.context.tokenizer_data import DATA_DIR_ENV
from services.context.tokenizers import TokenizerPool
from services.ledger.server import SERVICE as LEDGER_SERVICE
from services.platform.auth import ROLES, ClientAuth, policies
from tests.support import (
    ApiKey,
    ContextServerThread,
    ServerThread,
    create_key,
    failure,
    new_id,
)

POLICIES = policies(LEDGER_SERVICE, CONTEXT_SERVICE)

REPO = Path(__file__).resolve().parents[2]
STREAM_TIMEOUT_S = 10


def _stamp(at: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out


def _query(tenant: str) -> pb.UsageQuery:
    now = datetime.now(UTC)
    return pb.UsageQuery(
        tenant_id=tenant,
        from_time=_stamp(now - timedelta(days=1)),
        to_time=_stamp(now + timedelta(hours=1)),
        group_by=[pb.USAGE_DIMENSION_USER],
    )


# Each case: the request naming `tenant`; `rid` is a fresh held reservation of that tenant.
Case = Callable[[str, str], Any]
LEDGER_CASES: dict[str, Case] = {
    "Reserve": lambda t, rid: pb.ReserveRequest(
        idempotency_key=new_id("k"), tenant_id=t, user_id="u", model="gpt-4o", amount=10
    ),
    "Commit": lambda t, rid: pb.CommitRequest(
        tenant_id=t, reservation_id=rid, usage=pb.Usage(input_tokens=5)
    ),
    "Rollback": lambda t, rid: pb.RollbackRequest(tenant_id=t, reservation_id=rid),
    "ReserveBatch": lambda t, rid: pb.ReserveBatchRequest(
        tenant_id=t,
        items=[
            pb.ReserveRequest(idempotency_key=new_id("k"), user_id="u", model="gpt-4o", amount=10)
        ],
    ),
    "CommitBatch": lambda t, rid: pb.CommitBatchRequest(
        tenant_id=t, items=[pb.CommitRequest(reservation_id=rid, usage=pb.Usage(input_tokens=1))]
    ),
    "RollbackBatch": lambda t, rid: pb.RollbackBatchRequest(
        tenant_id=t, items=[pb.RollbackRequest(reservation_id=rid)]
    ),
    "GetReservation": lambda t, rid: pb.GetReservationRequest(tenant_id=t, reservation_id=rid),
    "GetBalance": lambda t, rid: pb.GetBalanceRequest(tenant_id=t, user_id="u"),
    "SetQuota": lambda t, rid: pb.SetQuotaRequest(
        idempotency_key=new_id("q"), tenant_id=t, user_id="u", limit=5_000, period=pb.PERIOD_DAY
    ),
    "SetRateLimit": lambda t, rid: pb.SetRateLimitRequest(
        idempotency_key=new_id("r"), tenant_id=t, user_id="u", tokens_per_minute=10_000
    ),
    "SetBudgetAlerts": lambda t, rid: pb.SetBudgetAlertsRequest(
        idempotency_key=new_id("b"), tenant_id=t, user_id="u", thresholds_percent=[50]
    ),
    "GrantTokens": lambda t, rid: pb.GrantTokensRequest(
        idempotency_key=new_id("g"), tenant_id=t, user_id="u", amount=100, reason="test"
    ),
    "AdjustBalance": lambda t, rid: pb.AdjustBalanceRequest(
        idempotency_key=new_id("a"), tenant_id=t, user_id="u", tokens=3, reason="test"
    ),
    "SetPrices": lambda t, rid: pb.SetPricesRequest(
        idempotency_key=new_id("p"), tenant_id=t, prices=[pb.Price(model="m", currency="USD")]
    ),
    "ListPrices": lambda t, rid: pb.ListPricesRequest(tenant_id=t),
    "GetOutputStats": lambda t, rid: pb.GetOutputStatsRequest(tenant_id=t, model="m"),
    "RecordUsage": lambda t, rid: pb.RecordUsageRequest(
        idempotency_key=new_id("u"),
        tenant_id=t,
        user_id="u",
        model="gpt-4o",
        usage=pb.Usage(output_tokens=7),
    ),
    "ReplayHistory": lambda t, rid: pb.ReplayHistoryRequest(tenant_id=t),
    "VerifyAudit": lambda t, rid: pb.VerifyAuditRequest(tenant_id=t),
    "QueryUsage": lambda t, rid: pb.QueryUsageRequest(query=_query(t)),
    "ExportUsage": lambda t, rid: pb.ExportUsageRequest(query=_query(t)),
    "SubscribeEvents": lambda t, rid: pb.SubscribeEventsRequest(tenant_id=t),
}
CONTEXT_CASES: dict[str, Case] = {
    "PrepareContext": lambda t, rid: cpb.PrepareContextRequest(
        idempotency_key=new_id("p"),
        tenant_id=t,
        user_id="u",
        model="gpt-4o",
        messages=[
            cpb.ChatMessage(role=cpb.CHAT_ROLE_USER, content="How far is Porto from Lisbon?")
        ],
        max_output_tokens=50,
    ),
    "PlanDocument": lambda t, rid: cpb.PlanDocumentRequest(
        idempotency_key=new_id("d"),
        tenant_id=t,
        user_id="u",
        model="gpt-4o",
        text="A first paragraph.\n\nA second one, a little longer than the first.",
        chunk_tokens=8,
        overlap_tokens=2,
        reserve=True,
    ),
    "SetMemory": lambda t, rid: cpb.SetMemoryRequest(
        tenant_id=t,
        user_id="u",
        conversation_id=new_id("c"),
        facts=[cpb.MemoryFact(key="city", value="Porto")],
    ),
    "ListMemory": lambda t, rid: cpb.ListMemoryRequest(
        tenant_id=t, user_id="u", conversation_id="c1"
    ),
    "DeleteMemory": lambda t, rid: cpb.DeleteMemoryRequest(
        tenant_id=t, user_id="u", conversation_id="c1"
    ),
}
WRITES_NOTHING = {"ListMemory", "DeleteMemory"}
"""Context RPCs whose own call by B changes nothing there is to see (B's memory is empty)."""
# RPCs that name no tenant and read no tenant's data: any authenticated key may call them.
TENANTLESS = {"CountTokens": cpb.CountTokensRequest(model="gpt-4o", text="hello there")}


@pytest.fixture(scope="module")
def auth_ledger(database_url: str) -> Iterator[ServerThread]:
    server = ServerThread(database_url, auth_mode="api_key").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys(database_url: str) -> dict[str, Any]:
    """Tenants A and B, a key with every role for each, and the context service's own key."""
    a, b = new_id("ta"), new_id("tb")
    return {
        "a": a,
        "b": b,
        "key_a": create_key(database_url, a, *ROLES, name="tenant A"),
        "key_b": create_key(database_url, b, *ROLES, name="tenant B"),
        "context": create_key(database_url, "*", "writer", name="context service"),
    }


@pytest.fixture(scope="module")
def auth_context(
    auth_ledger: ServerThread, database_url: str, keys: dict[str, Any]
) -> Iterator[ContextServerThread]:
    context_key: ApiKey = keys["context"]
    pool = TokenizerPool(data_dir=Path(os.environ.get(DATA_DIR_ENV) or REPO / "var/tokenizers"))
    server = ContextServerThread(
        auth_ledger.target,
        auth_mode="api_key",
        keys_url=database_url,
        pool=pool,
        ledger_metadata=lambda: context_key.metadata,
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seeded(auth_ledger: ServerThread, keys: dict[str, Any]) -> None:
    """Tenant B has a quota, a commit and usage, so every read of it would find something."""
    with _channel(auth_ledger.target, keys["key_b"]) as channel:
        stub = pb_grpc.LedgerServiceStub(channel)
        stub.SetQuota(LEDGER_CASES["SetQuota"](keys["b"], ""))
        rid = _reserve(stub, keys["b"])
        stub.Commit(LEDGER_CASES["Commit"](keys["b"], rid))


def _channel(target: str, key: ApiKey) -> grpc.Channel:
    return ClientAuth(api_key=key.token).channel(target)


def _reserve(stub: pb_grpc.LedgerServiceStub, tenant: str) -> str:
    reply = stub.Reserve(LEDGER_CASES["Reserve"](tenant, ""))
    return str(reply.reservation.reservation_id)


def _events(url: str, tenant: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tenant,))
        return int(row.fetchone()[0])  # type: ignore[index]


def _written(url: str, tenant: str) -> int:
    """The tenant's events plus its context memory facts."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM context_memory_facts WHERE tenant_id = %s", (tenant,)
        )
        return _events(url, tenant) + int(row.fetchone()[0])  # type: ignore[index]


def _call(stub: Any, rpc: str, request: Any) -> Any:
    """A unary reply, or a stream's first message (the stream is then cancelled)."""
    method = getattr(stub, rpc)
    reply = method(request, timeout=STREAM_TIMEOUT_S)
    if isinstance(reply, grpc.Call) and hasattr(reply, "__next__"):
        first = next(reply)
        reply.cancel()
        return first
    return reply


def test_every_rpc_of_both_services_has_an_isolation_case_and_a_policy() -> None:
    """A new RPC must get a case here and a policy (its `access` option in the proto)."""
    ledger = {m.name for m in LEDGER_SERVICE.methods}
    context = {m.name for m in CONTEXT_SERVICE.methods}
    assert ledger == set(LEDGER_CASES)
    assert context == set(CONTEXT_CASES) | set(TENANTLESS)
    for service in (LEDGER_SERVICE, CONTEXT_SERVICE):
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in POLICIES


@pytest.mark.parametrize("rpc", [m.name for m in LEDGER_SERVICE.methods])
def test_a_key_of_tenant_a_is_refused_every_ledger_rpc_on_tenant_b(
    rpc: str, auth_ledger: ServerThread, database_url: str, keys: dict[str, Any], seeded: None
) -> None:
    """PERMISSION_DENIED naming tenant B, nothing appended; the same request by B's own key
    then succeeds, so it was a real request the refusal stopped."""
    a, b = keys["a"], keys["b"]
    with (
        _channel(auth_ledger.target, keys["key_a"]) as chan_a,
        _channel(auth_ledger.target, keys["key_b"]) as chan_b,
    ):
        stub_a, stub_b = pb_grpc.LedgerServiceStub(chan_a), pb_grpc.LedgerServiceStub(chan_b)
        request = LEDGER_CASES[rpc](b, _reserve(stub_b, b))
        before = _events(database_url, b)
        with pytest.raises(grpc.RpcError) as refused:
            _call(stub_a, rpc, request)
        after = _events(database_url, b)
        _call(stub_b, rpc, request)
        # A's key is good on A: the refusal was about the tenant, not the key.
        _call(stub_a, rpc, LEDGER_CASES[rpc](a, _reserve(stub_a, a)))
    how = failure(refused.value)
    assert (how.code, how.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert how.metadata["tenant_id"] == b
    assert how.metadata["key_tenant_id"] == a
    assert after == before


@pytest.mark.parametrize("rpc", sorted(CONTEXT_CASES))
def test_a_key_of_tenant_a_is_refused_every_context_rpc_on_tenant_b(
    rpc: str,
    auth_ledger: ServerThread,
    auth_context: ContextServerThread,
    database_url: str,
    keys: dict[str, Any],
) -> None:
    """The context service checks the caller's tenant before it calls the ledger or touches
    its memory."""
    b = keys["b"]
    request = CONTEXT_CASES[rpc](b, "")
    before = _written(database_url, b)
    with (
        _channel(auth_context.target, keys["key_a"]) as chan_a,
        _channel(auth_context.target, keys["key_b"]) as chan_b,
    ):
        with pytest.raises(grpc.RpcError) as refused:
            getattr(cpb_grpc.ContextServiceStub(chan_a), rpc)(request)
        after = _written(database_url, b)
        getattr(cpb_grpc.ContextServiceStub(chan_b), rpc)(request)
    how = failure(refused.value)
    assert (how.code, how.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert how.metadata["tenant_id"] == b
    assert after == before
    if rpc not in WRITES_NOTHING:  # B's own call did reach the ledger or the memory
        assert _written(database_url, b) > before


@pytest.mark.parametrize("rpc", sorted(TENANTLESS))
def test_tenantless_context_rpcs_name_no_tenant_and_any_key_may_call_them(
    rpc: str, auth_context: ContextServerThread, keys: dict[str, Any]
) -> None:
    """CountTokens has no tenant field (if one is added, it needs a case above)."""
    request = TENANTLESS[rpc]
    fields = {f.name for f in request.DESCRIPTOR.fields}
    assert not {"tenant_id", "query"} & fields
    assert POLICIES[f"/{CONTEXT_SERVICE.full_name}/{rpc}"].tenant is None
    with _channel(auth_context.target, keys["key_a"]) as channel:
        assert getattr(cpb_grpc.ContextServiceStub(channel), rpc)(request).total_tokens > 0
