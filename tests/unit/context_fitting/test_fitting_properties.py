"""Property test: for random conversations, counts and budgets every strategy obeys the rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from services.context.fitting import (
    SUMMARY_NAME,
    AllocationPolicy,
    DoesNotFit,
    FitRequest,
    FitResult,
    Strategy,
    fit,
    summary_role,
)
from services.context.messages import ChatMessage, Role

VOCABULARY = ["deploy", "postgres", "cache", "queue", "error", "retry", "ok.", "why?", "sure!"]


@st.composite
def conversations(draw: st.DrawFn) -> list[ChatMessage]:
    """System/user/assistant messages, tool calls with results (some orphaned), some pinned."""
    messages: list[ChatMessage] = []
    calls: list[str] = []
    for i in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["system", "developer", "user", "assistant", "call", "tool"]))
        content = " ".join(draw(st.lists(st.sampled_from(VOCABULARY), max_size=25)))
        pinned, priority = draw(st.integers(0, 9)) == 0, draw(st.integers(-1, 2))
        if kind == "call":
            ids = tuple(f"c{i}.{k}" for k in range(draw(st.integers(1, 2))))
            calls.extend(ids)
            messages.append(
                ChatMessage(Role.ASSISTANT, content, "", pinned, priority, tool_call_ids=ids)
            )
        elif kind == "tool":
            call_id = draw(st.sampled_from([*calls, "missing"]))
            messages.append(ChatMessage(Role.TOOL, content, "", pinned, priority, call_id))
        else:
            messages.append(ChatMessage(Role(kind), content, pinned=pinned, priority=priority))
    return messages


@st.composite
def policies(draw: st.DrawFn) -> AllocationPolicy:
    parts = draw(st.lists(st.integers(0, 10), min_size=4, max_size=4))
    scale = max(sum(parts), 10)
    return AllocationPolicy(*(p / scale for p in parts))


@st.composite
def counts(draw: st.DrawFn) -> Callable[[ChatMessage], int]:
    per_word, overhead = draw(st.integers(1, 3)), draw(st.integers(0, 5))
    return lambda m: per_word * len(m.content.split()) + overhead


@dataclass(frozen=True)
class Spec:
    """The rules restated independently of the implementation."""

    messages: list[ChatMessage]

    def input_index(self) -> int | None:
        users = [i for i, m in enumerate(self.messages) if m.role is Role.USER]
        return users[-1] if users else None

    def groups(self) -> list[set[int]]:
        """Index sets that must be kept or dropped as a whole (a call with its results)."""
        owner: dict[str, int] = {}
        groups: dict[int, set[int]] = {}
        for i, m in enumerate(self.messages):
            if m.role is Role.TOOL and m.tool_call_id in owner:
                groups[owner[m.tool_call_id]].add(i)
                continue
            groups[i] = {i}
            if m.role is Role.ASSISTANT:
                for call_id in m.tool_call_ids:
                    owner.setdefault(call_id, i)
        return sorted(groups.values(), key=min)

    def is_mandatory(self, i: int) -> bool:
        m = self.messages[i]
        return m.role in (Role.SYSTEM, Role.DEVELOPER) or m.pinned or i == self.input_index()

    def mandatory(self) -> set[int]:
        return {i for g in self.groups() if any(self.is_mandatory(j) for j in g) for i in g}


def check_result(
    spec: Spec, request: FitRequest, count: Callable[[ChatMessage], int], res: FitResult
) -> None:
    budget, fixed = request.budget_tokens, request.fixed_tokens
    kept = [s for s in res.sources if s is not None]
    assert res.tokens <= budget
    assert res.tokens == sum(count(m) for m in res.messages) + fixed
    assert res.breakdown.total == res.tokens
    assert kept == sorted(set(kept)), "order preserved, no duplicates"
    assert spec.mandatory() <= set(kept)
    for group in spec.groups():
        assert group <= set(kept) or not group & set(kept), "tool call split from its result"
    everything = set(range(len(spec.messages)))
    parts = [set(kept), set(res.summarized), set(res.dropped)]
    assert set().union(*parts) == everything
    assert sum(map(len, parts)) == len(everything)
    for message, source in zip(res.messages, res.sources, strict=True):
        if source is None:
            assert request.strategy is Strategy.SUMMARIZE
            assert (message.role, message.name) == (summary_role(request), SUMMARY_NAME)
        elif source not in res.truncated:
            assert message == spec.messages[source]
        else:
            assert request.strategy is Strategy.TRUNCATE
            assert not spec.messages[source].pinned
            assert spec.messages[source].role not in (Role.SYSTEM, Role.DEVELOPER)
    assert res.sources.count(None) <= 1


def check_starts_on_user(spec: Spec, request: FitRequest, res: FitResult) -> None:
    """Once history was dropped or summarized, the first message after the system messages is
    a user message (the summary speaks as the user), unless a pinned message stands there."""
    if not request.start_on_user or not (res.dropped or res.summarized):
        return
    rest = [
        (m, s) for m, s in zip(res.messages, res.sources, strict=True)
        if m.role not in (Role.SYSTEM, Role.DEVELOPER)
    ]  # fmt: skip
    if not rest:
        return  # nothing but system messages kept
    message, source = rest[0]
    assert message.role is Role.USER or (source is not None and source in spec.mandatory())


def check_window_suffix(spec: Spec, res: FitResult) -> None:
    droppable = [g for g in spec.groups() if not g & spec.mandatory()]
    flags = [g <= set(res.sources) for g in droppable]
    assert flags == sorted(flags), "WINDOW keeps a contiguous suffix of the history"


@settings(max_examples=400, deadline=None)
@given(
    messages=conversations(),
    count=counts(),
    fixed=st.integers(0, 20),
    strategy=st.sampled_from(list(Strategy)),
    policy=policies(),
    start_on_user=st.booleans(),
    data=st.data(),
)
def test_fit_obeys_the_rules_for_any_conversation_and_budget(
    messages: list[ChatMessage],
    count: Callable[[ChatMessage], int],
    fixed: int,
    strategy: Strategy,
    policy: AllocationPolicy,
    start_on_user: bool,
    data: st.DataObject,
) -> None:
    """DoesNotFit exactly when the mandatory part is over budget; otherwise every rule holds."""
    spec = Spec(messages)
    original_tokens = sum(count(m) for m in messages) + fixed
    # Mostly around the conversation's size, where the interesting cases are.
    budget = data.draw(st.integers(0, original_tokens + 10) | st.integers(0, 1000), label="budget")
    request = FitRequest(messages, budget, strategy, policy, fixed, start_on_user)
    mandatory_tokens = sum(count(messages[i]) for i in spec.mandatory()) + fixed
    try:
        res = fit(request, count)
    except DoesNotFit as error:
        assert mandatory_tokens > budget
        assert error.shortfall_tokens == error.required_tokens - budget > 0
        assert f"short by {error.shortfall_tokens}" in str(error)
        return
    # TRUNCATE may cut the input to make an oversized mandatory part fit.
    assert mandatory_tokens <= budget or strategy is Strategy.TRUNCATE
    check_result(spec, request, count, res)
    check_starts_on_user(spec, request, res)
    if original_tokens <= budget:
        assert res.messages == tuple(messages)
        assert not res.fitted
    else:
        assert res.fitted
    if strategy is Strategy.WINDOW:
        check_window_suffix(spec, res)
    assert res == fit(request, count), "deterministic"
