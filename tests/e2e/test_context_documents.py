"""Progressive loading (issue #19): PlanDocument through a real ContextServer calling a real
ledger over gRPC, with real tokenizers. A plan covers every token of the document, each chunk
within the chunk size and the window, overlaps exact; a reserved plan is held whole or not at
all; bad input is refused with nothing held."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import ContextServerThread, ServerThread, call_fails, new_id

Stub = pb_grpc.LedgerServiceStub
WORDS = [
    "ledger",
    "token",
    "budget",
    "window",
    "chunk",
    "overlap",
    "museum",
    "train",
    "hotel",
    "beach",
    "price",
]


@pytest.fixture(scope="module")
def ctx(ledger: ServerThread) -> Iterator[Any]:
    server = ContextServerThread(ledger.target).start()
    with server.stub() as s:
        yield s
    server.stop()


def document(chars: int, seed: int = 7, extra: str = "") -> str:
    """Paragraphs of sentences (a few without a paragraph break for a long stretch)."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    while sum(len(p) + 2 for p in paragraphs) < chars:
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))).capitalize()
            + rng.choice([".", "!", "?"]) + extra
            for _ in range(rng.randint(1, 30))
        ]  # fmt: skip
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def plan(ctx: Any, text: str, **kw: Any) -> Any:
    fields: dict[str, Any] = {"tenant_id": new_id("t"), "model": "gpt-4o", "text": text,
                              "chunk_tokens": 500, "overlap_tokens": 50}  # fmt: skip
    fields.update(kw)
    return ctx.PlanDocument(cpb.PlanDocumentRequest(**fields))


def count_text(ctx: Any, text: str, model: str = "gpt-4o") -> int:
    return int(ctx.CountTokens(cpb.CountTokensRequest(model=model, text=text)).total_tokens)


def assert_covers(text: str, reply: Any, chunk: int, overlap: int, *, exact: bool) -> None:
    """Every token in order, the byte offsets locate each text, the overlaps as asked."""
    data = text.encode()
    chunks = reply.chunks
    assert chunks[0].start_token == 0 and chunks[0].overlap_tokens == 0
    assert chunks[-1].end_token == reply.document_tokens and chunks[-1].end_byte == len(data)
    rebuilt = chunks[0].text
    for before, c in itertools.pairwise(chunks):
        assert c.start_token == before.end_token - c.overlap_tokens
        assert c.overlap_tokens == overlap if exact else c.overlap_tokens >= overlap
        rebuilt += data[before.end_byte : c.end_byte].decode()
    assert rebuilt == text
    for i, c in enumerate(chunks):
        assert c.index == i and data[c.start_byte : c.end_byte].decode() == c.text
        assert 0 < c.tokens <= chunk


def test_a_plan_covers_every_token_each_chunk_within_the_window_overlaps_exact(
    ctx: Any,
) -> None:
    text = document(60_000)
    reply = plan(ctx, text, max_output_tokens=300, context_window_tokens=1_000)
    assert reply.document_tokens == count_text(ctx, text)
    assert len(reply.chunks) > 20 and reply.exact and reply.encoding == "o200k_base"
    assert_covers(text, reply, 500, 50, exact=True)
    for c in reply.chunks:
        assert c.tokens == count_text(ctx, c.text)  # its own count, exactly
        assert c.tokens + 300 <= reply.context_window_tokens == 1_000
    ends = {c.boundary for c in reply.chunks[:-1]}
    assert ends <= {"paragraph", "sentence"} and "paragraph" in ends
    assert reply.chunks[-1].boundary == "end"
    assert not any(c.reservation_id for c in reply.chunks) and reply.reserved_tokens == 0


def test_without_paragraphs_chunks_end_on_sentences_and_without_either_on_tokens(
    ctx: Any,
) -> None:
    prose = document(20_000).replace("\n\n", " ")
    reply = plan(ctx, prose)
    assert {c.boundary for c in reply.chunks[:-1]} == {"sentence"}
    assert_covers(prose, reply, 500, 50, exact=True)
    run = "x" * 30_000  # one long word: no boundary anywhere
    reply = plan(ctx, run, chunk_tokens=64, overlap_tokens=8, omit_text=True)
    assert {c.boundary for c in reply.chunks[:-1]} == {"token"}
    assert all(c.text == "" for c in reply.chunks) and reply.chunks[-1].end_byte == len(run)


def test_a_multibyte_document_is_planned_for_llama_3_without_splitting_characters(
    ctx: Any,
) -> None:
    text = document(15_000, extra=" 東京の駅で 🚆 café.")
    reply = plan(ctx, text, model="llama-3.1-8b", chunk_tokens=300, overlap_tokens=40)
    assert reply.encoding == "llama3"
    assert reply.document_tokens == count_text(ctx, text, "llama-3.1-8b")
    assert_covers(text, reply, 300, 40, exact=False)
    for c in reply.chunks:
        assert c.tokens == count_text(ctx, c.text, "llama-3.1-8b")


# --- reserved plans ----------------------------------------------------------------------------


def set_user_quota(stub: Stub, tenant: str, limit: int) -> None:
    request = pb.SetQuotaRequest(idempotency_key=new_id("q"), tenant_id=tenant, user_id="ann",
                                 limit=limit, period=pb.PERIOD_NONE)  # fmt: skip
    stub.SetQuota(request)


