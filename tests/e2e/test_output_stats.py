"""GetOutputStats (issue #17, predictive output holds): the p50, p95 and max of the output
tokens of a user's recent calls of a model, read from the ledger's own reservations
(committed, or committed late after expiry), falling back to the tenant's when the user has
fewer than min_samples; bad input refused naming the field. A ledger on a clock the tests
move, so that the window and expiry can be crossed without waiting."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import Clock, ServerThread, call_fails, new_id
from tests.support import committed_calls as calls

Stub = pb_grpc.LedgerServiceStub
MODEL = "gpt-4o"


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def clocked(database_url: str, clock: Clock) -> Iterator[Stub]:
    server = ServerThread(database_url, clock=clock).start()
    with server.stub() as stub:
        yield stub
    server.stop()


def percentile_disc(values: Sequence[int], fraction: float) -> int:
    """PostgreSQL's percentile_disc: the first value whose cumulative share reaches it."""
    ordered = sorted(values)
    return ordered[math.ceil(fraction * len(ordered)) - 1]


def stats(stub: Stub, tenant: str, user: str = "", **kw: Any) -> pb.GetOutputStatsResponse:
    request = pb.GetOutputStatsRequest(tenant_id=tenant, user_id=user, model=MODEL, **kw)
    reply: pb.GetOutputStatsResponse = stub.GetOutputStats(request)
    return reply


def test_a_user_with_enough_calls_gets_the_p50_p95_and_max_of_their_own(clocked: Stub) -> None:
    tenant = new_id("t")
    rng = random.Random(3)
    mine = [int(rng.lognormvariate(5, 0.8)) for _ in range(40)]
    calls(clocked, tenant, "ann", mine)
    calls(clocked, tenant, "bob", [3000] * 30)  # another user's calls do not count
    calls(clocked, tenant, "ann", [4000] * 5, model="llama-3")  # nor another model's
    reply = stats(clocked, tenant, "ann")
    assert reply.scope == pb.OUTPUT_STATS_SCOPE_USER
    assert (reply.samples, reply.user_samples) == (40, 40)
    assert reply.p50_output_tokens == percentile_disc(mine, 0.5)
    assert reply.p95_output_tokens == percentile_disc(mine, 0.95)
    assert reply.max_output_tokens == max(mine)
    assert (reply.window_hours, reply.min_samples) == (168, 20)


def test_a_user_with_too_few_calls_gets_the_tenants_figures(clocked: Stub) -> None:
    tenant = new_id("t")
    calls(clocked, tenant, "ann", [50] * 5)
    calls(clocked, tenant, "bob", list(range(100, 2100, 100)))
    reply = stats(clocked, tenant, "ann")
    everyone = [50] * 5 + list(range(100, 2100, 100))
    assert reply.scope == pb.OUTPUT_STATS_SCOPE_TENANT
    assert (reply.samples, reply.user_samples) == (25, 5)
    assert reply.p95_output_tokens == percentile_disc(everyone, 0.95) == 1900
    lowered = stats(clocked, tenant, "ann", min_samples=5)
    assert (lowered.scope, lowered.p95_output_tokens) == (pb.OUTPUT_STATS_SCOPE_USER, 50)
    direct = stats(clocked, tenant)  # no user: the tenant's
    assert (direct.scope, direct.samples, direct.user_samples) == (
        pb.OUTPUT_STATS_SCOPE_TENANT, 25, 0,
    )  # fmt: skip


def test_with_too_few_calls_anywhere_the_scope_is_none(clocked: Stub) -> None:
    tenant = new_id("t")
    assert stats(clocked, tenant, "ann").scope == pb.OUTPUT_STATS_SCOPE_NONE
    calls(clocked, tenant, "ann", [70, 80, 90])
    reply = stats(clocked, tenant, "ann")
    assert reply.scope == pb.OUTPUT_STATS_SCOPE_NONE
    assert (reply.samples, reply.max_output_tokens) == (3, 90)


