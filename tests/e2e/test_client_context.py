"""ContextClient (services.client.context): an OpenAI-format conversation fitted by a real
context service that holds in a real ledger, the caller's own messages sent back by reference,
the hold committed with the ledger client, the same key from many threads one hold, and bad
inputs refused before anything is sent."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import ClientError, InvalidArgument, LedgerClient
from services.client.context import ContextClient
from tests.support import ContextServerThread, ServerThread, new_id


def history(turns: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": "You plan trips."}]
    for i in range(turns):
        out.append({"role": "user", "content": f"Turn {i}: a day in Lisbon? " * 8})
        out.append({"role": "assistant", "content": f"Turn {i}: trams, fado, pasteis. " * 12,
                    "x-kept": i})  # a field of the caller's own, which must survive  # fmt: skip
    out.append({"role": "user", "content": "And the last day?"})
    return out


def fields(tenant: str, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"tenant_id": tenant, "user_id": "ann", "conversation_id": "c1", "model": "gpt-4o",
            "messages": messages, "max_tokens": 200, "context_window_tokens": 1_500,
            **kw}  # fmt: skip


@pytest.fixture
def client(context_service: ContextServerThread) -> Any:
    with ContextClient(context_service.target) as c:
        yield c


def test_a_long_history_is_fitted_kept_messages_are_the_callers_and_the_hold_commits(
    client: ContextClient, ledger: ServerThread
) -> None:
    tenant = new_id("t")
    messages = history(30)
    p = client.prepare(**fields(tenant, messages, strategy="summarize"))
    reply = p.response
    assert reply.limited_by == cpb.LIMITED_BY_WINDOW and reply.summarized_indices
    assert len(reply.messages) == 1  # only the summary came back
    assert p.messages[0] is messages[0] and p.messages[-1] is messages[-1]
    summary = p.messages[list(reply.source_indices).index(-1)]
    assert summary == {"role": "user", "content": reply.messages[0].content, "name": "summary"}
    kept = [m for m in p.messages if m is not summary]
    assert all(any(m is o for o in messages) for m in kept)
    assert p.max_tokens == 200
    with LedgerClient(ledger.target) as ledger_client:
        held = ledger_client.get_balance(tenant_id=tenant, user_id="ann").balance.held
        assert held == reply.granted_tokens
        ledger_client.commit(tenant_id=p.tenant_id, reservation_id=p.reservation_id,
                             usage=pb.Usage(input_tokens=reply.breakdown.prompt_total,
                                            output_tokens=150))  # fmt: skip
        after = ledger_client.get_balance(tenant_id=tenant, user_id="ann").balance
    assert (after.held, after.used) == (0, reply.breakdown.prompt_total + 150)


def test_a_cut_message_keeps_the_callers_other_fields(client: ContextClient) -> None:
    messages = history(2)
    big = {"role": "user", "content": "My itinerary: " + "day " * 3_000, "x-kept": "big"}
    messages.insert(len(messages) - 1, big)
    p = client.prepare(**fields(new_id("t"), messages, strategy="truncate"))
    cut = p.messages[list(p.response.source_indices).index(len(messages) - 2)]
    assert cut["x-kept"] == "big" and "characters removed" in cut["content"]
    assert big["content"].startswith("My itinerary: day day")  # the caller's dict untouched


def test_the_same_key_from_eight_threads_is_one_hold(
    client: ContextClient, ledger: ServerThread
) -> None:
    """gRPC's retries and the caller's own resend the same key: however many arrive at
    once, the ledger holds once and every answer names that hold."""
    tenant = new_id("t")
    ask = fields(tenant, history(10), idempotency_key=new_id("k"))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.prepare(**ask), range(8)))
    assert len({a.reservation_id for a in answers}) == 1
    with ledger.stub() as stub:
        replay = list(stub.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant)))
    reserved = [e for r in replay for e in r.events if e.event_type == "TokensReserved"]
    assert len(reserved) == 1


def test_the_asyncio_client_answers_alike(context_service: ContextServerThread) -> None:
    async def run() -> Any:
        async with ContextClient(context_service.target) as c:
            return await c.aprepare(**fields(new_id("t"), history(30)))

    p = asyncio.run(run())
    assert p.response.dropped_indices and p.messages[-1]["content"] == "And the last day?"


def test_bad_inputs_are_refused_before_anything_is_sent_or_by_the_service(
    client: ContextClient,
) -> None:
    tenant = new_id("t")
    with pytest.raises(ClientError, match="strategy is 'shrink'; must be one of window"):
        client.prepare(**fields(tenant, history(1), strategy="shrink"))
    with pytest.raises(ClientError, match="bad PrepareContext field"):
        client.prepare(**fields(tenant, history(1), no_such_field=1))
    with pytest.raises(ClientError, match="messages_view is the client's own"):
        client.prepare(**fields(tenant, history(1), messages_view=cpb.MESSAGES_VIEW_FULL))
    with pytest.raises(InvalidArgument) as unknown:
        client.prepare(**fields(tenant, history(1), model="no-such-model",
                                context_window_tokens=0))  # fmt: skip
    assert unknown.value.reason == "UNKNOWN_MODEL"
