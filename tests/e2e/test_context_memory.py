"""Memory per conversation (issue #19), through a real ContextServer with its memory table in
the test PostgreSQL, calling a real ledger over gRPC: facts set, listed, replaced and deleted;
PrepareContext putting them back as one system message within the memory's share; the
retention ratio; and bad input refused with nothing written."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context import memory
from services.context.memory_store import LOCK_SQL, UPSERT_SQL
from services.context.remote_summarizer import RemoteSummarizerConfig
from services.context.responses import messages_to_send
from tests.support import ContextServerThread, ServerThread, call_fails, failure, new_id

Stub = pb_grpc.LedgerServiceStub
SYSTEM = "You are a careful assistant for a travel agency. Answer briefly."
CODE = "ZX-4471-QP"
TOPICS = ["hotels in Lisbon", "trains to Porto", "museums in Madrid", "beaches near Faro"]


@pytest.fixture(scope="module")
def metric_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture(scope="module")
def ctx(
    ledger: ServerThread, database_url: str, metric_reader: InMemoryMetricReader
) -> Iterator[Any]:
    server = ContextServerThread(
        ledger.target,
        memory_url=database_url,
        meter_provider=MeterProvider(metric_readers=[metric_reader]),
    ).start()
    with server.stub() as s:
        yield s
    server.stop()


def msg(role: int, content: str, **kw: Any) -> cpb.ChatMessage:
    return cpb.ChatMessage(role=role, content=content, **kw)  # type: ignore[arg-type]


def conversation(turns: int, plant: dict[int, str] | None = None) -> list[cpb.ChatMessage]:
    """A system message, `turns` exchanges (turn i's user message says plant[i] if given),
    then the input question."""
    out = [msg(cpb.CHAT_ROLE_SYSTEM, SYSTEM)]
    for i in range(turns):
        topic = TOPICS[i % len(TOPICS)]
        said = (plant or {}).get(i, f"Turn {i}: what do you know about {topic}?")
        out.append(msg(cpb.CHAT_ROLE_USER, said))
        body = " ".join(f"{topic} fact {i}.{j} costs {10 * j + i} euros." for j in range(6))
        out.append(msg(cpb.CHAT_ROLE_ASSISTANT, body))
    out.append(msg(cpb.CHAT_ROLE_USER, "So what is my booking code again?"))
    return out


def fact(key: str, value: str, source_index: int = -1) -> cpb.MemoryFact:
    return cpb.MemoryFact(key=key, value=value, source_index=source_index)


def set_facts(ctx: Any, tenant: str, *facts: cpb.MemoryFact, chat: str = "chat-1") -> Any:
    return ctx.SetMemory(
        cpb.SetMemoryRequest(tenant_id=tenant, user_id="ann", conversation_id=chat, facts=facts)
    )


def listed(ctx: Any, tenant: str, chat: str = "chat-1") -> list[tuple[str, str]]:
    reply = ctx.ListMemory(
        cpb.ListMemoryRequest(tenant_id=tenant, user_id="ann", conversation_id=chat)
    )
    return [(f.key, f.value) for f in reply.facts]


def prepare(ctx: Any, tenant: str, messages: list[cpb.ChatMessage], **kw: Any) -> Any:
    return ctx.PrepareContext(request(tenant, messages=messages, **kw))


def request(tenant: str, **kw: Any) -> cpb.PrepareContextRequest:
    fields: dict[str, Any] = {
        "idempotency_key": new_id("p"),
        "tenant_id": tenant,
        "user_id": "ann",
        "conversation_id": "chat-1",
        "model": "gpt-4o",
        "max_output_tokens": 200,
        "context_window_tokens": 4_000,
        "strategy": cpb.STRATEGY_WINDOW,
    }
    fields.update(kw)
    return cpb.PrepareContextRequest(**fields)


def memory_message(reply: Any) -> cpb.ChatMessage:
    found: list[cpb.ChatMessage] = [
        m for m, s in zip(reply.messages, reply.source_indices, strict=True) if s == -2
    ]
    assert len(found) == 1, list(reply.source_indices)
    return found[0]


def recount(ctx: Any, reply: Any) -> int:
    counted = ctx.CountTokens(cpb.CountTokensRequest(model="gpt-4o", messages=reply.messages))
    return int(counted.total_tokens)


# --- memory in the prompt --------------------------------------------------------------------


def test_a_fact_stated_in_turn_3_of_200_is_in_the_prompt_after_window_with_memory(
    ctx: Any,
) -> None:
    tenant = new_id("t")
    messages = conversation(200, {3: f"My booking code is {CODE}, keep it."})
    set_facts(ctx, tenant, fact("booking_code", CODE, source_index=7))
    without = prepare(ctx, tenant, messages, retention_markers=[CODE])
    reply = prepare(ctx, tenant, messages, use_memory=True, retention_markers=[CODE])

    assert 7 in without.dropped_indices and 7 in reply.dropped_indices
    assert all(CODE not in m.content for m in without.messages)
    assert without.retention.facts_total == 1 and without.retention.ratio == 0.0
    assert list(without.retention.lost) == [CODE]
    mem = memory_message(reply)
    assert mem.role == cpb.CHAT_ROLE_SYSTEM and mem.name == memory.MEMORY_NAME
    assert f"- booking_code: {CODE}" in mem.content
    assert list(reply.source_indices[:2]) == [0, -2]  # right after the system message
    assert list(reply.memory_keys) == ["booking_code"] and not reply.memory_left_out
    # counted exactly like any other message: the prompt recounts to the same total
    assert recount(ctx, reply) == reply.breakdown.prompt_total
    assert reply.breakdown.memory > 0
    assert reply.breakdown.system == without.breakdown.system
    assert reply.retention.facts_total == 2 and reply.retention.facts_kept == 2
    assert reply.retention.ratio == 1.0
    # every other index still names the caller's message
    for m, s in zip(reply.messages, reply.source_indices, strict=True):
        if s >= 0:
            assert m == messages[s]


def test_key_information_on_messages_is_remembered_and_a_later_statement_wins(
    ctx: Any,
) -> None:
    tenant = new_id("t")
    messages = conversation(200, {3: f"My booking code is {CODE}.", 150: "Make it Porto."})
    messages[7].key_information.extend([fact("booking_code", CODE), fact("city", "Lisbon")])
    messages[301].key_information.append(fact("city", "Porto"))
    reply = prepare(ctx, tenant, messages, use_memory=True, retention_markers=[CODE])
    content = memory_message(reply).content
    assert f"- booking_code: {CODE}" in content and "- city: Porto" in content
    assert "Lisbon" not in content and 7 in reply.dropped_indices
    stored = ctx.ListMemory(cpb.ListMemoryRequest(tenant_id=tenant, user_id="ann",
                                                  conversation_id="chat-1")).facts  # fmt: skip
    assert {(f.key, f.value, f.source_index) for f in stored} == {
        ("booking_code", CODE, 7), ("city", "Porto", 301)}  # fmt: skip
    assert reply.retention.ratio == 1.0 and reply.retention.facts_total == 3


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b", "mistral-nemo", "gpt-4o"])
def test_the_memory_message_is_counted_with_the_chat_for_each_family(ctx: Any, model: str) -> None:
    """The fitted prompt with its memory message recounts (CountTokens, the family's own
    format) to exactly the prompt total PrepareContext reported."""
    tenant = new_id("t")
    set_facts(ctx, tenant, fact("booking_code", CODE), fact("city", "Porto"))
    reply = prepare(ctx, tenant, conversation(120), model=model, use_memory=True,
                    context_window_tokens=6_000)  # fmt: skip
    assert "- city: Porto" in memory_message(reply).content and reply.dropped_indices
    counted = ctx.CountTokens(cpb.CountTokensRequest(model=model, messages=reply.messages))
    assert counted.total_tokens == reply.breakdown.prompt_total
    assert reply.breakdown.memory == counted.message_tokens[list(reply.source_indices).index(-2)]


def test_a_fact_updated_later_shows_its_newer_value(ctx: Any) -> None:
    tenant = new_id("t")
    set_facts(ctx, tenant, fact("hotel_city", "Lisbon"), fact("budget_eur", "900"))
    set_facts(ctx, tenant, fact("hotel_city", "Porto"))
    assert listed(ctx, tenant) == [("hotel_city", "Porto"), ("budget_eur", "900")]
    reply = prepare(ctx, tenant, conversation(60), use_memory=True)
    content = memory_message(reply).content
    assert "- hotel_city: Porto" in content and "Lisbon" not in content
    assert content.index("hotel_city") < content.index("budget_eur")  # newest first


def test_memory_over_its_share_keeps_the_newest_facts_and_reports_the_rest(ctx: Any) -> None:
    tenant = new_id("t")
    keys = [f"note_{i:02d}" for i in range(12)]
    for i, key in enumerate(keys):  # one call each: each later one is newer
        set_facts(ctx, tenant, fact(key, f"detail {i} " + "lorem ipsum dolor " * 20))
        time.sleep(0.002)
    share = 0.05
    reply = prepare(ctx, tenant, conversation(60), use_memory=True,
                    policy=cpb.AllocationPolicy(memory_share=share))  # fmt: skip
    room = int(share * (4_000 - 200))
    assert 0 < reply.breakdown.memory <= room
    newest = list(reversed(keys))
    kept = list(reply.memory_keys)
    assert kept and kept == newest[: len(kept)] and reply.memory_left_out
    assert sorted(kept + list(reply.memory_left_out)) == sorted(keys)
    assert list(reply.memory_left_out) == newest[len(kept) :]
    assert reply.retention.facts_total == 12
    assert reply.retention.facts_kept == len(kept)
    assert reply.retention.ratio == pytest.approx(len(kept) / 12)
    assert reply.source_indices[0] == 0 and reply.messages[0].content == SYSTEM


def test_memory_never_displaces_system_or_pinned_messages(ctx: Any) -> None:
    """A window that holds just the system, pinned and input messages and the output: the
    memory is left out whole (reported), not a refusal and not a dropped pinned message."""
    tenant = new_id("t")
    set_facts(ctx, tenant, fact("booking_code", CODE))
    messages = conversation(10)
    messages[3].pinned = True
    base = prepare(ctx, tenant, messages, context_window_tokens=100_000)
    mandatory = base.breakdown.system + base.breakdown.pinned + base.breakdown.input
    window = mandatory + base.breakdown.reply_priming + 200 + 3
    reply = prepare(ctx, tenant, messages, context_window_tokens=window, use_memory=True,
                    policy=cpb.AllocationPolicy(memory_share=1.0))  # fmt: skip
    assert -2 not in reply.source_indices and reply.breakdown.memory == 0
    assert list(reply.memory_left_out) == ["booking_code"]
    assert {0, 3, len(messages) - 1} <= set(reply.source_indices)
    assert reply.breakdown.output_reserve == 200


def test_a_conversation_without_facts_is_fitted_as_before(ctx: Any) -> None:
    tenant = new_id("t")
    messages = conversation(60)
    plain = prepare(ctx, tenant, messages)
    with_memory = prepare(ctx, tenant, messages, use_memory=True)
    assert list(with_memory.source_indices) == list(plain.source_indices)
    assert with_memory.breakdown == plain.breakdown
    assert with_memory.retention.facts_total == 0 and with_memory.retention.ratio == 1.0


# --- facts the remote summarizer proposes ---------------------------------------------------

SUMMARY = "Earlier the user booked a hotel in Lisbon and asked about trains to Porto."


class _Endpoint(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions answering `content` with reported usage."""

    content = SUMMARY
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        message = {"role": "assistant", "content": type(self).content}
        reply = {"choices": [{"index": 0, "message": message}],
                 "usage": {"prompt_tokens": 300, "completion_tokens": 40}}  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def remote_ctx(ledger: ServerThread, database_url: str) -> Iterator[Any]:
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{http_server.server_address[1]}/v1"
    config = RemoteSummarizerConfig(url, "gpt-4o-mini", timeout_s=5)
    server = ContextServerThread(ledger.target, memory_url=database_url,
                                 remote_summarizer=config).start()  # fmt: skip
    with server.stub() as s:
        yield s
    server.stop()
    http_server.shutdown()
    thread.join(10)


def test_facts_the_remote_summarizer_proposes_are_checked_and_set_for_later_calls(
    remote_ctx: Any,
) -> None:
    tenant = new_id("t")
    set_facts(remote_ctx, tenant, fact("hotel", "Pestana"))
    _Endpoint.requests = []
    _Endpoint.content = SUMMARY + '\nFACTS: {"booking_code": "ZX-9", "hotel": "Casa Azul", ' \
        '"bad key": "x", "nights": 3}'  # fmt: skip
    reply = prepare(remote_ctx, tenant, conversation(40), use_memory=True,
                    strategy=cpb.STRATEGY_SUMMARIZE, context_window_tokens=1_500)  # fmt: skip
    assert "FACTS:" in _Endpoint.requests[-1]["messages"][0]["content"]
    summary = reply.messages[list(reply.source_indices).index(-1)]
    assert summary.content == SUMMARY and reply.summarizer.kind == "remote"
    assert list(reply.memory_proposed) == ["booking_code", "nights"]
    assert "'bad key'" in reply.summarizer.facts_note
    assert dict(listed(remote_ctx, tenant)) == {
        "hotel": "Pestana",
        "booking_code": "ZX-9",
        "nights": "3",
    }  # the caller's fact wins
    later = prepare(remote_ctx, tenant, conversation(2), use_memory=True)
    assert "- booking_code: ZX-9" in memory_message(later).content


def test_without_memory_the_summarizer_is_not_asked_for_facts_and_none_are_set(
    remote_ctx: Any,
) -> None:
    tenant = new_id("t")
    _Endpoint.requests = []
    _Endpoint.content = SUMMARY + '\nFACTS: {"booking_code": "ZX-9"}'
    reply = prepare(remote_ctx, tenant, conversation(40), strategy=cpb.STRATEGY_SUMMARIZE,
                    context_window_tokens=1_500)  # fmt: skip
    assert "FACTS:" not in _Endpoint.requests[-1]["messages"][0]["content"]
    assert not reply.memory_proposed and listed(remote_ctx, tenant) == []


# --- set, list, delete -------------------------------------------------------------------------


def test_facts_are_listed_newest_first_deleted_by_key_or_all_and_kept_per_tenant(
    ctx: Any,
) -> None:
    tenant, other = new_id("t"), new_id("t")
    reply = set_facts(ctx, tenant, fact("a", "1", source_index=4), fact("b", "2"))
    assert {f.key: f.source_index for f in reply.facts} == {"a": 4, "b": -1}
    assert all(f.set_at_unix_ms > 0 for f in reply.facts)
    set_facts(ctx, tenant, fact("c", "3"))
    set_facts(ctx, tenant, fact("z", "elsewhere"), chat="chat-2")
    assert listed(ctx, tenant)[0] == ("c", "3") and len(listed(ctx, tenant)) == 3
    assert listed(ctx, other) == []

    def delete(*keys: str, chat: str = "chat-1") -> int:
        request = cpb.DeleteMemoryRequest(tenant_id=tenant, user_id="ann",
                                          conversation_id=chat, keys=keys)  # fmt: skip
        return int(ctx.DeleteMemory(request).deleted)

    assert delete("a", "nope") == 1
    assert sorted(listed(ctx, tenant)) == [("b", "2"), ("c", "3")]
    assert delete() == 2 and listed(ctx, tenant) == []
    assert listed(ctx, tenant, chat="chat-2") == [("z", "elsewhere")]


def test_a_conversation_over_its_bound_of_facts_is_refused_with_nothing_written(
    ctx: Any,
) -> None:
    tenant = new_id("t")
    n = memory.memory_facts_count_max
    set_facts(ctx, tenant, *(fact(f"k{i}", "v") for i in range(n)))
    failed = call_fails(ctx.SetMemory, cpb.SetMemoryRequest(
        tenant_id=tenant, user_id="ann", conversation_id="chat-1",
        facts=[fact("k0", "changed"), fact("one_more", "v")]))  # fmt: skip
    assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.reason == "MEMORY_FULL"
    after = dict(listed(ctx, tenant))
    assert len(after) == n and after["k0"] == "v" and "one_more" not in after
    set_facts(ctx, tenant, fact("k1", "replaced"))  # replacing stays within the bound
    assert dict(listed(ctx, tenant))["k1"] == "replaced"


def test_a_set_waits_for_a_concurrent_set_of_the_conversation_then_sees_its_facts(
    ctx: Any, database_url: str
) -> None:
    """Sets of one conversation are serialized: while another transaction holds the
    conversation's lock (as a SetMemory does) and adds the 64th fact, a SetMemory adding one
    more waits, then counts that fact and is refused MEMORY_FULL, writing nothing."""
    tenant = new_id("t")
    n = memory.memory_facts_count_max
    set_facts(ctx, tenant, *(fact(f"k{i}", "v") for i in range(n - 1)))
    lock_key = "context_memory\x1f" + "\x1f".join((tenant, "ann", "chat-1"))
    with psycopg.connect(database_url) as conn:
        conn.execute(LOCK_SQL, (lock_key,))
        conn.execute(UPSERT_SQL, (tenant, "ann", "chat-1", "held", "v", -1))
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call_fails, ctx.SetMemory, cpb.SetMemoryRequest(
                tenant_id=tenant, user_id="ann", conversation_id="chat-1",
                facts=[fact("late", "v")]))  # fmt: skip
            time.sleep(0.5)
            assert not pending.done()  # it waits for the lock
            conn.commit()
            failed = pending.result(timeout=10)
    assert failed.reason == "MEMORY_FULL"
    keys = dict(listed(ctx, tenant))
    assert len(keys) == n and "held" in keys and "late" not in keys


