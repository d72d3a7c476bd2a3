from __future__ import annotations

from collections.abc import Iterator

import pytest

from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.observability import configure_logging, configure_tracing
from tests.support import ServerThread, scratch_database


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