def held(stub: Stub, tenant: str) -> int:
    reply = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann"))
    return int(reply.balance.held)


def reserved(ctx: Any, tenant: str, key: str, text: str) -> Any:
    return plan(ctx, text, tenant_id=tenant, user_id="ann", conversation_id="doc-1",
                idempotency_key=key, reserve=True, max_output_tokens=100)  # fmt: skip


def test_a_reserved_plan_holds_every_chunk_and_a_retry_holds_nothing_more(
    ctx: Any, stub: Stub
) -> None:
    tenant, key, text = new_id("t"), new_id("k"), document(20_000)
    set_user_quota(stub, tenant, 1_000_000)
    reply = reserved(ctx, tenant, key, text)
    ids = [c.reservation_id for c in reply.chunks]
    assert all(ids) and len(set(ids)) == len(ids)
    assert reply.reserved_tokens == reply.document_tokens + sum(
        c.overlap_tokens for c in reply.chunks) + 100 * len(ids)  # fmt: skip
    assert held(stub, tenant) == reply.reserved_tokens
    for c in reply.chunks:
        got = stub.GetReservation(
            pb.GetReservationRequest(tenant_id=tenant, reservation_id=c.reservation_id)
        )
        assert got.reservation.amount == c.tokens + 100  # fmt: skip
    again = reserved(ctx, tenant, key, text)
    assert [c.reservation_id for c in again.chunks] == ids
    assert held(stub, tenant) == reply.reserved_tokens


def test_a_plan_that_the_budget_fits_only_in_part_is_refused_whole(ctx: Any, stub: Stub) -> None:
    tenant, text = new_id("t"), document(20_000)
    whole = plan(ctx, text).chunks
    total = sum(c.tokens + 100 for c in whole)
    set_user_quota(stub, tenant, total // 2)
    failed = call_fails(lambda _: reserved(ctx, tenant, new_id("k"), text), None)
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.message
    assert failed.reason == "BUDGET_EXHAUSTED"
    assert "whole plan" in failed.message
    assert held(stub, tenant) == 0
    events = [e.event_type for r in stub.ReplayHistory(pb.ReplayHistoryRequest(
        tenant_id=tenant)) for e in r.events]  # fmt: skip
    assert events.count("TokensReserved") == events.count("ReservationRolledBack") > 0
    set_user_quota(stub, tenant, total)  # the same plan, now affordable, is held whole
    assert held(stub, tenant) == 0
    assert reserved(ctx, tenant, new_id("k"), text).reserved_tokens == total
    assert held(stub, tenant) == total


# --- bad input ----------------------------------------------------------------------------------


def _set(**fields: Any) -> Callable[[cpb.PlanDocumentRequest], None]:
    def change(r: cpb.PlanDocumentRequest) -> None:
        for name, value in fields.items():
            setattr(r, name, value)

    return change


CASES = [
    ("zero chunk", _set(chunk_tokens=0), "chunk_tokens"),
    ("negative chunk", _set(chunk_tokens=-5), "chunk_tokens"),
    ("overlap equal to the chunk", _set(chunk_tokens=100, overlap_tokens=100), "overlap_tokens"),
    ("overlap above the chunk", _set(chunk_tokens=100, overlap_tokens=150), "overlap_tokens"),
    ("negative overlap", _set(overlap_tokens=-1), "overlap_tokens"),
    ("chunk and reply over the window",
     _set(context_window_tokens=1_000, chunk_tokens=900, max_output_tokens=200), "chunk_tokens"),
    ("negative output", _set(max_output_tokens=-1), "max_output_tokens"),
    ("empty text", _set(text=""), "text"),
    ("text over 4 MiB", _set(text="a" * (4 * 2**20 + 1)), "text"),
    ("no idempotency key", _set(idempotency_key=""), "idempotency_key"),
    ("no user", _set(user_id="", conversation_id=""), "user_id"),
    ("no tenant", _set(tenant_id=""), "tenant_id"),
    ("an estimated encoding", _set(model="claude-sonnet-4"), "encoding"),
    ("unknown model", _set(model="no-such-model"), "model"),
    ("no model", _set(model=""), "model"),
    ("reserve with only an encoding", _set(model="", encoding="o200k_base",
                                           context_window_tokens=8_000), "model"),
    ("negative ttl", _set(ttl_seconds=-1), "ttl_seconds"),
    ("over 100 chunks", _set(chunk_tokens=20, overlap_tokens=0), "chunk_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_field_with_nothing_held(
    ctx: Any, stub: Stub, change: Callable[[cpb.PlanDocumentRequest], None], field: str
) -> None:
    tenant = new_id("t")
    request = cpb.PlanDocumentRequest(
        idempotency_key=new_id("k"), tenant_id=tenant, user_id="ann", conversation_id="doc-1",
        model="gpt-4o", text=document(12_000), chunk_tokens=500, overlap_tokens=50,
        max_output_tokens=100, reserve=True,
    )  # fmt: skip
    change(request)
    failed = call_fails(ctx.PlanDocument, request)
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT, failed.message
    assert field in [f for f, _ in failed.field_violations], failed.field_violations
    replies = stub.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant or "none"))
    assert sum(len(r.events) for r in replies) == 0