def test_concurrent_sets_cannot_both_pass_the_bound(ctx: Any) -> None:
    """Eight clients at once, each adding a new key to a conversation one short of its bound:
    exactly one wins, the others are MEMORY_FULL, and the conversation holds the bound."""
    tenant = new_id("t")
    n = memory.memory_facts_count_max
    set_facts(ctx, tenant, *(fact(f"k{i}", "v") for i in range(n - 1)))
    barrier = threading.Barrier(8)

    def add(i: int) -> str:
        barrier.wait()
        try:
            set_facts(ctx, tenant, fact(f"new{i}", "v"))
        except grpc.RpcError as exc:
            return failure(exc).reason
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(add, range(8)))
    assert sorted(outcomes) == ["MEMORY_FULL"] * 7 + ["ok"]
    assert len(listed(ctx, tenant)) == n


# --- bad input --------------------------------------------------------------------------------

Change = Callable[[cpb.SetMemoryRequest], None]


def _facts(*facts: cpb.MemoryFact) -> Change:
    def change(r: cpb.SetMemoryRequest) -> None:
        del r.facts[:]
        r.facts.extend(facts)

    return change


def _field(**fields: Any) -> Change:
    def change(r: cpb.SetMemoryRequest) -> None:
        for name, value in fields.items():
            setattr(r, name, value)

    return change


