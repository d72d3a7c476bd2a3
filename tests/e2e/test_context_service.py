"""The context service's promises, proven through a real ContextServer that calls a real
ledger server over gRPC (both on port 0, on a real PostgreSQL)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context.remote_summarizer import RemoteSummarizerConfig
from services.context.tokenizer_data import DATA_DIR_ENV
from services.context.tokenizers import LLAMA3, O200K, QWEN2, TokenizerPool
from tests.support import (
    TOKENLEDGER,
    ContextServerThread,
    ServerThread,
    call_fails,
    free_port,
    new_id,
)

Stub = pb_grpc.LedgerServiceStub
REPO = Path(__file__).resolve().parents[2]
SYSTEM = "You are a careful assistant for a travel agency. Answer briefly and cite prices."
TOPICS = ["hotels in Lisbon", "trains to Porto", "museums in Madrid", "beaches near Faro"]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_pool() -> TokenizerPool:
    """One pool for every context server of the module: encodings load once."""
    return TokenizerPool(data_dir=Path(os.environ.get(DATA_DIR_ENV) or REPO / "var" / "tokenizers"))


@pytest.fixture(scope="module")
def metric_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture(scope="module")
def context_server(
    ledger: ServerThread, tokenizer_pool: TokenizerPool, metric_reader: InMemoryMetricReader
) -> Iterator[ContextServerThread]:
    server = ContextServerThread(
        ledger.target,
        pool=tokenizer_pool,
        meter_provider=MeterProvider(metric_readers=[metric_reader]),
    ).start()
    yield server
    server.stop()


@pytest.fixture
def ctx(context_server: ContextServerThread) -> Iterator[Any]:
    with context_server.stub() as s:
        yield s


# --- helpers ---------------------------------------------------------------------------------


def msg(role: int, content: str, **kw: Any) -> cpb.ChatMessage:
    return cpb.ChatMessage(role=role, content=content, **kw)  # type: ignore[arg-type]


def conversation(turns: int, *, words: int = 40) -> list[cpb.ChatMessage]:
    """A system message, `turns` user/assistant exchanges, then the input question."""
    out = [msg(cpb.CHAT_ROLE_SYSTEM, SYSTEM)]
    for i in range(turns):
        topic = TOPICS[i % len(TOPICS)]
        out.append(msg(cpb.CHAT_ROLE_USER, f"Turn {i}: what do you know about {topic}? " * 2))
        body = " ".join(
            f"{topic} fact {i}.{j} costs {10 * j + i} euros." for j in range(words // 6)
        )
        out.append(msg(cpb.CHAT_ROLE_ASSISTANT, body))
    out.append(msg(cpb.CHAT_ROLE_USER, "So which museum in Madrid should I book first?"))
    return out


def prepare(ctx: Any, tenant: str, messages: list[cpb.ChatMessage], **kw: Any) -> Any:
    fields: dict[str, Any] = {
        "idempotency_key": new_id("p"),
        "tenant_id": tenant,
        "user_id": "ann",
        "conversation_id": "chat-1",
        "model": "gpt-4o",
        "messages": messages,
        "max_output_tokens": 200,
    }
    fields.update(kw)
    return ctx.PrepareContext(cpb.PrepareContextRequest(**fields))


def reservation(stub: Stub, tenant: str, reservation_id: str) -> pb.Reservation:
    reply = stub.GetReservation(
        pb.GetReservationRequest(tenant_id=tenant, reservation_id=reservation_id)
    )
    return reply.reservation


def held(stub: Stub, tenant: str, user: str = "ann") -> int:
    reply = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id=user))
    return reply.balance.held


def event_types(stub: Stub, tenant: str) -> list[str]:
    replies = stub.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant))
    return [e.event_type for r in replies for e in r.events]


def set_user_quota(stub: Stub, tenant: str, limit: int, user: str = "ann") -> None:
    stub.SetQuota(
        pb.SetQuotaRequest(
            idempotency_key=new_id("q"),
            tenant_id=tenant,
            user_id=user,
            limit=limit,
            period=pb.PERIOD_NONE,
        )
    )


def recount(ctx: Any, reply: Any, model: str = "gpt-4o") -> int:
    """The fitted messages counted again by CountTokens (with reply priming)."""
    counted = ctx.CountTokens(cpb.CountTokensRequest(model=model, messages=reply.messages))
    return int(counted.total_tokens)


def assert_tool_pairs_intact(messages: Any) -> None:
    """Every kept tool result has its call kept, and every kept call has all its results."""
    calls = {c for m in messages for c in m.tool_call_ids}
    answered = {m.tool_call_id for m in messages if m.role == cpb.CHAT_ROLE_TOOL}
    assert answered <= calls
    assert calls <= answered


# --- CountTokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o", O200K), ("llama-3.1-8b", LLAMA3), ("qwen2.5-7b", QWEN2)],
)
def test_count_tokens_is_exact_for_open_rank_files(
    ctx: Any, tokenizer_pool: TokenizerPool, model: str, encoding: str
) -> None:
    """Text counts equal raw tiktoken on the model's own encoding; chat counts add up."""
    text = "Ünïcödé, code `x = f(1, 2)` and 12345678 digits. <|endoftext|> stays text."
    counted = ctx.CountTokens(cpb.CountTokensRequest(model=model, text=text))
    raw = tokenizer_pool.get(encoding).encode(text)
    assert (counted.total_tokens, counted.encoding) == (len(raw), encoding)
    assert counted.exact and counted.method == f"exact:{encoding}"

    chat = ctx.CountTokens(cpb.CountTokensRequest(model=model, messages=conversation(2)))
    assert chat.exact and len(chat.message_tokens) == 6
    assert chat.total_tokens == sum(chat.message_tokens) + chat.reply_priming_tokens
    assert chat.context_window_tokens > 0 and chat.model_family


