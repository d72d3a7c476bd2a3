from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.platform.observability import configure_logging, configure_tracing
from tests.support import ServerThread, cycle, new_id, scratch_database

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM never fetches prices


@pytest.fixture(scope="session", autouse=True)
def _observability() -> None:
    """Real tracing (so trace ids exist and propagate) with no exporter; quiet logs."""
    configure_logging("console", "warning")
    configure_tracing("none", "tokenledger-tests")


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One migrated database for the whole run, created and dropped by it."""
    with scratch_database(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(scope="session")
def ledger(database_url: str) -> Iterator[ServerThread]:
    """A real ledger server on port 0 with the real clock, shared by the run."""
    server = ServerThread(database_url).start()
    yield server
    server.stop()


@pytest.fixture
def stub(ledger: ServerThread) -> Iterator[pb_grpc.LedgerServiceStub]:
    with ledger.stub() as s:
        yield s


@pytest.fixture
def busy_tenant(ledger: ServerThread) -> Iterator[str]:
    """A tenant with quotas of every kind, a rate limit, a grant, an adjustment, commits with
    overage, a rollback and usage without a hold."""
    tenant = new_id("t")
    with ledger.stub() as stub:
        for user, period, extra in (
            ("", pb.PERIOD_DAY, {"time_zone": "Europe/Berlin"}),
            ("ann", pb.PERIOD_ROLLING, {"window_hours": 5, "soft_limit_percent": 50}),
            ("bob", pb.PERIOD_MONTH, {"grant_order": pb.GRANT_ORDER_GRANTS_FIRST}),
        ):
            stub.SetQuota(pb.SetQuotaRequest(
                idempotency_key=new_id("q"), tenant_id=tenant, user_id=user, limit=50_000,
                period=period, **extra,  # type: ignore[arg-type]
            ))  # fmt: skip
        stub.SetRateLimit(pb.SetRateLimitRequest(
            idempotency_key=new_id("l"), tenant_id=tenant, tokens_per_minute=10**6,
        ))  # fmt: skip
        stub.GrantTokens(pb.GrantTokensRequest(
            idempotency_key=new_id("g"), tenant_id=tenant, user_id="bob", amount=500, reason="x",
        ))  # fmt: skip
        cycle(stub, tenant, "ann", "c1", 300, 200)
        cycle(stub, tenant, "ann", "c2", 100, 400)  # overage
        cycle(stub, tenant, "bob", "", 700, -1)  # rolled back
        cycle(stub, tenant, "bob", "c9", 900, 850)
        stub.AdjustBalance(pb.AdjustBalanceRequest(
            idempotency_key=new_id("a"), tenant_id=tenant, user_id="ann", tokens=-50, reason="y",
        ))  # fmt: skip
    yield tenant