SET_CASES = [
    ("oversized value", _facts(fact("k", "x" * 1025)), "facts[0].value"),
    ("oversized multibyte value", _facts(fact("k", "é" * 513)), "facts[0].value"),
    ("empty value", _facts(fact("k", "  ")), "facts[0].value"),
    ("control character", _facts(fact("k", "a\nb")), "facts[0].value"),
    ("empty key", _facts(fact("", "v")), "facts[0].key"),
    ("key with a space", _facts(fact("my key", "v")), "facts[0].key"),
    ("long key", _facts(fact("k" * 65, "v")), "facts[0].key"),
    ("key twice", _facts(fact("k", "1"), fact("k", "2")), "facts[1].key"),
    ("source index below -1", _facts(fact("k", "v", source_index=-2)), "facts[0].source_index"),
    ("source index too high", _facts(fact("k", "v", source_index=2000)),
     "facts[0].source_index"),
    ("no facts", _facts(), "facts"),
    ("too many facts", _facts(*(fact(f"k{i}", "v") for i in range(65))), "facts"),
    ("no tenant", _field(tenant_id=""), "tenant_id"),
    ("no user", _field(user_id=""), "user_id"),
    ("no conversation", _field(conversation_id=""), "conversation_id"),
    ("bad conversation id", _field(conversation_id="a b"), "conversation_id"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "field"), [c[1:] for c in SET_CASES],
                         ids=[c[0] for c in SET_CASES])  # fmt: skip