def test_count_tokens_for_claude_is_marked_estimated(ctx: Any) -> None:
    """Claude has no public tokenizer: the count says it is an estimate and how it was made."""
    counted = ctx.CountTokens(
        cpb.CountTokensRequest(model="claude-sonnet-4-5", messages=conversation(1))
    )
    assert not counted.exact
    assert counted.method.startswith("estimate:o200k_base")
    assert counted.total_tokens > 0


def test_tool_definitions_count_toward_the_prompt_calibrated_for_openai(ctx: Any) -> None:
    tool = cpb.ToolDefinition(
        name="book_hotel",
        description="Book a hotel room",
        parameters_json='{"type":"object","properties":{"city":{"type":"string"}}}',
    )
    plain = ctx.CountTokens(cpb.CountTokensRequest(model="gpt-4o", messages=conversation(1)))
    with_tool = ctx.CountTokens(
        cpb.CountTokensRequest(model="gpt-4o", messages=conversation(1), tools=[tool])
    )
    assert with_tool.tool_tokens > 0
    assert with_tool.tool_method.startswith("calibrated:openai-cookbook(func_init=7,")
    assert with_tool.total_tokens == plain.total_tokens + with_tool.tool_tokens
    assert plain.exact and not with_tool.exact  # one published example cannot prove every schema


# --- PrepareContext: fitting -----------------------------------------------------------------


def test_a_conversation_that_fits_comes_back_unchanged_with_a_hold_for_prompt_and_output(
    ctx: Any, stub: Stub
) -> None:
    tenant = new_id("t")
    messages = conversation(3)
    reply = prepare(ctx, tenant, messages, max_output_tokens=300)
    assert list(reply.messages) == messages
    assert list(reply.source_indices) == list(range(len(messages)))
    assert reply.limited_by == cpb.LIMITED_BY_NONE
    assert reply.original_prompt_tokens == reply.breakdown.prompt_total == recount(ctx, reply)
    assert reply.requested_tokens == reply.granted_tokens == reply.original_prompt_tokens + 300
    assert reply.breakdown.output_reserve == 300 and not reply.partial
    res = reservation(stub, tenant, reply.reservation_id)
    assert res.amount == reply.granted_tokens and res.state == pb.RESERVATION_STATE_HELD
    assert (res.model, res.conversation_id) == ("gpt-4o", "chat-1")


