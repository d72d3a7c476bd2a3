"""Bad input to the context service is refused at the edge: INVALID_ARGUMENT with a BadRequest
naming the field (or gRPC's own RESOURCE_EXHAUSTED above the message cap), and nothing is
reserved in the ledger."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context import requests as limits
from services.context.config import ContextSettings
from services.context.tokenizer_data import DATA_DIR_ENV
from services.context.tokenizers import TokenizerPool
from services.platform.config import ConfigError
from tests.support import TOKENLEDGER, ContextServerThread, ServerThread, call_fails, new_id

Stub = pb_grpc.LedgerServiceStub
REPO = Path(__file__).resolve().parents[2]
MiB = 2**20


@pytest.fixture(scope="module")
def ctx(ledger: ServerThread) -> Iterator[Any]:
    pool = TokenizerPool(data_dir=Path(os.environ.get(DATA_DIR_ENV) or REPO / "var" / "tokenizers"))
    server = ContextServerThread(ledger.target, pool=pool).start()
    with server.stub() as s:
        yield s
    server.stop()


def msg(role: int, content: str = "hello", **kw: Any) -> cpb.ChatMessage:
    return cpb.ChatMessage(role=role, content=content, **kw)  # type: ignore[arg-type]


def valid(tenant: str) -> cpb.PrepareContextRequest:
    return cpb.PrepareContextRequest(
        idempotency_key=new_id("p"),
        tenant_id=tenant,
        user_id="ann",
        conversation_id="chat-1",
        model="gpt-4o",
        messages=[msg(cpb.CHAT_ROLE_SYSTEM, "Be brief."), msg(cpb.CHAT_ROLE_USER, "Hi there")],
        max_output_tokens=100,
    )


def replace_messages(*messages: cpb.ChatMessage) -> Callable[[cpb.PrepareContextRequest], None]:
    def change(r: cpb.PrepareContextRequest) -> None:
        del r.messages[:]
        r.messages.extend(messages)

    return change


def setter(**fields: Any) -> Callable[[cpb.PrepareContextRequest], None]:
    def change(r: cpb.PrepareContextRequest) -> None:
        for name, value in fields.items():
            setattr(r, name, value)

    return change


def with_policy(**shares: float) -> Callable[[cpb.PrepareContextRequest], None]:
    def change(r: cpb.PrepareContextRequest) -> None:
        r.policy.CopyFrom(cpb.AllocationPolicy(**shares))

    return change


def with_tool(**fields: str) -> Callable[[cpb.PrepareContextRequest], None]:
    def change(r: cpb.PrepareContextRequest) -> None:
        r.tools.append(cpb.ToolDefinition(**fields))

    return change


USER, SYSTEM, ASSISTANT, TOOL = (
    cpb.CHAT_ROLE_USER,
    cpb.CHAT_ROLE_SYSTEM,
    cpb.CHAT_ROLE_ASSISTANT,
    cpb.CHAT_ROLE_TOOL,
)
BIG = "x" * (limits.message_content_bytes_max + 1)
QUARTER = "y" * (limits.messages_content_bytes_max // 4 + 1)

CASES: list[tuple[str, Callable[[cpb.PrepareContextRequest], None], str]] = [
    ("no messages", replace_messages(), "messages"),
    ("unknown role", replace_messages(msg(USER), msg(99)), "messages[1].role"),
    ("unspecified role", replace_messages(msg(0), msg(USER)), "messages[0].role"),
    ("empty user content", replace_messages(msg(SYSTEM), msg(USER, "")), "messages[1].content"),
    ("empty assistant without calls", replace_messages(msg(ASSISTANT, ""), msg(USER)),
     "messages[0].content"),
    ("too many messages",
     replace_messages(*[msg(USER)] * (limits.messages_count_max + 1)), "messages"),
    ("one message too big", replace_messages(msg(USER, BIG)), "messages[0].content"),
    ("all contents too big", replace_messages(*[msg(USER, QUARTER)] * 4), "messages"),
    ("name with spaces", replace_messages(msg(USER, name="Ann Lee")), "messages[0].name"),
    ("priority out of range", replace_messages(msg(USER, priority=5_000)),
     "messages[0].priority"),
    ("tool result without its call",
     replace_messages(msg(USER), msg(TOOL, "42", tool_call_id="call_1"), msg(USER)),
     "messages[1].tool_call_id"),
    ("tool result without a call id",
     replace_messages(msg(ASSISTANT, "", tool_call_ids=["c1"]), msg(TOOL, "42"), msg(USER)),
     "messages[1].tool_call_id"),
    ("tool calls on a user message", replace_messages(msg(USER, tool_call_ids=["c1"])),
     "messages[0].tool_call_ids"),
    ("unknown model", setter(model="gpt-17-ultra"), "model"),
    ("unknown encoding", setter(encoding="morse"), "encoding"),
    ("unknown model with an encoding but no window",
     setter(model="my-finetune", encoding="cl100k_base"), "context_window_tokens"),
    ("negative max_output_tokens", setter(max_output_tokens=-5), "max_output_tokens"),
    ("zero max_output_tokens", setter(max_output_tokens=0), "max_output_tokens"),
    ("max_output_tokens above the model's cap", setter(max_output_tokens=20_000),
     "max_output_tokens"),
    ("negative min_output_tokens", setter(min_output_tokens=-1), "min_output_tokens"),
    ("min_output_tokens above max", setter(min_output_tokens=101), "min_output_tokens"),
    ("negative window", setter(context_window_tokens=-1), "context_window_tokens"),
    ("window above the model's", setter(context_window_tokens=10**6), "context_window_tokens"),
    ("negative ttl", setter(ttl_seconds=-1), "ttl_seconds"),
    ("missing tenant", setter(tenant_id=""), "tenant_id"),
    ("bad tenant id", setter(tenant_id="acme corp!"), "tenant_id"),
    ("missing user", setter(user_id=""), "user_id"),
    ("bad conversation id", setter(conversation_id="chat 1"), "conversation_id"),
    ("missing idempotency key", setter(idempotency_key=""), "idempotency_key"),
    ("idempotency key too long",
     setter(idempotency_key="k" * (limits.idempotency_key_chars_max + 1)), "idempotency_key"),
    ("unknown strategy", setter(strategy=99), "strategy"),
    ("share above 1", with_policy(history_share=1.5), "policy.history_share"),
    ("negative share", with_policy(system_share=-0.1), "policy.system_share"),
    ("NaN share", with_policy(input_share=float("nan")), "policy.input_share"),
    ("shares over 1 in sum", with_policy(system_share=0.5, history_share=0.6), "policy"),
    ("tool with a bad name", with_tool(name="book hotel"), "tools[0].name"),
    ("tool parameters not JSON", with_tool(name="book", parameters_json="{nope"),
     "tools[0].parameters_json"),
    ("tool parameters not an object", with_tool(name="book", parameters_json="[1]"),
     "tools[0].parameters_json"),
]  # fmt: skip


def call_msg(*calls: tuple[str, str, str], content: str = "") -> cpb.ChatMessage:
    made = [cpb.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in calls]
    return msg(ASSISTANT, content, tool_calls=made)


def answer(call_id: str, content: str = '{"temp": 21}') -> cpb.ChatMessage:
    return msg(TOOL, content, tool_call_id=call_id)


def for_model(
    model: str, *messages: cpb.ChatMessage
) -> Callable[[cpb.PrepareContextRequest], None]:
    def change(r: cpb.PrepareContextRequest) -> None:
        r.model = model
        replace_messages(*messages)(r)

    return change


WEATHER = ("call_1", "get_weather", '{"city": "Paris"}')
RAIN = ("call_2", "get_rain", '{"city": "Paris"}')


def with_call(*calls: tuple[str, str, str]) -> Callable[[cpb.PrepareContextRequest], None]:
    """A user turn, one assistant message making `calls`, each answered, and the input."""
    return replace_messages(msg(USER), call_msg(*calls), *[answer(c[0]) for c in calls], msg(USER))


TOOL_CALL_CASES: list[tuple[str, Callable[[cpb.PrepareContextRequest], None], str]] = [
    ("tool call without an id", with_call(("", "get_weather", "{}")),
     "messages[1].tool_calls[0].id"),
    ("tool call without a name", with_call(("call_1", "", "{}")),
     "messages[1].tool_calls[0].name"),
    ("tool call name with spaces", with_call(("call_1", "get weather", "{}")),
     "messages[1].tool_calls[0].name"),
    ("tool call arguments not JSON", with_call(("call_1", "get_weather", "{city: Paris")),
     "messages[1].tool_calls[0].arguments_json"),
    ("tool call arguments not an object", with_call(("call_1", "get_weather", '["Paris"]')),
     "messages[1].tool_calls[0].arguments_json"),
    ("tool call arguments too big",
     with_call(("call_1", "get_weather", '{"a": "' + "x" * limits.tool_arguments_bytes_max + '"}')),
     "messages[1].tool_calls[0].arguments_json"),
    ("a call never answered", replace_messages(msg(USER), call_msg(WEATHER), msg(USER)),
     "messages[1].tool_calls[0]"),
    ("one of two calls never answered",
     replace_messages(msg(USER), call_msg(WEATHER, RAIN), answer("call_1"), msg(USER)),
     "messages[1].tool_calls[1]"),
    ("a result whose id matches no call",
     replace_messages(msg(USER), call_msg(WEATHER), answer("call_1"), answer("call_9"), msg(USER)),
     "messages[3].tool_call_id"),
    ("a call answered twice",
     replace_messages(msg(USER), call_msg(WEATHER), answer("call_1"), answer("call_1"), msg(USER)),
     "messages[3].tool_call_id"),
    ("a result before its call",
     replace_messages(msg(USER), answer("call_1"), call_msg(WEATHER), answer("call_1"), msg(USER)),
     "messages[1].tool_call_id"),
    ("two calls with one id", with_call(WEATHER, WEATHER), "messages[1].tool_calls[1]"),
    ("tool calls on a user message",
     replace_messages(msg(USER, tool_calls=[cpb.ToolCall(id="c1", name="f")])),
     "messages[0].tool_calls"),
    ("tool_call_ids disagreeing with tool_calls",
     replace_messages(msg(USER), msg(ASSISTANT, "", tool_call_ids=["other"],
                                     tool_calls=[cpb.ToolCall(id="call_1", name="f")]),
                      answer("call_1"), msg(USER)),
     "messages[1].tool_call_ids"),
    ("unknown serving stack", setter(serving_stack=9), "serving_stack"),
    ("date that does not exist", setter(date="2026-13-01"), "date"),
    ("date not as YYYY-MM-DD", setter(date="6 Dec 2026"), "date"),
    ("unknown history start", setter(history_start=7), "history_start"),
    ("unknown output hold", setter(output_hold=3), "output_hold"),
    ("negative output hold", setter(output_hold=-1), "output_hold"),
    ("two tool calls in one Llama 3.1 message (its template allows one)",
     for_model("llama-3.1-8b", msg(USER), call_msg(WEATHER, RAIN), answer("call_1"),
               answer("call_2"), msg(USER)), "messages"),
    ("a Mistral call id that is not 9 letters or digits (mistral-common's rule)",
     for_model("mistral-nemo", msg(USER), call_msg(WEATHER), answer("call_1"), msg(USER)),
     "messages"),
    ("a Mistral assistant message with both content and tool calls",
     for_model("mistral-nemo", msg(USER), call_msg(("abcDEF123", "f", "{}"), content="Let me see."),
               answer("abcDEF123"), msg(USER)), "messages"),
]  # fmt: skip
CASES += TOOL_CALL_CASES


def tenant_events(stub: Stub, tenant: str) -> int:
    replies = stub.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant or "none"))
    return sum(len(r.events) for r in replies)


@pytest.mark.parametrize(("change", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_prepare_context_refuses_bad_input_naming_the_field_and_reserves_nothing(
    ctx: Any, stub: Stub, change: Callable[[cpb.PrepareContextRequest], None], field: str
) -> None:
    tenant = new_id("t")
    request = valid(tenant)
    change(request)
    failed = call_fails(ctx.PrepareContext, request)
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT, failed.message
    assert field in [f for f, _ in failed.field_violations], failed.field_violations
    assert failed.reason in ("INVALID_ARGUMENT", "UNKNOWN_MODEL")
    assert tenant_events(stub, tenant) == 0


def test_an_unknown_model_lists_the_known_families(ctx: Any) -> None:
    request = valid(new_id("t"))
    request.model = "gpt-17-ultra"
    failed = call_fails(ctx.PrepareContext, request)
    assert failed.reason == "UNKNOWN_MODEL" and failed.metadata["model"] == "gpt-17-ultra"
    assert {"gpt-4o", "llama-3", "qwen2.5", "claude"} <= set(
        failed.metadata["families"].split(", ")
    )


def test_every_violation_of_a_request_is_reported_at_once(ctx: Any) -> None:
    request = valid(new_id("t"))
    request.max_output_tokens, request.user_id, request.ttl_seconds = -1, "", -3
    failed = call_fails(ctx.PrepareContext, request)
    fields = {f for f, _ in failed.field_violations}
    assert {"max_output_tokens", "user_id", "ttl_seconds"} <= fields


def test_a_request_above_the_message_cap_is_refused_by_grpc_before_parsing(
    ctx: Any, stub: Stub
) -> None:
    tenant = new_id("t")
    request = valid(tenant)
    request.messages.append(msg(USER, "z" * limits.request_bytes_max))
    failed = call_fails(ctx.PrepareContext, request)
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert tenant_events(stub, tenant) == 0


COUNT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("neither messages nor text", {"model": "gpt-4o"}, "messages"),
    ("both messages and text",
     {"model": "gpt-4o", "text": "hi", "messages": [msg(USER)]}, "messages"),
    ("unknown model", {"model": "nope-1", "text": "hi"}, "model"),
    ("no model and no encoding", {"text": "hi"}, "model"),
    ("tools with text", {"model": "gpt-4o", "text": "hi", "tools": [cpb.ToolDefinition(name="a")]},
     "tools"),
    ("unknown role", {"model": "gpt-4o", "messages": [msg(7)]}, "messages[0].role"),
    ("text too big", {"model": "gpt-4o", "text": "t" * (limits.messages_content_bytes_max + 1)},
     "text"),
    ("tool call arguments not JSON",
     {"model": "qwen2.5-7b", "messages": [msg(USER), call_msg(("c1", "f", "{x")), answer("c1")]},
     "messages[1].tool_calls[0].arguments_json"),
    ("a call never answered",
     {"model": "qwen3-8b", "messages": [msg(USER), call_msg(("c1", "f", "{}"))]},
     "messages[1].tool_calls[0]"),
    ("a result whose id matches no call",
     {"model": "llama-3.1-8b", "messages": [msg(USER), answer("c1")]}, "messages[1].tool_call_id"),
    ("bad date", {"model": "llama-3.1-8b", "messages": [msg(USER)], "date": "2026-02-30"}, "date"),
    ("unknown serving stack", {"model": "llama-3.1-8b", "messages": [msg(USER)],
                               "serving_stack": 5}, "serving_stack"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "field"), [c[1:] for c in COUNT_CASES], ids=[c[0] for c in COUNT_CASES]
)
def test_count_tokens_refuses_bad_input_naming_the_field(
    ctx: Any, fields: dict[str, Any], field: str
) -> None:
    failed = call_fails(ctx.CountTokens, cpb.CountTokensRequest(**fields))
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in failed.field_violations], failed.field_violations


def test_an_unknown_model_is_counted_with_an_explicit_encoding(ctx: Any) -> None:
    counted = ctx.CountTokens(
        cpb.CountTokensRequest(model="my-finetune", encoding="cl100k_base", text="hello world")
    )
    assert (counted.total_tokens, counted.encoding, counted.exact) == (2, "cl100k_base", True)


# --- bad configuration -----------------------------------------------------------------------

CONFIG_CASES = [
    ("TOKENLEDGER_CONTEXT_LISTEN", "nowhere"),
    ("TOKENLEDGER_LEDGER_TARGET", "localhost"),
    ("CONTEXT_SUMMARIZER_URL", "ftp://example.com"),
    ("CONTEXT_POLICY", "system=0.5,history=0.7"),
    ("CONTEXT_POLICY", "memory=0.2"),
    ("CONTEXT_POLICY", "system=lots"),
    ("TOKENIZER_POOL_BYTES_MAX", "-1"),
    ("TOKENIZER_POOL_BYTES_MAX", "12 parsecs"),
    ("COUNT_CACHE_ENTRIES_MAX", "1MiB"),
    ("TOKENLEDGER_LEDGER_TIMEOUT_S", "0"),
    ("CONTEXT_OUTPUT_HOLD_MARGIN", "-0.1"),
    ("CONTEXT_OUTPUT_HOLD_MARGIN", "11"),
    ("CONTEXT_OUTPUT_HOLD_MARGIN", "nan"),
    ("CONTEXT_OUTPUT_HOLD_MARGIN", "ten percent"),
    ("CONTEXT_OUTPUT_STATS_TTL_S", "-1"),
    ("CONTEXT_OUTPUT_STATS_TTL_S", "301"),
]


@pytest.mark.parametrize(("name", "value"), CONFIG_CASES)
def test_a_bad_setting_is_a_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        ContextSettings.from_env({name: value})


def test_settings_parse_policy_sizes_and_defaults() -> None:
    settings = ContextSettings.from_env(
        {
            "CONTEXT_POLICY": "system=0.1, history=0.6",
            "TOKENIZER_POOL_BYTES_MAX": "256MiB",
            "CONTEXT_SUMMARIZER_URL": "http://127.0.0.1:8000/v1/",
        }
    )
    assert (settings.policy.system_share, settings.policy.history_share) == (0.1, 0.6)
    assert settings.policy.input_share == 0.2  # the default
    assert settings.pool_bytes_max == 256 * MiB
    assert settings.summarizer_url == "http://127.0.0.1:8000/v1"
    assert (settings.listen, settings.ledger_target) == ("127.0.0.1:50052", "127.0.0.1:50051")
    assert (settings.output_hold.margin, settings.output_hold.stats_ttl_s) == (0.1, 5.0)
    hold = ContextSettings.from_env(
        {"CONTEXT_OUTPUT_HOLD_MARGIN": "0.25", "CONTEXT_OUTPUT_STATS_TTL_S": "0"}
    ).output_hold
    assert (hold.margin, hold.stats_ttl_s) == (0.25, 0.0)


def test_context_serve_refuses_to_start_on_a_bad_setting() -> None:
    env = os.environ | {"CONTEXT_POLICY": "reserve=2"}
    done = subprocess.run(
        [str(TOKENLEDGER), "context-serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "CONTEXT_POLICY" in done.stderr
