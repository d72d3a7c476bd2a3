"""Scale-out: two `tokenledger serve` processes on one database keep every guarantee. The
concurrency tests run against both at once: no overspend, a retry sent to the other process
gets the first answer and writes nothing, each overdue hold expires once though both sweep,
and the log verifies afterwards."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import LedgerProcess, failure, new_id, verify_tenant, wait_health

CLIENTS = 64
LIMIT = 5_000
AMOUNT = 100
ROUNDS = 3
CALL_TIMEOUT_S = 30.0
SWEEP_INTERVAL_S = "0.2"


@pytest.fixture(scope="module")
def replicas(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LedgerProcess]]:
    """Two ledger processes on the session's database, started side by side."""
    logs = tmp_path_factory.mktemp("replicas")
    processes = [
        LedgerProcess(
            database_url,
            Path(logs / f"ledger-{n}.log"),
            TOKENLEDGER_SWEEP_INTERVAL_S=SWEEP_INTERVAL_S,
            TOKENLEDGER_AUTH="off",
        )
        for n in range(2)
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(LedgerProcess.start, processes))
        yield processes
    finally:
        for process in processes:
            process.stop()


@pytest.fixture
def stubs(replicas: list[LedgerProcess]) -> Iterator[list[pb_grpc.LedgerServiceStub]]:
    channels = [grpc.insecure_channel(p.target) for p in replicas]
    try:
        yield [pb_grpc.LedgerServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            channel.close()


def events_of(url: str, tenant: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT event_type, idempotency_key, reservation_id FROM events "
            "WHERE tenant_id = %s ORDER BY position",
            (tenant,),
        ).fetchall()


@dataclass
class Tally:
    """What the clients were told."""

    granted: dict[str, str] = field(default_factory=dict)  # idempotency key -> reservation
    committed: dict[str, int] = field(default_factory=dict)  # reservation -> usage
    refusals: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _answer(call: Callable[[], pb.ReserveResponse]) -> str:
    try:
        return call().reservation.reservation_id
    except grpc.RpcError as exc:
        return f"refused:{failure(exc).reason}"


def reserve_then_retry(
    stubs: list[pb_grpc.LedgerServiceStub], request: pb.ReserveRequest, first: int, tally: Tally
) -> str | None:
    """Reserve on one process, then retry the same request on the other (a client whose
    first replica answered but whose answer was lost): a grant is answered again with the same
    reservation. A refusal is not stored, so its retry may be granted once others have freed
    room. Returns the reservation id, or None when both refused."""
    answers = [
        _answer(lambda stub=stubs[n]: stub.Reserve(request, timeout=CALL_TIMEOUT_S))
        for n in (first, 1 - first)
    ]
    granted = [a for a in answers if not a.startswith("refused:")]
    with tally.lock:
        if granted and answers[1] != granted[0]:
            tally.mismatches.append(f"{request.idempotency_key}: {answers}")
        if not granted:
            tally.refusals[answers[1]] += 1
            return None
        tally.granted[request.idempotency_key] = granted[0]
    return granted[0]


def commit_on_both(
    stubs: list[pb_grpc.LedgerServiceStub], tenant: str, rid: str, used: int, first: int,
    tally: Tally,
) -> None:  # fmt: skip
    """Commit on one process, then the same commit on the other: the same response."""
    request = pb.CommitRequest(
        tenant_id=tenant, reservation_id=rid, usage=pb.Usage(input_tokens=used)
    )
    answer = stubs[first].Commit(request, timeout=CALL_TIMEOUT_S)
    again = stubs[1 - first].Commit(request, timeout=CALL_TIMEOUT_S)
    with tally.lock:
        if again != answer:
            tally.mismatches.append(f"commit {rid}: {answer} != {again}")
        tally.committed[rid] = used


def test_two_processes_never_overspend_and_retries_on_the_other_apply_once(
    replicas: list[LedgerProcess], stubs: list[pb_grpc.LedgerServiceStub], database_url: str
) -> None:
    """64 clients split over two processes race for one user's 5,000 tokens: exactly 50 holds
    of 100 are granted (no overspend, no spurious refusal); each request retried on the other
    process gets the same answer and appends nothing. Then rounds of reserve → commit (or
    rollback) from all 64, each call repeated on the other process: used + held never exceeds
    the limit, used is what the clients were told, each key and each reservation is in the
    log once, and the log verifies."""
    tenant, user = new_id("t"), "shared"
    stubs[0].SetQuota(
        pb.SetQuotaRequest(
            idempotency_key=new_id("q"), tenant_id=tenant, user_id=user, limit=LIMIT,
            period=pb.PERIOD_NONE,
        ),
        timeout=CALL_TIMEOUT_S,
    )  # fmt: skip
    tally = Tally()
    start = threading.Barrier(CLIENTS)

    def request(n: int, label: str) -> pb.ReserveRequest:
        return pb.ReserveRequest(
            idempotency_key=f"{label}-{n}", tenant_id=tenant, user_id=user,
            conversation_id=f"c{n % 4}", model="gpt-4o", amount=AMOUNT, ttl_seconds=600,
        )  # fmt: skip

    def race(n: int) -> str:
        start.wait()
        return _answer(lambda: stubs[n % 2].Reserve(request(n, "race"), timeout=CALL_TIMEOUT_S))

    def retry(n: int) -> str:
        return _answer(lambda: stubs[1 - n % 2].Reserve(request(n, "race"), timeout=CALL_TIMEOUT_S))

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(race, range(CLIENTS)))
        appended = len(events_of(database_url, tenant))
        retried = list(pool.map(retry, range(CLIENTS)))  # all at once, on the other process
    assert retried == answers, "a retry on the other process got another answer"
    assert len(events_of(database_url, tenant)) == appended, "retries appended events"
    holds = [None if a.startswith("refused:") else a for a in answers]
    granted = [rid for rid in holds if rid]
    tally.granted.update({f"race-{n}": rid for n, rid in enumerate(holds) if rid})
    assert len(granted) * AMOUNT == LIMIT, Counter(answers)
    assert Counter(a for a in answers if a not in granted) == Counter(
        {"refused:BUDGET_EXHAUSTED": CLIENTS - len(granted)}
    )
    balance = (
        stubs[1]
        .GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id=user), timeout=CALL_TIMEOUT_S)
        .balance
    )
    assert (balance.held, balance.used) == (LIMIT, 0)

    def cycles(n: int) -> None:
        rng = random.Random(n)
        rid = holds[n]
        if rid:  # end the race's hold on the process it was not first sent to
            commit_on_both(stubs, tenant, rid, rng.randint(0, AMOUNT), 1 - n % 2, tally)
        for r in range(ROUNDS):
            first = (n + r) % 2
            rid = reserve_then_retry(stubs, request(n, f"round{r}"), first, tally)
            if rid is None:
                continue
            if rng.random() < 0.25:
                rollback = pb.RollbackRequest(tenant_id=tenant, reservation_id=rid)
                stubs[1 - first].Rollback(rollback, timeout=CALL_TIMEOUT_S)
                assert stubs[first].Rollback(rollback, timeout=CALL_TIMEOUT_S).released == AMOUNT
            else:
                commit_on_both(stubs, tenant, rid, rng.randint(0, AMOUNT), 1 - first, tally)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(cycles, range(CLIENTS)))
    assert not tally.mismatches, tally.mismatches[:5]

    balance = (
        stubs[0]
        .GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id=user), timeout=CALL_TIMEOUT_S)
        .balance
    )
    assert balance.held == 0
    assert balance.used == sum(tally.committed.values()) <= LIMIT

    events = events_of(database_url, tenant)
    reserved = Counter(key for kind, key, _ in events if kind == "TokensReserved")
    assert reserved == Counter(dict.fromkeys(tally.granted, 1)), "a key reserved twice or lost"
    ended = Counter(rid for kind, _, rid in events if kind.startswith("Reservation"))
    assert set(ended.values()) == {1} and set(ended) == set(tally.granted.values())

    report = verify_tenant(database_url, tenant)
    assert report.breaks == [] and report.differences == []