@pytest.mark.parametrize(
    "strategy",
    [cpb.STRATEGY_WINDOW, cpb.STRATEGY_PRIORITY, cpb.STRATEGY_TRUNCATE, cpb.STRATEGY_SUMMARIZE],
)
def test_each_strategy_fits_the_window_keeping_system_and_input(
    ctx: Any, stub: Stub, strategy: int
) -> None:
    """With a 1,500-token window and 200 for the output, the prompt fits in 1,300; system and
    input survive; the fitted messages recount to the reported prompt."""
    tenant = new_id("t")
    messages = conversation(20)
    big = len(messages) - 1  # an oversized message just before the input
    messages.insert(big, msg(cpb.CHAT_ROLE_USER, "Here is my whole itinerary: " + "day " * 900))
    reply = prepare(ctx, tenant, messages, strategy=strategy, context_window_tokens=1_500)
    assert reply.limited_by == cpb.LIMITED_BY_WINDOW and reply.strategy == strategy
    assert reply.requested_tokens == reply.granted_tokens == 1_500
    assert reply.breakdown.prompt_total <= 1_300 == 1_500 - reply.breakdown.output_reserve
    assert reply.breakdown.prompt_total == recount(ctx, reply)
    assert reply.tokens_saved == reply.original_prompt_tokens - reply.breakdown.prompt_total > 0
    assert reply.source_indices[0] == 0 and reply.source_indices[-1] == len(messages) - 1
    assert reply.messages[0] == messages[0] and reply.messages[-1] == messages[-1]
    accounted = set(reply.source_indices) | set(reply.dropped_indices)
    accounted |= set(reply.summarized_indices)
    assert accounted - {-1} == set(range(len(messages)))
    if strategy == cpb.STRATEGY_SUMMARIZE:
        summary = reply.messages[list(reply.source_indices).index(-1)]
        # It opens the kept history, which starts on a user turn (HISTORY_START_USER).
        assert (summary.role, summary.name) == (cpb.CHAT_ROLE_USER, "summary")
        assert reply.summarized_indices and reply.summary_tokens > 0
        assert reply.summarizer.kind == "extractive"
    elif strategy == cpb.STRATEGY_TRUNCATE:
        assert big in reply.truncated_indices
        cut = reply.messages[list(reply.source_indices).index(big)].content
        assert "characters removed" in cut
    else:
        assert reply.dropped_indices and not reply.summarized_indices


def test_a_partial_grant_makes_the_budget_the_limit(ctx: Any, stub: Stub) -> None:
    """A user with 1,000 tokens left gets a partial grant; the prompt is fitted to it."""
    tenant = new_id("t")
    set_user_quota(stub, tenant, 1_000)
    reply = prepare(ctx, tenant, conversation(20))
    assert reply.partial and reply.granted_tokens == 1_000 < reply.requested_tokens
    assert reply.limited_by == cpb.LIMITED_BY_BUDGET
    assert reply.breakdown.output_reserve == 200
    assert reply.breakdown.prompt_total <= 800 and reply.dropped_indices
    assert reply.HasField("suggestion") and reply.suggestion.compact_context
    assert held(stub, tenant) == 1_000


def test_output_reserve_gives_way_down_to_min_output_tokens(ctx: Any, stub: Stub) -> None:
    """When the mandatory messages leave less than max_output, the output reserve shrinks to
    what is left (never below min_output_tokens) and the caller is told the new max."""
    tenant = new_id("t")
    messages = conversation(0)  # system + input only: all mandatory
    mandatory = ctx.CountTokens(cpb.CountTokensRequest(model="gpt-4o", messages=messages))
    set_user_quota(stub, tenant, mandatory.total_tokens + 120)
    reply = prepare(ctx, tenant, messages, max_output_tokens=500, min_output_tokens=100)
    assert reply.breakdown.output_reserve == 120 and reply.granted_tokens == held(stub, tenant)
    assert reply.limited_by == cpb.LIMITED_BY_BUDGET and list(reply.messages) == messages


