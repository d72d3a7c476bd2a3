"""The OpenAI SDK metered by the ledger (services.client.openai): the real `openai` package
against a local OpenAI-compatible HTTP server, a real ledger and a real context service that
counts the prompt. Success, partial grants, provider errors (rollback), streams read to the
end and cut midway (commit of what was used), the Responses API, the ledger away (fail
closed by default), and bad inputs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import (
    AsyncLedgerClient,
    BadTarget,
    BudgetExhausted,
    ClientError,
    InvalidArgument,
    LedgerClient,
    LedgerUnavailable,
)
from services.client.counting import ContextServiceCounter
from services.client.metering import Policy, Settlement
from services.client.openai import LedgeredAsyncOpenAI, LedgeredOpenAI
from tests.openai_server import OpenAIServer
from tests.support import ContextServerThread, ServerThread, free_port, new_id

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about the ledger and its budgets, please."},
]


@pytest.fixture
def ledger_client(ledger: ServerThread) -> Iterator[LedgerClient]:
    with LedgerClient(ledger.target) as c:
        yield c


@pytest.fixture
def counter(context_service: ContextServerThread) -> Iterator[ContextServiceCounter]:
    c = ContextServiceCounter(context_service.target)
    yield c
    c.close()


@pytest.fixture
def tenant(ledger_client: LedgerClient) -> str:
    t = new_id("t")
    ledger_client.set_quota(tenant_id=t, user_id="ann", limit=10_000, period=pb.PERIOD_DAY)
    return t


def _sdk(server: OpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)


def _wrapped(
    server: OpenAIServer, ledger_client: LedgerClient, counter: ContextServiceCounter, tenant: str,
    settled: list[Settlement], **policy: Any,
) -> LedgeredOpenAI:  # fmt: skip
    return LedgeredOpenAI(
        _sdk(server), ledger=ledger_client, counter=counter, tenant_id=tenant, user_id="ann",
        policy=Policy(**policy), on_settled=settled.append,
    )  # fmt: skip


def _balance(ledger_client: LedgerClient, tenant: str) -> tuple[int, int]:
    b = ledger_client.get_balance(tenant_id=tenant, user_id="ann").balance
    return b.held, b.used


def _reservation(ledger_client: LedgerClient, tenant: str, rid: str) -> pb.Reservation:
    return ledger_client.get_reservation(tenant_id=tenant, reservation_id=rid).reservation


def test_a_chat_completion_reserves_prompt_plus_max_tokens_and_commits_its_usage(
    openai_server: OpenAIServer, ledger_client: LedgerClient, counter: ContextServiceCounter,
    tenant: str,
) -> None:  # fmt: skip
    settled: list[Settlement] = []
    oai = _wrapped(openai_server, ledger_client, counter, tenant, settled)
    reply = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    prompt = counter.count_chat("gpt-4o", MESSAGES)
    (s,) = settled
    assert s.outcome == "committed" and not s.estimated and s.requested == prompt + 50
    held = _reservation(ledger_client, tenant, s.reservation_id)
    assert held.amount == prompt + 50 and held.state == pb.RESERVATION_STATE_COMMITTED
    u = reply.usage
    assert u is not None and u.prompt_tokens_details is not None
    cached = u.prompt_tokens_details.cached_tokens or 0
    assert cached > 0
    assert held.usage == pb.Usage(input_tokens=u.prompt_tokens - cached, cached_input_tokens=cached,
                                  output_tokens=u.completion_tokens)  # fmt: skip
    assert _balance(ledger_client, tenant) == (0, u.total_tokens)
    assert openai_server.requests[-1]["max_tokens"] == 50


def test_without_a_bound_the_policys_default_is_sent_and_max_completion_tokens_is_kept(
    openai_server: OpenAIServer, ledger_client: LedgerClient, counter: ContextServiceCounter,
    tenant: str,
) -> None:  # fmt: skip
    settled: list[Settlement] = []
    oai = _wrapped(openai_server, ledger_client, counter, tenant, settled, default_max_tokens=64)
    oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert openai_server.requests[-1]["max_tokens"] == 64
    oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=7)
    sent = openai_server.requests[-1]
    assert sent["max_completion_tokens"] == 7 and "max_tokens" not in sent
    assert [s.max_output_sent for s in settled] == [64, 7]


def test_a_partial_grant_shrinks_max_tokens_when_allowed_and_is_refused_otherwise(
    openai_server: OpenAIServer, ledger_client: LedgerClient, counter: ContextServiceCounter,
) -> None:  # fmt: skip
    t = new_id("t")
    prompt = counter.count_chat("gpt-4o", MESSAGES)
    ledger_client.set_quota(tenant_id=t, user_id="ann", limit=prompt + 12, period=pb.PERIOD_NONE)
    settled: list[Settlement] = []
    strict = _wrapped(openai_server, ledger_client, counter, t, settled)
    with pytest.raises(BudgetExhausted) as refused:
        strict.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=500)
    assert refused.value.reservable == prompt + 12 and openai_server.requests == []
    shrink = _wrapped(openai_server, ledger_client, counter, t, settled, allow_shrink=True,
                      min_output_tokens=10)  # fmt: skip
    shrink.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=500)
    assert openai_server.requests[-1]["max_tokens"] == 12
    assert settled[-1].granted == prompt + 12 and settled[-1].max_output_sent == 12


def test_a_provider_error_rolls_the_hold_back_and_reaches_the_caller(
    openai_server: OpenAIServer, ledger_client: LedgerClient, counter: ContextServiceCounter,
    tenant: str,
) -> None:  # fmt: skip
    settled: list[Settlement] = []
    oai = _wrapped(openai_server, ledger_client, counter, tenant, settled)
    with pytest.raises(openai.InternalServerError, match="test server says 500"):
        oai.chat.completions.create(model="gpt-4o-error-500", messages=MESSAGES, max_tokens=20)
    (s,) = settled
    assert s.outcome == "rolled back" and "500" in s.error
    state = _reservation(ledger_client, tenant, s.reservation_id).state
    assert state == pb.RESERVATION_STATE_ROLLED_BACK and _balance(ledger_client, tenant) == (0, 0)


def test_a_stream_asks_for_usage_and_commits_the_final_usage_chunk(
    openai_server: OpenAIServer, ledger_client: LedgerClient, counter: ContextServiceCounter,
    tenant: str,
) -> None:  # fmt: skip
    settled: list[Settlement] = []
    oai = _wrapped(openai_server, ledger_client, counter, tenant, settled)
    stream = oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=30, stream=True
    )
    chunks = list(stream)
    assert openai_server.requests[-1]["stream_options"] == {"include_usage": True}
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    (s,) = settled
    assert s.outcome == "committed" and not s.estimated
    assert s.usage is not None and s.usage.output_tokens == 20
    assert _balance(ledger_client, tenant) == (0, final.usage.total_tokens)


def test_a_stream_closed_midway_commits_the_prompt_and_the_text_it_delivered(
    ledger_client: LedgerClient, counter: ContextServiceCounter, tenant: str,
) -> None:  # fmt: skip
    slow = OpenAIServer(reply_tokens=200, chunk_delay_s=0.02).start()
    settled: list[Settlement] = []
    try:
        oai = _wrapped(slow, ledger_client, counter, tenant, settled)
        with oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=200,
                                         stream=True) as stream:  # fmt: skip
            received = ""
            for chunk in stream:
                received += "".join(c.delta.content or "" for c in chunk.choices)
                if len(received.split()) == 5:
                    break
    finally:
        slow.stop()
    (s,) = settled
    assert s.outcome == "committed" and s.estimated
    delivered = counter.count_text("gpt-4o", received)
    prompt = counter.count_chat("gpt-4o", MESSAGES)
    assert received == "w0 w1 w2 w3 w4" and 0 < delivered < 200
    held = _reservation(ledger_client, tenant, s.reservation_id)
    assert held.usage == pb.Usage(input_tokens=prompt, output_tokens=delivered)
    assert _balance(ledger_client, tenant) == (0, prompt + delivered)


def test_the_responses_api_is_metered_streaming_and_not(
    openai_server: OpenAIServer, ledger_client: LedgerClient, counter: ContextServiceCounter,
    tenant: str,
) -> None:  # fmt: skip
    settled: list[Settlement] = []
    oai = _wrapped(openai_server, ledger_client, counter, tenant, settled)
    reply = oai.responses.create(model="gpt-4o", input="Say hi to the ledger", max_output_tokens=8)
    assert reply.usage is not None and reply.output_text == "w0 w1 w2 w3 w4 w5 w6 w7"
    hi = [{"role": "user", "content": "hi"}]
    events = list(
        oai.responses.create(model="gpt-4o", instructions="Be brief.", input=hi, stream=True)
    )
    assert events[-1].type == "response.completed"
    first, second = settled
    assert (
        first.requested
        == counter.count_chat("gpt-4o", [{"role": "user", "content": "Say hi to the ledger"}]) + 8
    )
    cached = reply.usage.input_tokens_details.cached_tokens
    assert first.usage == pb.Usage(input_tokens=reply.usage.input_tokens - cached,
                                   cached_input_tokens=cached, output_tokens=8)  # fmt: skip
    assert second.outcome == "committed" and not second.estimated
    assert second.max_output_sent == Policy().default_max_tokens
    assert openai_server.requests[-1]["max_output_tokens"] == Policy().default_max_tokens


def test_the_ledger_away_fails_closed_by_default_and_open_when_asked(
    openai_server: OpenAIServer, counter: ContextServiceCounter,
) -> None:  # fmt: skip
    with LedgerClient(f"127.0.0.1:{free_port()}", max_attempts=2) as away:
        settled: list[Settlement] = []
        closed = _wrapped(openai_server, away, counter, "t", settled)
        with pytest.raises(LedgerUnavailable, match="cannot be reached"):
            closed.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
        assert openai_server.requests == [] and settled == []
        opened = _wrapped(openai_server, away, counter, "t", settled, fail_open=True)
        reply = opened.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    assert reply.choices[0].message.content == "w0 w1 w2 w3 w4"
    (s,) = settled
    assert s.outcome == "unmetered" and "cannot be reached" in s.error and s.usage is not None


def test_bad_inputs_are_refused_before_any_call(
    openai_server: OpenAIServer, ledger_client: LedgerClient, counter: ContextServiceCounter,
    tenant: str,
) -> None:  # fmt: skip
    with pytest.raises(ClientError, match="tenant_id and a user_id"):
        LedgeredOpenAI(_sdk(openai_server), ledger=ledger_client, counter=counter, tenant_id=tenant,
                       user_id="")  # fmt: skip
    with pytest.raises(ClientError, match="min_output_tokens"):
        Policy(min_output_tokens=0)
    settled: list[Settlement] = []
    oai = _wrapped(openai_server, ledger_client, counter, tenant, settled)
    with pytest.raises(ClientError, match="max_tokens must be 1 to"):
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=0)
    assert openai_server.requests == [] and settled == []
    assert _balance(ledger_client, tenant) == (0, 0)


def test_the_asyncio_wrapper_commits_rolls_back_and_settles_a_cut_stream(
    ledger: ServerThread, context_service: ContextServerThread, tenant: str,
    ledger_client: LedgerClient,
) -> None:  # fmt: skip
    slow = OpenAIServer(reply_tokens=100, chunk_delay_s=0.02).start()
    settled: list[Settlement] = []

    async def run() -> None:
        counter = ContextServiceCounter(context_service.target)
        async with AsyncLedgerClient(ledger.target) as ledger_async:
            sdk = openai.AsyncOpenAI(base_url=slow.base_url, api_key="sk-test", max_retries=0)
            oai = LedgeredAsyncOpenAI(sdk, ledger=ledger_async, counter=counter, tenant_id=tenant,
                                      user_id="ann", on_settled=settled.append)  # fmt: skip
            await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=3)
            with pytest.raises(openai.BadRequestError):
                await oai.chat.completions.create(
                    model="gpt-4o-error-400", messages=MESSAGES, max_tokens=3
                )
            stream = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                       max_tokens=100, stream=True)  # fmt: skip
            seen = 0
            async for chunk in stream:
                seen += sum(1 for c in chunk.choices if c.delta.content)
                if seen == 4:
                    break
            await stream.aclose()
        await counter.aclose()

    try:
        asyncio.run(run())
    finally:
        slow.stop()
    done, failed, cut = settled
    assert (done.outcome, failed.outcome, cut.outcome) == ("committed", "rolled back", "committed")
    assert done.usage is not None and done.usage.output_tokens == 3 and not done.estimated
    assert cut.estimated and cut.usage is not None and 0 < cut.usage.output_tokens < 100
    assert _balance(ledger_client, tenant)[0] == 0


def test_the_context_service_counter_counts_exactly_and_refuses_bad_inputs(
    counter: ContextServiceCounter, context_service: ContextServerThread
) -> None:
    """The counter is the context service's CountTokens: a chat counts its template overhead,
    a provider prefix is dropped, an unknown model is the service's clear refusal."""
    plain = counter.count_text("gpt-4o", "hello world")
    chat = counter.count_chat("openai/gpt-4o", [{"role": "user", "content": "hello world"}])
    assert plain == 2 and chat == 3 + 1 + plain + 3  # 3 a message, the role, 3 to prime
    assert counter.count_text("gpt-4o", "") == 0
    with pytest.raises(InvalidArgument) as unknown:
        counter.count_chat("no-such-model", MESSAGES)
    assert unknown.value.reason == "UNKNOWN_MODEL"
    by_encoding = ContextServiceCounter(context_service.target, encoding="o200k_base")
    assert by_encoding.count_chat("no-such-model", MESSAGES) == counter.count_chat(
        "gpt-4o", MESSAGES
    )
    by_encoding.close()
    with pytest.raises(BadTarget, match="not host:port"):
        ContextServiceCounter("context-service")