def test_a_duplicate_in_flight_on_the_other_process_gets_the_same_answer(
    replicas: list[LedgerProcess], stubs: list[pb_grpc.LedgerServiceStub], database_url: str
) -> None:
    """The same Reserve in flight on both processes at once (a client that retried on the
    other replica before the first answered), with room for one hold: both answers name the
    one reservation."""
    tenant = new_id("t")
    stubs[0].SetQuota(
        pb.SetQuotaRequest(
            idempotency_key=new_id("q"), tenant_id=tenant, user_id="u", limit=AMOUNT,
            period=pb.PERIOD_NONE,
        ),
        timeout=CALL_TIMEOUT_S,
    )  # fmt: skip
    request = pb.ReserveRequest(
        idempotency_key="twin", tenant_id=tenant, user_id="u", model="m", amount=AMOUNT
    )
    with psycopg.connect(database_url) as blocker:
        blocker.execute(
            "SELECT 1 FROM accounts WHERE tenant_id = %s AND user_id = '' FOR UPDATE", (tenant,)
        )
        calls = [stub.Reserve.future(request, timeout=CALL_TIMEOUT_S) for stub in stubs]
        wait_until(lambda: lock_waiters(database_url) >= 2, timeout_s=10)
    answers = [_answer(call.result) for call in calls]
    assert answers[0] == answers[1], answers


def lock_waiters(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_an_overdue_hold_expires_once_though_both_processes_sweep(
    replicas: list[LedgerProcess], stubs: list[pb_grpc.LedgerServiceStub], database_url: str
) -> None:
    """Holds with a 1 s TTL placed through both processes: each sweeper (every 0.2 s) races
    the other for them, and each hold gets exactly one ReservationExpired."""
    tenant = new_id("t")
    rids = [
        stubs[n % 2]
        .Reserve(
            pb.ReserveRequest(
                idempotency_key=f"k{n}", tenant_id=tenant, user_id=f"u{n % 3}", model="m",
                amount=10, ttl_seconds=1,
            ),
            timeout=CALL_TIMEOUT_S,
        )
        .reservation.reservation_id
        for n in range(20)
    ]  # fmt: skip

    def all_expired() -> bool:
        return {
            stubs[0]
            .GetReservation(
                pb.GetReservationRequest(tenant_id=tenant, reservation_id=rid),
                timeout=CALL_TIMEOUT_S,
            )
            .reservation.state
            for rid in rids
        } == {pb.RESERVATION_STATE_EXPIRED}

    wait_until(all_expired, timeout_s=15)
    # one more sweep of each process after the last expiry: nothing left to do twice
    for process in replicas:
        wait_health(process.target, 1, 5)
    time.sleep(3 * float(SWEEP_INTERVAL_S))
    expired = Counter(
        rid for kind, _, rid in events_of(database_url, tenant) if kind == "ReservationExpired"
    )
    assert expired == Counter(dict.fromkeys(rids, 1))
    balance = stubs[1].GetBalance(pb.GetBalanceRequest(tenant_id=tenant), timeout=CALL_TIMEOUT_S)
    assert balance.balance.held == 0
    report = verify_tenant(database_url, tenant)
    assert report.breaks == [] and report.differences == []


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)
