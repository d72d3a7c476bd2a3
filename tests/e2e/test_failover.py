"""A failover seen from the ledger: the database drops every connection and comes back read-only
(a demoted primary), then drops them again and takes writes. Under load the whole time, no call
ends INTERNAL or UNKNOWN, every refusal is a retryable UNAVAILABLE with RetryInfo, and every
acknowledged write is in the log exactly once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import ServerThread, failure, new_id, scratch_database

CLIENTS = 8


@pytest.fixture
def own_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of this test's own: it is made read-only and its connections are cut."""
    with scratch_database(tmp_path_factory.mktemp("failover")) as url:
        yield url


def _set_read_only(url: str, read_only: bool) -> None:
    """New sessions of the database start read-only (or not); the ones open are cut, so the
    pool reconnects into the new state, as after a failover."""
    with psycopg.connect(
        url, autocommit=True, options="-c default_transaction_read_only=off"
    ) as conn:
        name = conn.info.dbname
        setting = "on" if read_only else "off"
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {setting}')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )


class _Client(threading.Thread):
    """Reserve then commit, over and over, each with its own key; a call refused UNAVAILABLE
    is retried with the same key (as a client should) until it is answered."""

    def __init__(self, target: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.target, self.stop = target, stop
        self.codes: Counter[str] = Counter()
        self.retry_info_missing = 0
        self.reserved: dict[str, str] = {}  # idempotency key -> reservation id
        self.committed: set[str] = set()

    def _call(self, fn: object, request: object) -> object | None:
        """The response; None when the test ends while the call is still refused."""
        while not self.stop.is_set():
            try:
                response = fn(request, timeout=10)  # type: ignore[operator]
                self.codes["OK"] += 1
                return response
            except grpc.RpcError as exc:
                seen = failure(exc)
                self.codes[seen.code.name] += 1
                if seen.code is not grpc.StatusCode.UNAVAILABLE:
                    raise
                if seen.retry_delay_s is None:
                    self.retry_info_missing += 1
                time.sleep(0.05)
        return None

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            while not self.stop.is_set():
                key = new_id("k")
                request = pb.ReserveRequest(
                    idempotency_key=key, tenant_id="t-failover", user_id=new_id("u"),
                    model="m", amount=10,
                )  # fmt: skip
                r = self._call(stub.Reserve, request)
                if r is None:
                    return
                rid = r.reservation.reservation_id  # type: ignore[attr-defined]
                self.reserved[key] = rid
                commit = pb.CommitRequest(
                    tenant_id="t-failover", reservation_id=rid, usage=pb.Usage(input_tokens=3)
                )
                if self._call(stub.Commit, commit) is not None:
                    self.committed.add(rid)


def test_a_read_only_failover_under_load_ends_no_call_internal(own_database: str) -> None:
    server = ServerThread(own_database, audit_workers=1).start()
    stop = threading.Event()
    clients = [_Client(server.target, stop) for _ in range(CLIENTS)]
    try:
        for c in clients:
            c.start()
        time.sleep(1.5)
        _set_read_only(own_database, True)
        time.sleep(3)
        _set_read_only(own_database, False)
        time.sleep(2)
    finally:
        stop.set()
        for c in clients:
            c.join(30)
        server.stop()
    codes = sum((c.codes for c in clients), Counter())
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"] > 0, "the failover was not seen: the test proves nothing"
    assert sum(c.retry_info_missing for c in clients) == 0
    reserved = {k: rid for c in clients for k, rid in c.reserved.items()}
    committed = {rid for c in clients for rid in c.committed}
    assert len(committed) > 0
    with psycopg.connect(own_database) as conn:
        rows = conn.execute(
            "SELECT idempotency_key, reservation_id, event_type FROM events "
            "WHERE tenant_id = 't-failover' AND event_type IN "
            "('TokensReserved', 'ReservationCommitted')"
        ).fetchall()
    holds = Counter((key, rid) for key, rid, kind in rows if kind == "TokensReserved")
    commits = Counter(rid for _, rid, kind in rows if kind == "ReservationCommitted")
    for key, rid in reserved.items():
        assert holds[(key, rid)] == 1, (key, rid)
    assert all(n == 1 for n in holds.values())
    for rid in committed:
        assert commits[rid] == 1, rid
