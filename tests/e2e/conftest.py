from __future__ import annotations

import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import cycle, new_id

Stub = pb_grpc.LedgerServiceStub


@pytest.fixture
def history(stub: Stub) -> str:
    """A tenant with quotas, commits, a rollback, usage without a hold and an overage."""
    tenant = new_id("t")
    stub.SetQuota(
        pb.SetQuotaRequest(
            idempotency_key=new_id("q"), tenant_id=tenant, user_id="ann", limit=10_000,
            period=pb.PERIOD_DAY,
        )
    )  # fmt: skip
    cycle(stub, tenant, "ann", "c1", 101, 50)
    cycle(stub, tenant, "ann", "c2", 200, 300)  # overage 101
    cycle(stub, tenant, "bob", "", 51, -1)  # rolled back
    cycle(stub, tenant, "bob", "c9", 77, 10)
    stub.RecordUsage(
        pb.RecordUsageRequest(
            idempotency_key=new_id("u"), tenant_id=tenant, user_id="bob", model="gpt-4o",
            usage=pb.Usage(cached_input_tokens=5),
        )
    )  # fmt: skip
    return tenant