def test_system_and_pinned_too_big_for_the_window_fail_naming_the_shortfall(
    ctx: Any, stub: Stub
) -> None:
    tenant = new_id("t")
    messages = [
        msg(cpb.CHAT_ROLE_SYSTEM, "rule " * 700),
        msg(cpb.CHAT_ROLE_USER, "old pinned fact " * 100, pinned=True),
        *conversation(2)[1:],
    ]
    failed = call_fails(
        ctx.PrepareContext,
        cpb.PrepareContextRequest(
            idempotency_key=new_id("p"),
            tenant_id=tenant,
            user_id="ann",
            model="gpt-4o",
            messages=messages,
            max_output_tokens=200,
            context_window_tokens=1_000,
        ),
    )
    assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.reason == "CONTEXT_DOES_NOT_FIT"
    shortfall = int(failed.metadata["shortfall_tokens"])
    assert shortfall == int(failed.metadata["required_tokens"]) - 1_000 > 0
    assert f"short by {shortfall}" in failed.message and failed.metadata["limited_by"] == "WINDOW"
    assert failed.metadata["mandatory_indices"].startswith("0,1,")
    assert event_types(stub, tenant) == []  # nothing was reserved


def test_a_does_not_fit_after_the_hold_rolls_the_hold_back(ctx: Any, stub: Stub) -> None:
    """TRUNCATE assumes the input can be cut to almost nothing; a grant that leaves no room for
    even the cut marker fails with the budget named, and the hold is rolled back."""
    tenant = new_id("t")
    messages = [msg(cpb.CHAT_ROLE_SYSTEM, SYSTEM), msg(cpb.CHAT_ROLE_USER, "word " * 2_000)]
    floor = ctx.CountTokens(
        cpb.CountTokensRequest(model="gpt-4o", messages=[messages[0], msg(cpb.CHAT_ROLE_USER, "x")])
    )
    set_user_quota(stub, tenant, floor.total_tokens + 50)
    failed = call_fails(
        ctx.PrepareContext,
        cpb.PrepareContextRequest(
            idempotency_key=new_id("p"),
            tenant_id=tenant,
            user_id="ann",
            model="gpt-4o",
            messages=messages,
            max_output_tokens=50,
            strategy=cpb.STRATEGY_TRUNCATE,
        ),
    )
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (failed.reason, failed.metadata["limited_by"]) == ("CONTEXT_DOES_NOT_FIT", "BUDGET")
    assert event_types(stub, tenant)[-2:] == ["TokensReserved", "ReservationRolledBack"]
    assert held(stub, tenant) == 0


def test_tool_calls_and_their_results_stay_together(ctx: Any) -> None:
    """Whatever the window, a kept tool result has its call and a kept call has its results."""
    tenant = new_id("t")
    messages = [msg(cpb.CHAT_ROLE_SYSTEM, SYSTEM)]
    for i in range(8):
        calls = [f"call_{i}_a", f"call_{i}_b"]
        messages.append(msg(cpb.CHAT_ROLE_USER, f"Find {TOPICS[i % 4]} prices, please."))
        messages.append(msg(cpb.CHAT_ROLE_ASSISTANT, "", tool_call_ids=calls))
        for c in calls:
            messages.append(
                msg(cpb.CHAT_ROLE_TOOL, f"{c}: " + "price 120 EUR. " * 20, tool_call_id=c)
            )
        messages.append(msg(cpb.CHAT_ROLE_ASSISTANT, f"Prices for {TOPICS[i % 4]} are 120 EUR."))
    messages.append(msg(cpb.CHAT_ROLE_USER, "Summarize the cheapest option."))
    for window in (500, 700, 900, 1_300):
        for strategy in (cpb.STRATEGY_WINDOW, cpb.STRATEGY_PRIORITY, cpb.STRATEGY_SUMMARIZE):
            reply = prepare(ctx, tenant, messages, strategy=strategy, context_window_tokens=window)
            assert reply.limited_by == cpb.LIMITED_BY_WINDOW
            assert_tool_pairs_intact(reply.messages)