def test_set_memory_refuses_bad_input_naming_the_field_with_nothing_written(
    ctx: Any, change: Change, field: str
) -> None:
    tenant = new_id("t")
    request = cpb.SetMemoryRequest(tenant_id=tenant, user_id="ann", conversation_id="chat-1",
                                   facts=[fact("good", "kept out too")])  # fmt: skip
    change(request)
    failed = call_fails(ctx.SetMemory, request)
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT, failed.message
    assert field in [f for f, _ in failed.field_violations], failed.field_violations
    assert listed(ctx, tenant) == []


def test_list_and_delete_refuse_bad_input_and_delete_nothing(ctx: Any) -> None:
    tenant = new_id("t")
    set_facts(ctx, tenant, fact("a", "1"))
    bad = [
        (ctx.ListMemory, cpb.ListMemoryRequest(tenant_id=tenant, user_id="ann"),
         "conversation_id"),
        (ctx.DeleteMemory, cpb.DeleteMemoryRequest(tenant_id=tenant, user_id="ann",
                                                   conversation_id="chat-1", keys=["a", "b c"]),
         "keys[1]"),
        (ctx.DeleteMemory, cpb.DeleteMemoryRequest(tenant_id=tenant, user_id="ann",
                                                   conversation_id="chat-1",
                                                   keys=[f"k{i}" for i in range(65)]), "keys"),
        (ctx.DeleteMemory, cpb.DeleteMemoryRequest(user_id="ann", conversation_id="chat-1"),
         "tenant_id"),
    ]  # fmt: skip
    for call, request, field in bad:
        failed = call_fails(call, request)
        assert failed.code == grpc.StatusCode.INVALID_ARGUMENT, failed.message
        assert field in [f for f, _ in failed.field_violations], failed.field_violations
    assert listed(ctx, tenant) == [("a", "1")]