def test_only_calls_with_usage_count_and_a_late_commit_does(clocked: Stub, clock: Clock) -> None:
    """Held and rolled-back holds have no output; an expired hold committed late does."""
    tenant = new_id("t")
    calls(clocked, tenant, "ann", [100] * 19)
    request = pb.ReserveRequest(idempotency_key=new_id("k"), tenant_id=tenant, user_id="ann",
                                model=MODEL, amount=4096, ttl_seconds=60)  # fmt: skip
    late_id = clocked.Reserve(request).reservation.reservation_id
    for _ in range(2):  # one stays held, one is rolled back
        request.idempotency_key = new_id("k")
        rid = clocked.Reserve(request).reservation.reservation_id
    clocked.Rollback(pb.RollbackRequest(tenant_id=tenant, reservation_id=rid))
    assert stats(clocked, tenant, "ann").user_samples == 19
    clock.advance(61)
    got = _wait_state(clocked, tenant, late_id, pb.RESERVATION_STATE_EXPIRED)
    assert got == pb.RESERVATION_STATE_EXPIRED
    usage = pb.Usage(output_tokens=3000)
    late = clocked.Commit(pb.CommitRequest(tenant_id=tenant, reservation_id=late_id, usage=usage))
    assert late.late
    reply = stats(clocked, tenant, "ann")
    assert (reply.scope, reply.samples, reply.max_output_tokens) == (
        pb.OUTPUT_STATS_SCOPE_USER, 20, 3000,
    )  # fmt: skip


def _wait_state(stub: Stub, tenant: str, rid: str, state: int) -> int:
    """The reservation's state once the sweeper has moved it to `state` (or after 5 s)."""
    request = pb.GetReservationRequest(tenant_id=tenant, reservation_id=rid)
    deadline = time.monotonic() + 5
    while True:
        found: int = stub.GetReservation(request).reservation.state
        if found == state or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_calls_older_than_the_window_are_left_out(clocked: Stub, clock: Clock) -> None:
    tenant = new_id("t")
    calls(clocked, tenant, "ann", [4000] * 20)
    clock.advance(3 * 3600)
    calls(clocked, tenant, "ann", [100] * 20)
    assert stats(clocked, tenant, "ann").max_output_tokens == 4000
    recent = stats(clocked, tenant, "ann", window_hours=2)
    assert (recent.samples, recent.max_output_tokens, recent.window_hours) == (20, 100, 2)


def test_the_newest_1000_calls_at_most_are_taken(clocked: Stub, clock: Clock) -> None:
    tenant = new_id("t")
    for _ in range(3):
        calls(clocked, tenant, "ann", [5000] * 100)
    clock.advance(1)
    for _ in range(10):
        calls(clocked, tenant, "ann", [10] * 100)
    reply = stats(clocked, tenant, "ann")
    assert (reply.samples, reply.max_output_tokens) == (1000, 10)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("missing tenant", {"tenant_id": ""}, "tenant_id"),
    ("bad tenant", {"tenant_id": "acme corp"}, "tenant_id"),
    ("tenant too long", {"tenant_id": "t" * 129}, "tenant_id"),
    ("bad user", {"user_id": "ann lee"}, "user_id"),
    ("user with a control character", {"user_id": "ann\x1b"}, "user_id"),
    ("missing model", {"model": ""}, "model"),
    ("bad model", {"model": "gpt 4o"}, "model"),
    ("negative window", {"window_hours": -1}, "window_hours"),
    ("window over 90 days", {"window_hours": 2161}, "window_hours"),
    ("negative min_samples", {"min_samples": -1}, "min_samples"),
    ("min_samples over 1000", {"min_samples": 1001}, "min_samples"),
]


@pytest.mark.parametrize(("fields", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_naming_the_field(
    clocked: Stub, fields: dict[str, Any], field: str
) -> None:
    request = pb.GetOutputStatsRequest(tenant_id="acme", user_id="ann", model=MODEL)
    for name, value in fields.items():
        setattr(request, name, value)
    failed = call_fails(clocked.GetOutputStats, request)
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT, failed.message
    assert field in [f for f, _ in failed.field_violations], failed.field_violations
