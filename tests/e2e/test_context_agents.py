"""Agent conversations through a real context server and ledger: tool calls round-trip through
CountTokens and PrepareContext for every family, a fitted conversation keeps each call with all
its results, and the kept history starts on a user turn (or on any turn when asked)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services.context.tokenizer_data import DATA_DIR_ENV
from services.context.tokenizers import TokenizerPool
from tests.support import ContextServerThread, ServerThread, new_id

REPO = Path(__file__).resolve().parents[2]
SYSTEM, USER, ASSISTANT, TOOL = (
    cpb.CHAT_ROLE_SYSTEM,
    cpb.CHAT_ROLE_USER,
    cpb.CHAT_ROLE_ASSISTANT,
    cpb.CHAT_ROLE_TOOL,
)
WEATHER = cpb.ToolDefinition(
    name="get_weather",
    description="Get the current weather in a city.",
    parameters_json=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)
# model -> (exact, method prefix)
FAMILIES = {
    "gpt-4o": (False, "exact:o200k_base+tool-messages:estimate"),
    "llama-3.1-8b": (True, "template:llama3.1-hf-template"),
    "qwen2.5-7b": (True, "template:qwen2.5-hf-template"),
    "qwen3-8b": (True, "template:qwen3-hf-template"),
    "mistral-nemo": (True, "encode_chat_completion:mistral-common==1.13.1"),
}


@pytest.fixture(scope="module")
def ctx(ledger: ServerThread) -> Iterator[Any]:
    pool = TokenizerPool(data_dir=Path(os.environ.get(DATA_DIR_ENV) or REPO / "var" / "tokenizers"))
    server = ContextServerThread(ledger.target, pool=pool).start()
    with server.stub() as s:
        yield s
    server.stop()


def msg(role: int, content: str = "", **kw: Any) -> cpb.ChatMessage:
    return cpb.ChatMessage(role=role, content=content, **kw)  # type: ignore[arg-type]


def agent_conversation(turns: int, seed: int = 1) -> list[cpb.ChatMessage]:
    """A system prompt, then per turn: the user asks, the assistant calls get_weather (ids of 9
    letters or digits, one call per message as Llama 3.1 requires), the tool answers, the
    assistant replies at length; the last turn's question is the input."""
    rng = random.Random(seed)
    out = [msg(SYSTEM, "You are a travel assistant. Use the weather tool when asked.")]
    for t in range(turns):
        city = rng.choice(["Paris", "Rome", "Lisbon", "Oslo", "Kyoto"])
        call_id = f"call{t:05d}"
        call = cpb.ToolCall(
            id=call_id, name="get_weather", arguments_json=json.dumps({"city": city})
        )
        out += [
            msg(USER, f"Turn {t}: what is the weather in {city} and what should I pack?"),
            msg(ASSISTANT, "", tool_calls=[call]),
            msg(
                TOOL,
                json.dumps({"city": city, "temp_c": rng.randrange(-5, 35)}),
                tool_call_id=call_id,
            ),
            msg(ASSISTANT, f"In {city} it is mild. " + "Pack layers and an umbrella. " * 8),
        ]
    out.append(msg(USER, "Which city had the best weather?"))
    return out


def prepare(ctx: Any, model: str, messages: list[cpb.ChatMessage], **kw: Any) -> Any:
    return ctx.PrepareContext(
        cpb.PrepareContextRequest(
            idempotency_key=new_id("p"), tenant_id=new_id("t"), user_id="ann", model=model,
            messages=messages, tools=[WEATHER], max_output_tokens=200, **kw,
        )
    )  # fmt: skip


def count(ctx: Any, model: str, messages: Any) -> Any:
    return ctx.CountTokens(cpb.CountTokensRequest(model=model, messages=messages, tools=[WEATHER]))


def assert_calls_whole(messages: Any) -> None:
    """Every kept call has all its results right after it, and every kept result its call."""
    open_calls: set[str] = set()
    for m in messages:
        if m.role == TOOL:
            assert m.tool_call_id in open_calls, "a result without its call"
            open_calls.discard(m.tool_call_id)
        else:
            assert not open_calls, "a call without its results"
            open_calls = {c.id for c in m.tool_calls}
    assert not open_calls


def first_after_system(messages: Any) -> Any:
    return next(m for m in messages if m.role not in (SYSTEM, cpb.CHAT_ROLE_DEVELOPER))