PREPARE_CASES = [
    ("use_memory without a conversation", {"use_memory": True, "conversation_id": ""},
     "use_memory"),
    ("memory share above 1", {"policy": cpb.AllocationPolicy(memory_share=1.5)},
     "policy.memory_share"),
    ("negative memory share", {"policy": cpb.AllocationPolicy(memory_share=-0.1)},
     "policy.memory_share"),
    ("empty marker", {"retention_markers": [""]}, "retention_markers[0]"),
    ("long marker", {"retention_markers": ["m" * 257]}, "retention_markers[0]"),
    ("too many markers", {"retention_markers": [f"m{i}" for i in range(65)]},
     "retention_markers"),
    ("key_information without use_memory",
     {"messages": [msg(cpb.CHAT_ROLE_USER, "hi", key_information=[fact("k", "v")])]},
     "use_memory"),
    ("oversized key_information",
     {"use_memory": True, "messages": [msg(cpb.CHAT_ROLE_SYSTEM, "x"), msg(
         cpb.CHAT_ROLE_USER, "hi", key_information=[fact("k", "v"), fact("big", "x" * 1025)])]},
     "messages[1].key_information[1].value"),
    ("bad key_information key",
     {"use_memory": True,
      "messages": [msg(cpb.CHAT_ROLE_USER, "hi", key_information=[fact("a b", "v")])]},
     "messages[0].key_information[0].key"),
    ("too much key_information",
     {"use_memory": True, "messages": [msg(cpb.CHAT_ROLE_USER, "hi", key_information=[
         fact(f"k{i}", "v") for i in range(65)])]},
     "messages[0].key_information"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "field"), [c[1:] for c in PREPARE_CASES],
                         ids=[c[0] for c in PREPARE_CASES])  # fmt: skip