def test_a_retry_returns_the_same_reservation_and_messages(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    request = cpb.PrepareContextRequest(
        idempotency_key=new_id("p"),
        tenant_id=tenant,
        user_id="ann",
        conversation_id="chat-1",
        model="llama-3.1-8b",
        messages=conversation(20),
        max_output_tokens=200,
        strategy=cpb.STRATEGY_SUMMARIZE,
        context_window_tokens=1_200,
    )
    first, again = ctx.PrepareContext(request), ctx.PrepareContext(request)
    assert again == first
    assert event_types(stub, tenant) == ["TokensReserved"]
    assert held(stub, tenant) == first.granted_tokens

    request.strategy = cpb.STRATEGY_PRIORITY  # the same key with another request
    failed = call_fails(ctx.PrepareContext, request)
    assert failed.code == grpc.StatusCode.ALREADY_EXISTS
    assert (failed.reason, failed.metadata["field"]) == ("IDEMPOTENCY_KEY_REUSED", "labels")


# --- PrepareContext: the ledger's refusals are passed on -------------------------------------


def test_a_rate_limit_refusal_is_passed_on_with_retry_info(ctx: Any, stub: Stub) -> None:
    tenant = new_id("t")
    stub.SetRateLimit(
        pb.SetRateLimitRequest(
            idempotency_key=new_id("rl"), tenant_id=tenant, user_id="ann", requests_per_minute=1
        )
    )
    prepare(ctx, tenant, conversation(1))
    failed = call_fails(
        ctx.PrepareContext,
        cpb.PrepareContextRequest(
            idempotency_key=new_id("p"),
            tenant_id=tenant,
            user_id="ann",
            model="gpt-4o",
            messages=conversation(1),
            max_output_tokens=200,
        ),
    )
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED and failed.reason == "RATE_LIMITED"
    assert failed.retry_delay_s is not None and failed.retry_delay_s > 0
    assert failed.quota_violations and failed.message.startswith("the ledger refused to reserve")


def test_an_exhausted_budget_is_passed_on_with_quota_failure(ctx: Any, stub: Stub) -> None:
    """Less budget than the mandatory messages need: the ledger's refusal, its figures intact."""
    tenant = new_id("t")
    set_user_quota(stub, tenant, 30)
    failed = call_fails(
        ctx.PrepareContext,
        cpb.PrepareContextRequest(
            idempotency_key=new_id("p"),
            tenant_id=tenant,
            user_id="ann",
            model="gpt-4o",
            messages=conversation(3),
            max_output_tokens=200,
        ),
    )
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failed.reason == "BUDGET_EXHAUSTED" and failed.metadata["reservable"] == "30"
    assert failed.quota_violations and "mandatory messages need" in failed.message


def test_an_unreachable_ledger_is_unavailable_and_retryable(tokenizer_pool: TokenizerPool) -> None:
    server = ContextServerThread(
        f"127.0.0.1:{free_port()}", pool=tokenizer_pool, ledger_timeout_s=2
    ).start()
    try:
        with server.stub() as s:
            failed = call_fails(
                s.PrepareContext,
                cpb.PrepareContextRequest(
                    idempotency_key=new_id("p"),
                    tenant_id=new_id("t"),
                    user_id="ann",
                    model="gpt-4o",
                    messages=conversation(1),
                    max_output_tokens=200,
                ),
            )
    finally:
        server.stop()
    assert failed.code == grpc.StatusCode.UNAVAILABLE and failed.reason == "LEDGER_UNAVAILABLE"
    assert failed.retry_delay_s == 1 and "could not be reached" in failed.message


# --- tracing and metrics ---------------------------------------------------------------------


def test_one_trace_spans_the_context_service_and_the_ledger(ctx: Any) -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # set up by tests/conftest.py
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        prepare(ctx, new_id("t"), conversation(2))
        spans = {(s.name, s.kind): s for s in exporter.get_finished_spans()}
    finally:
        exporter.shutdown()
    server, client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
    context_span = spans["tokenledger.v1.ContextService/PrepareContext", server]
    call_span = spans["tokenledger.v1.LedgerService/Reserve", client]
    ledger_span = spans["tokenledger.v1.LedgerService/Reserve", server]
    assert context_span.context and call_span.context and ledger_span.context
    trace_id = context_span.context.trace_id
    assert call_span.context.trace_id == ledger_span.context.trace_id == trace_id
    # server span -> the context service's client span for the call -> the ledger's span
    assert call_span.parent and call_span.parent.span_id == context_span.context.span_id
    assert ledger_span.parent and ledger_span.parent.span_id == call_span.context.span_id


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def test_metrics_count_tokens_cache_hits_and_savings_per_strategy(
    ctx: Any, metric_reader: InMemoryMetricReader
) -> None:
    tenant = new_id("t")
    messages = conversation(20)
    for strategy in (cpb.STRATEGY_WINDOW, cpb.STRATEGY_SUMMARIZE):
        prepare(ctx, tenant, messages, strategy=strategy, context_window_tokens=1_500)
    points = _points(metric_reader)
    assert sum(p.value for p in points["context.count_cache.hits"]) >= len(messages)
    assert sum(p.value for p in points["context.tokens_counted"]) > 0
    assert points["context.tokenizer_pool.bytes"][0].value > 0
    saved = {p.attributes["strategy"]: p.value for p in points["context.fit.tokens_saved"]}
    assert saved["window"] > 0 and saved["summarize"] > 0
    actions = {
        (p.attributes["strategy"], p.attributes["action"]) for p in points["context.fit.events"]
    }
    assert {("window", "pruned"), ("summarize", "summarized")} <= actions
    assert points["context.prepare.duration"]


# --- the remote summarizer -------------------------------------------------------------------

CANNED_SUMMARY = "Earlier: the user compared hotels in Lisbon and trains to Porto; prices noted."


class _Endpoint(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that returns a canned completion (or fails)."""

    status = 200
    report_usage = True
    requests: list[tuple[dict[str, str], dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((dict(self.headers), body))
        reply = {
            "id": "cmpl-1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": CANNED_SUMMARY}}],
            "usage": {"prompt_tokens": 321, "completion_tokens": 17, "total_tokens": 338},
        }
        if not self.report_usage:
            del reply["usage"]
        data = json.dumps(reply).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def endpoint() -> Iterator[type[_Endpoint]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/v1"  # type: ignore[attr-defined]
    yield _Endpoint
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def remote_ctx(
    ledger: ServerThread, tokenizer_pool: TokenizerPool, endpoint: type[_Endpoint]
) -> Iterator[Any]:
    config = RemoteSummarizerConfig(endpoint.url, "gpt-4o-mini", timeout_s=5)  # type: ignore[attr-defined]
    server = ContextServerThread(
        ledger.target, pool=tokenizer_pool, remote_summarizer=config
    ).start()
    with server.stub() as s:
        yield s
    server.stop()


def test_the_remote_summarizer_reserves_and_commits_its_tokens(
    remote_ctx: Any, stub: Stub, endpoint: type[_Endpoint]
) -> None:
    """The endpoint's tokens are reserved, then committed with the usage it reports, under the
    same conversation; the summary is its text."""
    endpoint.status, endpoint.requests = 200, []
    tenant = new_id("t")
    reply = prepare(
        remote_ctx, tenant, conversation(20), strategy=cpb.STRATEGY_SUMMARIZE,
        context_window_tokens=1_500,
    )  # fmt: skip
    assert reply.summarizer.kind == "remote" and not reply.summarizer.fallback_reason
    assert (reply.summarizer.prompt_tokens, reply.summarizer.completion_tokens) == (321, 17)
    summary = reply.messages[list(reply.source_indices).index(-1)]
    assert summary.content == CANNED_SUMMARY
    res = reservation(stub, tenant, reply.summarizer.reservation_id)
    assert res.state == pb.RESERVATION_STATE_COMMITTED and res.model == "gpt-4o-mini"
    assert (res.usage.input_tokens, res.usage.output_tokens) == (321, 17)
    assert res.conversation_id == "chat-1"
    conversation_balance = stub.GetBalance(
        pb.GetBalanceRequest(tenant_id=tenant, user_id="ann", conversation_id="chat-1")
    ).balance
    assert conversation_balance.used == 338
    assert conversation_balance.held == reply.granted_tokens  # the main hold, for the caller
    headers, body = endpoint.requests[-1]
    assert body["model"] == "gpt-4o-mini" and body["max_tokens"] > 0
    assert "traceparent" in {k.lower() for k in headers}


def test_a_failing_endpoint_falls_back_to_extractive_and_rolls_its_hold_back(
    remote_ctx: Any, stub: Stub, endpoint: type[_Endpoint]
) -> None:
    endpoint.status = 500
    try:
        tenant = new_id("t")
        reply = prepare(
            remote_ctx, tenant, conversation(20), strategy=cpb.STRATEGY_SUMMARIZE,
            context_window_tokens=1_500,
        )  # fmt: skip
    finally:
        endpoint.status = 200
    assert reply.summarizer.kind == "extractive"
    assert "HTTP 500" in reply.summarizer.fallback_reason
    assert reply.summarized_indices and reply.summary_tokens > 0
    res = reservation(stub, tenant, reply.summarizer.reservation_id)
    assert res.state == pb.RESERVATION_STATE_ROLLED_BACK
    assert held(stub, tenant) == reply.granted_tokens


def test_an_endpoint_that_reports_no_usage_is_charged_what_the_service_counts(
    remote_ctx: Any, stub: Stub, endpoint: type[_Endpoint]
) -> None:
    """Without `usage` in the completion, the hold is committed with the prompt as counted
    before the call and the summary as counted after it (off the event loop)."""
    endpoint.status, endpoint.report_usage = 200, False
    try:
        tenant = new_id("t")
        reply = prepare(
            remote_ctx, tenant, conversation(20), strategy=cpb.STRATEGY_SUMMARIZE,
            context_window_tokens=1_500,
        )  # fmt: skip
    finally:
        endpoint.report_usage = True
    assert reply.summarizer.kind == "remote" and not reply.summarizer.fallback_reason
    res = reservation(stub, tenant, reply.summarizer.reservation_id)
    assert res.state == pb.RESERVATION_STATE_COMMITTED
    assert res.usage.input_tokens == reply.summarizer.prompt_tokens > 0
    summary = reply.messages[list(reply.source_indices).index(-1)]
    assert summary.content == CANNED_SUMMARY
    # The summary message as the fit counts it: the text and its chat overhead.
    assert res.usage.output_tokens == reply.summarizer.completion_tokens == reply.summary_tokens


# --- the process -----------------------------------------------------------------------------


def test_context_serve_serves_health_and_counts_then_stops_on_sigterm(ledger: ServerThread) -> None:
    """`tokenledger context-serve` as its own process, configured by the environment."""
    target = f"127.0.0.1:{free_port()}"
    env = os.environ | {
        "TOKENLEDGER_CONTEXT_LISTEN": target,
        "TOKENLEDGER_LEDGER_TARGET": ledger.target,
        "TOKENLEDGER_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([str(TOKENLEDGER), "context-serve"], env=env)
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tokenledger.v1.ContextService"), timeout=5
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            counted = cpb_grpc.ContextServiceStub(channel).CountTokens(
                cpb.CountTokensRequest(model="gpt-4o", text="hello world"), timeout=30
            )
            assert counted.total_tokens == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_retry_with_the_remote_summarizer_pays_for_each_real_call(
    remote_ctx: Any, stub: Stub, endpoint: type[_Endpoint]
) -> None:
    """A retried PrepareContext keeps its reservation, but the endpoint really ran twice: both
    calls are reserved and committed, so compaction's cost is never under-counted."""
    endpoint.status = 200
    tenant = new_id("t")
    request = cpb.PrepareContextRequest(
        idempotency_key=new_id("p"),
        tenant_id=tenant,
        user_id="ann",
        conversation_id="chat-1",
        model="gpt-4o",
        messages=conversation(20),
        max_output_tokens=200,
        strategy=cpb.STRATEGY_SUMMARIZE,
        context_window_tokens=1_500,
    )
    first, again = remote_ctx.PrepareContext(request), remote_ctx.PrepareContext(request)
    assert again.reservation_id == first.reservation_id and again.messages == first.messages
    assert again.summarizer.reservation_id != first.summarizer.reservation_id
    used = stub.GetBalance(
        pb.GetBalanceRequest(tenant_id=tenant, user_id="ann", conversation_id="chat-1")
    ).balance.used
    assert used == 2 * 338