AGENT = [
    {"role": "system", "content": "You book trains."},
    {"role": "user", "content": "A ticket from Lyon to Turin on Friday, please."},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call1abcd", "type": "function",
        "function": {"name": "find_trains", "arguments": '{"from": "Lyon", "to": "Turin"}'},
    }]},
    {"role": "tool", "tool_call_id": "call1abcd", "content": '{"trains": ["TGV 9241"]}'},
    {"role": "user", "content": "Book the first."},
]  # fmt: skip


@pytest.mark.parametrize("model", ["gpt-4o", "qwen2.5-7b-instruct", "mistral-nemo"])
def test_the_counter_sends_openai_tool_calls_as_tool_calls(
    counter: ContextServiceCounter, context_service: ContextServerThread, model: str
) -> None:
    """An agent's OpenAI-format history counts as the service counts tool calls for the
    model's family (exactly where it can), the same as a request that names them itself."""
    by_hand = [
        cpb.ChatMessage(role=cpb.CHAT_ROLE_SYSTEM, content="You book trains."),
        cpb.ChatMessage(role=cpb.CHAT_ROLE_USER,
                        content="A ticket from Lyon to Turin on Friday, please."),
        cpb.ChatMessage(role=cpb.CHAT_ROLE_ASSISTANT, tool_calls=[cpb.ToolCall(
            id="call1abcd", name="find_trains",
            arguments_json='{"from": "Lyon", "to": "Turin"}')]),
        cpb.ChatMessage(role=cpb.CHAT_ROLE_TOOL, tool_call_id="call1abcd",
                        content='{"trains": ["TGV 9241"]}'),
        cpb.ChatMessage(role=cpb.CHAT_ROLE_USER, content="Book the first."),
    ]  # fmt: skip
    with grpc.insecure_channel(context_service.target) as channel:
        reference = cpb_grpc.ContextServiceStub(channel).CountTokens(
            cpb.CountTokensRequest(model=model, messages=by_hand)
        )
    assert counter.count_chat(model, AGENT) == reference.total_tokens
    assert reference.exact == (model != "gpt-4o")  # OpenAI's tool-call format is unpublished
    # arguments that are not JSON (a model wrote them so) still count, as text
    broken = [*AGENT[:2], {**AGENT[2], "tool_calls": [{
        "id": "call1abcd", "function": {"name": "find_trains", "arguments": "{from: Lyon"}}]},
        *AGENT[3:]]  # fmt: skip
    assert counter.count_chat(model, broken) > counter.count_chat(model, AGENT[:2])