def test_prepare_context_refuses_bad_memory_fields_and_reserves_nothing(
    ctx: Any, stub: Stub, fields: dict[str, Any], field: str
) -> None:
    tenant = new_id("t")
    fields = {"messages": conversation(2), **fields}
    failed = call_fails(lambda r: ctx.PrepareContext(request(tenant, **fields)), None)
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT, failed.message
    assert field in [f for f, _ in failed.field_violations], failed.field_violations
    replies = stub.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant))
    assert sum(len(r.events) for r in replies) == 0
    assert listed(ctx, tenant) == []


def test_without_a_database_memory_is_refused_as_unavailable(ledger: ServerThread) -> None:
    server = ContextServerThread(ledger.target).start()
    try:
        with server.stub() as s:
            failed = call_fails(s.ListMemory, cpb.ListMemoryRequest(
                tenant_id="t", user_id="ann", conversation_id="c"))  # fmt: skip
    finally:
        server.stop()
    assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.reason == "MEMORY_UNAVAILABLE"


def test_retention_and_left_out_facts_are_exported_as_metrics(
    ctx: Any, metric_reader: InMemoryMetricReader
) -> None:
    tenant = new_id("t")
    set_facts(ctx, tenant, fact("booking_code", CODE), fact("big", "word " * 200))
    prepare(ctx, tenant, conversation(100), use_memory=True,
            policy=cpb.AllocationPolicy(memory_share=0.02))  # fmt: skip
    data = metric_reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    assert sum(p.count for p in points["context.retention.ratio"]) >= 1
    assert sum(p.value for p in points["context.memory.left_out"]) >= 1
    outcomes = {p.attributes["outcome"] for p in points["context.retention.facts"]}
    assert outcomes == {"kept", "lost"}


