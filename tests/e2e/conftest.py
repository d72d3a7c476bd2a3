from __future__ import annotations

from collections.abc import Iterator

import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.openai_server import OpenAIServer
from tests.support import ContextServerThread, ServerThread, cycle, new_id

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


@pytest.fixture(scope="session")
def context_service(ledger: ServerThread, database_url: str) -> Iterator[ContextServerThread]:
    """A real context service (exact tokenizers from var/tokenizers) calling the ledger, its
    memory in the test database."""
    server = ContextServerThread(ledger.target, memory_url=database_url).start()
    yield server
    server.stop()


@pytest.fixture
def openai_server() -> Iterator[OpenAIServer]:
    """A local OpenAI-compatible HTTP server (tests/openai_server.py)."""
    server = OpenAIServer().start()
    yield server
    server.stop()