@pytest.mark.parametrize("model", FAMILIES)
def test_tool_calls_round_trip_and_windows_keep_each_call_with_its_results(
    ctx: Any, model: str
) -> None:
    exact, method = FAMILIES[model]
    messages = agent_conversation(12)
    counted = count(ctx, model, messages)
    assert (counted.exact, counted.method) == (exact, method)
    assert counted.tool_tokens > 0
    window = counted.total_tokens // 2
    reply = prepare(ctx, model, messages, context_window_tokens=window)
    assert reply.limited_by == cpb.LIMITED_BY_WINDOW and reply.dropped_indices
    assert reply.exact == exact
    assert reply.breakdown.prompt_total <= window - reply.breakdown.output_reserve
    for source, kept in zip(reply.source_indices, reply.messages, strict=True):
        assert kept == messages[source]  # tool calls come back as sent
    assert any(m.tool_calls for m in reply.messages)
    assert_calls_whole(reply.messages)
    assert first_after_system(reply.messages).role == USER
    # The fitted prompt recounts to what PrepareContext reported.
    assert count(ctx, model, reply.messages).total_tokens == reply.breakdown.prompt_total


def long_conversation(seed: int) -> list[cpb.ChatMessage]:
    """Replies three to five times longer than questions, as in real chats."""
    rng = random.Random(seed)
    out = [msg(SYSTEM, "You are a helpful assistant.")]
    for t in range(40):
        out.append(msg(USER, f"Question {t}: " + "tell me more about it " * rng.randrange(2, 6)))
        out.append(
            msg(ASSISTANT, f"Answer {t}: " + "here is what I know. " * rng.randrange(10, 30))
        )
    out.append(msg(USER, "Thanks, one last question."))
    return out


@pytest.mark.parametrize(
    "strategy", [cpb.STRATEGY_WINDOW, cpb.STRATEGY_PRIORITY, cpb.STRATEGY_TRUNCATE]
)
def test_kept_history_starts_on_a_user_turn_in_every_long_conversation(
    ctx: Any, strategy: int
) -> None:
    """Five long conversations fitted to windows that cut mid-exchange: by default the kept
    history always starts on a user turn; with HISTORY_START_ANY, WINDOW starts on an
    assistant reply in some of them (the problem the default avoids)."""
    starts_any = []
    for seed in range(5):
        messages = long_conversation(seed)
        for window in (1_500, 2_300, 3_100):
            reply = prepare(
                ctx, "gpt-4o", messages, strategy=strategy, context_window_tokens=window
            )
            assert reply.dropped_indices
            assert first_after_system(reply.messages).role == USER
            anyway = prepare(
                ctx, "gpt-4o", messages, strategy=strategy, context_window_tokens=window,
                history_start=cpb.HISTORY_START_ANY,
            )  # fmt: skip
            starts_any.append(first_after_system(anyway.messages).role)
    if strategy == cpb.STRATEGY_WINDOW:  # PRIORITY happens to pick user-first windows here
        assert ASSISTANT in starts_any


def test_summarize_starts_the_history_with_a_summary_spoken_by_the_user(ctx: Any) -> None:
    messages = long_conversation(7)
    reply = prepare(
        ctx, "gpt-4o", messages, strategy=cpb.STRATEGY_SUMMARIZE, context_window_tokens=2_000
    )
    first = first_after_system(reply.messages)
    assert (first.role, first.name) == (USER, "summary")
    assert reply.summarized_indices


def test_the_serving_stack_and_the_date_change_the_llama_count(ctx: Any) -> None:
    messages = [msg(SYSTEM, "Be brief."), msg(USER, "Hi")]
    hf = ctx.CountTokens(cpb.CountTokensRequest(model="llama-3.1-8b", messages=messages))
    ollama = ctx.CountTokens(
        cpb.CountTokensRequest(
            model="llama-3.1-8b", messages=messages, serving_stack=cpb.SERVING_STACK_OLLAMA
        )
    )
    assert hf.exact and not ollama.exact and ollama.total_tokens < hf.total_tokens
    dated = ctx.CountTokens(
        cpb.CountTokensRequest(model="llama-3.1-8b", messages=messages, date="2026-12-06")
    )
    assert dated.exact and dated.method == hf.method