# --- the written-only view -------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy", [cpb.STRATEGY_WINDOW, cpb.STRATEGY_TRUNCATE, cpb.STRATEGY_SUMMARIZE]
)
def test_the_written_view_carries_only_what_the_service_wrote_and_rebuilds_the_full_one(
    ctx: Any, strategy: int
) -> None:
    """MESSAGES_VIEW_WRITTEN leaves out the messages the caller already has; the rule the
    proto states rebuilds the full view's messages exactly, and every other field is equal
    (the retention report included: it is made from the whole fitted prompt)."""
    tenant = new_id("t")
    set_facts(ctx, tenant, fact("booking", CODE))
    messages = conversation(60, plant={3: f"My booking code is {CODE}."})
    big = msg(cpb.CHAT_ROLE_USER, "Here is my whole itinerary: " + "day " * 3_000)
    messages.insert(len(messages) - 1, big)  # TRUNCATE cuts it
    common = {"messages": messages, "strategy": strategy, "use_memory": True,
              "retention_markers": [CODE, "Turn 59"]}  # fmt: skip
    full = ctx.PrepareContext(request(tenant, **common))
    ask = request(tenant, messages_view=cpb.MESSAGES_VIEW_WRITTEN, **common)
    written = ctx.PrepareContext(ask)
    rewritten = set(written.truncated_indices)
    kinds = [s for s in written.source_indices if s < 0 or s in rewritten]
    assert -2 in kinds  # the memory message, always written
    assert len(written.messages) == len(kinds) < len(full.messages)
    assert messages_to_send(ask, written) == list(full.messages)
    if strategy == cpb.STRATEGY_TRUNCATE:
        assert rewritten
    if strategy == cpb.STRATEGY_SUMMARIZE:
        assert -1 in kinds
    same = ("source_indices", "dropped_indices", "summarized_indices", "truncated_indices",
            "breakdown", "retention", "memory_keys", "limited_by", "granted_tokens")  # fmt: skip
    for name in same:
        assert getattr(written, name) == getattr(full, name), name


def test_an_unknown_messages_view_is_refused_naming_the_field(ctx: Any) -> None:
    tenant = new_id("t")
    f = call_fails(ctx.PrepareContext, request(tenant, messages=conversation(2),
                                               messages_view=7))  # fmt: skip
    assert f.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v[0] for v in f.field_violations] == ["messages_view"]
