"""Predictive output holds (issue #17): PrepareContext with OUTPUT_HOLD_PREDICTED holds the
p95 of the output tokens this user (or, with fewer than 20 calls, the tenant) recently used
with the model, plus the margin, never more than max_output_tokens; it returns the caller's
max_tokens to send, the prompt fitted to the window less that; a longer reply is recorded in
full at commit (overage). Real ledger and context service on port 0."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context.output_hold import OutputHoldConfig
from tests.support import ContextServerThread, ServerThread, committed_calls, new_id

Stub = pb_grpc.LedgerServiceStub
MARGIN = 0.10
TTL_S = 1.0
MAX_OUTPUT = 4096


@pytest.fixture(scope="module")
def ctx(ledger: ServerThread) -> Iterator[Any]:
    """A context service keeping the ledger's figures for TTL_S (the default is 5 s)."""
    hold = OutputHoldConfig(margin=MARGIN, stats_ttl_s=TTL_S)
    server = ContextServerThread(ledger.target, output_hold=hold).start()
    with server.stub() as stub:
        yield stub
    server.stop()


def p95(values: Sequence[int]) -> int:
    """percentile_disc(0.95), as the ledger computes it."""
    return sorted(values)[math.ceil(0.95 * len(values)) - 1]


def with_margin(tokens: int) -> int:
    """ceil(tokens * 1.1), in integers."""
    return -(-tokens * 11 // 10)


def lognormal(seed: int, median: float, n: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [min(MAX_OUTPUT, round(rng.lognormvariate(math.log(median), 0.6))) for _ in range(n)]


def prepare(tenant: str, user: str = "ann", **fields: Any) -> cpb.PrepareContextRequest:
    asked: dict[str, Any] = {
        "idempotency_key": new_id("p"),
        "tenant_id": tenant,
        "user_id": user,
        "model": "gpt-4o",
        "messages": [
            cpb.ChatMessage(role=cpb.CHAT_ROLE_SYSTEM, content="Be brief."),
            cpb.ChatMessage(role=cpb.CHAT_ROLE_USER, content="What is a token ledger?"),
        ],
        "max_output_tokens": MAX_OUTPUT,
        "output_hold": cpb.OUTPUT_HOLD_PREDICTED,
    }
    return cpb.PrepareContextRequest(**(asked | fields))


def held(stub: Stub, tenant: str, reservation_id: str) -> pb.Reservation:
    request = pb.GetReservationRequest(tenant_id=tenant, reservation_id=reservation_id)
    reservation: pb.Reservation = stub.GetReservation(request).reservation
    return reservation


def test_the_hold_is_the_users_p95_plus_the_margin_and_max_tokens_is_the_callers(
    ctx: Any, stub: Stub
) -> None:
    tenant = new_id("t")
    outputs = lognormal(1, 300)
    committed_calls(stub, tenant, "ann", outputs)
    committed_calls(stub, tenant, "bob", [3000] * 40)  # the tenant's other user: not ann's
    reply = ctx.PrepareContext(prepare(tenant))
    prediction = reply.output_prediction
    hold = with_margin(p95(outputs))
    assert (prediction.scope, prediction.samples) == (pb.OUTPUT_STATS_SCOPE_USER, 40)
    assert (prediction.p95_output_tokens, prediction.hold_tokens) == (p95(outputs), hold)
    assert prediction.margin == MARGIN and not prediction.fallback_reason
    assert reply.breakdown.output_reserve == hold < MAX_OUTPUT
    assert reply.max_tokens == MAX_OUTPUT
    prompt = reply.breakdown.prompt_total
    assert reply.granted_tokens == reply.requested_tokens == prompt + hold
    reservation = held(stub, tenant, reply.reservation_id)
    assert reservation.amount == prompt + hold
    assert reservation.labels["ctx.output_hold"] == "predicted"


def test_without_the_option_the_hold_is_max_output_tokens_as_before(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    committed_calls(stub, tenant, "ann", [100] * 40)
    reply = ctx.PrepareContext(prepare(tenant, output_hold=cpb.OUTPUT_HOLD_UNSPECIFIED))
    assert reply.breakdown.output_reserve == reply.max_tokens == MAX_OUTPUT
    assert not reply.HasField("output_prediction")
    assert "ctx.output_hold" not in held(stub, tenant, reply.reservation_id).labels
    explicit = ctx.PrepareContext(prepare(tenant, output_hold=cpb.OUTPUT_HOLD_MAX_TOKENS))
    assert explicit.breakdown.output_reserve == MAX_OUTPUT


def test_a_user_with_few_calls_is_held_at_the_tenants_p95(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    everyone = lognormal(2, 800)
    committed_calls(stub, tenant, "ann", everyone)
    committed_calls(stub, tenant, "cat", [20] * 3)
    reply = ctx.PrepareContext(prepare(tenant, user="cat"))
    prediction = reply.output_prediction
    assert (prediction.scope, prediction.samples) == (pb.OUTPUT_STATS_SCOPE_TENANT, 43)
    assert prediction.p95_output_tokens == p95([*everyone, 20, 20, 20])
    assert reply.breakdown.output_reserve == with_margin(prediction.p95_output_tokens)


def test_with_too_few_calls_anywhere_max_output_tokens_is_held(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    committed_calls(stub, tenant, "ann", [50] * 19)
    reply = ctx.PrepareContext(prepare(tenant))
    assert reply.output_prediction.scope == pb.OUTPUT_STATS_SCOPE_NONE
    assert reply.output_prediction.hold_tokens == MAX_OUTPUT
    assert reply.breakdown.output_reserve == reply.max_tokens == MAX_OUTPUT


def test_the_hold_never_exceeds_max_output_tokens(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    committed_calls(stub, tenant, "ann", [3000] * 40)
    reply = ctx.PrepareContext(prepare(tenant, max_output_tokens=1000))
    assert reply.output_prediction.p95_output_tokens == 3000
    assert reply.output_prediction.hold_tokens == reply.breakdown.output_reserve == 1000
    assert reply.max_tokens == 1000


def test_a_reply_longer_than_the_hold_is_recorded_in_full_as_overage(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    committed_calls(stub, tenant, "ann", [200] * 40)
    reply = ctx.PrepareContext(prepare(tenant))
    assert reply.breakdown.output_reserve == 220 and reply.max_tokens == MAX_OUTPUT
    prompt = reply.breakdown.prompt_total
    usage = pb.Usage(input_tokens=prompt, output_tokens=3000)  # the model took 3000 of 4096
    commit = pb.CommitRequest(tenant_id=tenant, reservation_id=reply.reservation_id, usage=usage)
    done = stub.Commit(commit)
    assert (done.committed, done.released, done.overage) == (prompt + 220, 0, 3000 - 220)
    assert done.reservation.usage.output_tokens == 3000
    balance = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann")).balance
    assert balance.used == 40 * 210 + prompt + 3000
    stats = stub.GetOutputStats(pb.GetOutputStatsRequest(tenant_id=tenant, user_id="ann",
                                                         model="gpt-4o"))  # fmt: skip
    assert (stats.samples, stats.max_output_tokens) == (41, 3000)


def long_chat(turns: int) -> list[cpb.ChatMessage]:
    chat = [cpb.ChatMessage(role=cpb.CHAT_ROLE_SYSTEM, content="Be brief.")]
    for i in range(turns):
        role = cpb.CHAT_ROLE_USER if i % 2 == 0 else cpb.CHAT_ROLE_ASSISTANT
        chat.append(cpb.ChatMessage(role=role, content=f"turn {i}: " + "words and more " * 30))
    return chat


def test_the_prompt_still_fits_the_window_less_max_tokens(ctx: Any, stub: Stub) -> None:
    """The prediction holds less; it never gives the prompt room the reply may need."""
    tenant = new_id("t")
    committed_calls(stub, tenant, "ann", [100] * 40)
    fields = {"messages": long_chat(41), "context_window_tokens": 2000, "max_output_tokens": 1000}
    predicted = ctx.PrepareContext(prepare(tenant, **fields))
    plain = ctx.PrepareContext(prepare(tenant, output_hold=cpb.OUTPUT_HOLD_MAX_TOKENS, **fields))
    assert predicted.limited_by == plain.limited_by == cpb.LIMITED_BY_WINDOW
    assert predicted.max_tokens == 1000 and predicted.breakdown.output_reserve == 110
    assert predicted.breakdown.prompt_total + predicted.max_tokens <= 2000
    assert predicted.breakdown.prompt_total == plain.breakdown.prompt_total
    assert predicted.source_indices == plain.source_indices
    assert predicted.granted_tokens == plain.granted_tokens - (1000 - 110)


def test_more_calls_fit_a_budget_when_holds_are_predicted(ctx: Any, stub: Stub) -> None:
    """Holds left open on a conversation with a 12,000-token limit: with max_tokens 4096 two
    fit; with holds of the user's p95 plus the margin (about 600), as many as that allows."""
    tenant = new_id("t")
    committed_calls(stub, tenant, "ann", lognormal(3, 200))
    stub.SetQuota(pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant,
                                     user_id="ann", conversation_id="c1", limit=12_000,
                                     period=pb.PERIOD_NONE))  # fmt: skip
    plain, _ = _holds_until_refused(ctx, stub, tenant, cpb.OUTPUT_HOLD_MAX_TOKENS)
    predicted, each = _holds_until_refused(ctx, stub, tenant, cpb.OUTPUT_HOLD_PREDICTED)
    assert plain == 2
    assert predicted == 12_000 // each >= 15


def _holds_until_refused(ctx: Any, stub: Stub, tenant: str, hold: int) -> tuple[int, int]:
    """How many PrepareContext holds fit before the budget refuses one, and the first's size;
    then rolls them back for the next count."""
    replies: list[cpb.PrepareContextResponse] = []
    while len(replies) < 100:
        try:
            replies.append(
                ctx.PrepareContext(prepare(tenant, conversation_id="c1", output_hold=hold))
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            break
    for reply in replies:
        stub.Rollback(pb.RollbackRequest(tenant_id=tenant, reservation_id=reply.reservation_id))
    return len(replies), replies[0].granted_tokens


def test_figures_are_kept_for_the_ttl_then_read_again(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    committed_calls(stub, tenant, "ann", [100] * 40)
    first = ctx.PrepareContext(prepare(tenant)).output_prediction
    committed_calls(stub, tenant, "ann", [900] * 40)  # the p95 is 900 from now on
    cached = ctx.PrepareContext(prepare(tenant)).output_prediction
    assert (first.p95_output_tokens, cached.p95_output_tokens) == (100, 100)
    assert cached.stats_age_ms > 0
    time.sleep(TTL_S)
    fresh = ctx.PrepareContext(prepare(tenant)).output_prediction
    assert (fresh.p95_output_tokens, fresh.samples) == (900, 80)


def test_a_retry_with_the_same_key_gets_the_same_hold(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    committed_calls(stub, tenant, "ann", [100] * 40)
    request = prepare(tenant)
    first, again = ctx.PrepareContext(request), ctx.PrepareContext(request)
    assert again.reservation_id == first.reservation_id
    assert again.breakdown.output_reserve == first.breakdown.output_reserve == 110
