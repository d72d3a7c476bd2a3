"""The fitting rules of the context service, one test per rule (pure, no tokenizer)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pytest

from services.context.fitting import (
    SUMMARY_NAME,
    SUMMARY_ROLE,
    AllocationPolicy,
    DoesNotFit,
    FitRequest,
    FitResult,
    PendingFit,
    Strategy,
    finish_fit,
    fit,
    fit_until_summary,
)
from services.context.messages import ChatMessage, Role
from services.context.summarizer import TextCount
from tests.unit.context_fitting._support import (
    assistant,
    call,
    count,
    result,
    system,
    text,
    total,
    user,
)

MARKER = re.compile(r"\n\[… (\d+) characters removed …\]\n")


def run(
    messages: Sequence[ChatMessage],
    budget: int,
    strategy: Strategy = Strategy.WINDOW,
    policy: AllocationPolicy | None = None,
    fixed: int = 0,
    start_on_user: bool = False,
) -> FitResult:
    """A fit; history may start on any message unless asked (HISTORY_START_ANY: the rules
    below hold either way, and are easier to see without the user-first rule)."""
    request = FitRequest(
        messages, budget, strategy, policy or AllocationPolicy(), fixed, start_on_user
    )
    return fit(request, count)


def assert_budget_kept(res: FitResult, budget: int, fixed: int = 0) -> None:
    assert res.tokens <= budget
    assert res.tokens == sum(count(m) for m in res.messages) + fixed
    assert res.breakdown.total == res.tokens


# --- policy and request validation -----------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, True, "0.5"])
@pytest.mark.parametrize("name", ["system_share", "history_share", "input_share", "reserve_share"])
def test_policy_rejects_a_share_outside_0_to_1_naming_the_field(name: str, bad: object) -> None:
    shares: dict[str, object] = {
        "system_share": 0.0,
        "history_share": 0.0,
        "input_share": 0.0,
        "reserve_share": 0.0,
    }
    shares[name] = bad
    with pytest.raises(ValueError, match=name):
        AllocationPolicy(**shares)  # type: ignore[arg-type]


def test_policy_rejects_shares_summing_over_one() -> None:
    with pytest.raises(ValueError, match=r"must be at most 1, got 1\.2"):
        AllocationPolicy(0.3, 0.5, 0.2, 0.2)


def test_policy_accepts_shares_summing_to_one_despite_float_rounding() -> None:
    assert AllocationPolicy(0.1, 0.2, 0.3, 0.4).reserve_share == 0.4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [user("hi"), "hi"]}, r"messages\[1\]"),
        ({"budget_tokens": -1}, "budget_tokens"),
        ({"budget_tokens": 1.5}, "budget_tokens"),
        ({"budget_tokens": True}, "budget_tokens"),
        ({"fixed_tokens": -3}, "fixed_tokens"),
        ({"strategy": "window"}, "strategy"),
        ({"policy": {"system_share": 0.1}}, "policy"),
    ],
)
def test_request_validation_names_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {
        "messages": [user("hi")],
        "budget_tokens": 10,
        "strategy": Strategy.WINDOW,
        "policy": AllocationPolicy(),
        "fixed_tokens": 0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        FitRequest(**args)  # type: ignore[arg-type]


def test_a_negative_count_from_the_caller_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"count\(messages\[0\]\) returned -1"):
        fit(FitRequest([user("hi")], 10), lambda m: -1)


# --- rules every strategy obeys --------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(Strategy))
def test_a_conversation_that_fits_comes_back_unchanged(strategy: Strategy) -> None:
    messages = [system(), user(text(3)), assistant(text(3)), user(text(3))]
    res = run(messages, total(messages), strategy)
    assert res.messages == tuple(messages)
    assert res.sources == (0, 1, 2, 3)
    assert not res.fitted
    assert res.dropped == res.truncated == res.summarized == ()
    assert res.tokens == res.original_tokens == total(messages)
    assert res.tokens_saved == 0


@pytest.mark.parametrize("strategy", list(Strategy))
def test_system_pinned_and_input_are_never_dropped(strategy: Strategy) -> None:
    messages = [
        system(),
        user(text(10)),
        assistant(text(10), pinned=True),
        assistant(text(10)),
        user(text(10)),
    ]
    mandatory = [messages[i] for i in (0, 2, 4)]
    res = run(messages, total(mandatory) + 2, strategy)
    assert [m for m in res.messages if m.name != SUMMARY_NAME] == mandatory
    assert res.fitted
    assert_budget_kept(res, total(mandatory) + 2)


@pytest.mark.parametrize("strategy", [Strategy.WINDOW, Strategy.PRIORITY, Strategy.SUMMARIZE])
def test_does_not_fit_says_by_how_much_the_mandatory_part_is_short(strategy: Strategy) -> None:
    messages = [system(text(20)), assistant(text(5)), user(text(20))]
    with pytest.raises(DoesNotFit) as caught:
        run(messages, 40, strategy, fixed=5)
    error = caught.value
    assert (error.required_tokens, error.budget_tokens, error.shortfall_tokens) == (53, 40, 13)
    assert error.mandatory_indices == (0, 2)
    assert "need 53 tokens but only 40 are available (short by 13)" in str(error)
    assert error.metadata()["shortfall_tokens"] == "13"


def test_fixed_tokens_count_against_the_budget() -> None:
    messages = [system(), user(text(10)), user(text(2))]
    assert not run(messages, total(messages), fixed=0).fitted
    res = run(messages, total(messages), fixed=1)
    assert res.dropped == (1,)
    assert_budget_kept(res, total(messages), fixed=1)
    assert res.breakdown.fixed == 1


@pytest.mark.parametrize("strategy", [Strategy.WINDOW, Strategy.PRIORITY])
def test_a_tool_call_and_its_result_are_dropped_together(strategy: Strategy) -> None:
    messages = [system(), user(text(2)), call(text(2), "c1"), result("c1", text(20)), user("go")]
    # Room for the result alone (24) but not for call + result (30).
    res = run(messages, count(messages[0]) + count(messages[4]) + 27, strategy)
    assert 2 not in res.sources
    assert 3 not in res.sources
    assert {2, 3} <= set(res.dropped)


def test_a_tool_call_and_its_results_are_kept_together() -> None:
    messages = [
        system(),
        user(text(2)),
        call("", "a", "b"),
        result("a", text(5)),
        result("b", text(5)),
        user("go"),
    ]
    budget = total(messages) - count(messages[1])
    res = run(messages, budget)
    assert res.sources == (0, 2, 3, 4, 5)


def test_a_tool_result_without_its_call_is_its_own_unit() -> None:
    messages = [system(), call(text(20), "c1"), result("missing", text(2)), user("go")]
    res = run(messages, total(messages) - count(messages[1]))
    assert res.sources == (0, 2, 3)


def test_a_pinned_tool_result_keeps_its_call() -> None:
    messages = [
        system(),
        call(text(10), "c1"),
        result("c1", text(2), pinned=True),
        user(text(30)),
        user("go"),
    ]
    res = run(messages, total(messages) - count(messages[3]))
    assert res.sources == (0, 1, 2, 4)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_kept_messages_keep_their_order(strategy: Strategy) -> None:
    messages = [user(text(3, f"m{i}")) for i in range(10)]
    messages.insert(4, system())
    res = run(messages, total(messages) // 2, strategy)
    kept = [s for s in res.sources if s is not None]
    assert kept == sorted(kept)
    assert_budget_kept(res, total(messages) // 2)


def test_breakdown_counts_tokens_by_kind() -> None:
    messages = [
        system(text(2)),
        ChatMessage(Role.DEVELOPER, text(3)),
        user(text(4), pinned=True),
        assistant(text(5)),
        call(text(1), "c"),
        result("c", text(6)),
        user(text(7)),
    ]
    res = run(messages, total(messages) + 9, fixed=9)
    assert not res.fitted
    b = res.breakdown
    assert (b.system, b.pinned, b.history, b.tool_results, b.input) == (13, 8, 14, 10, 11)
    assert (b.summary, b.fixed, b.total) == (0, 9, res.tokens)


def test_tokens_saved_is_input_tokens_minus_output_tokens() -> None:
    messages = [system(), user(text(10)), assistant(text(10)), user("go")]
    res = run(messages, 30)
    assert res.tokens_saved == res.original_tokens - res.tokens == 14
    assert res.strategy is Strategy.WINDOW


def test_over_share_reports_a_kind_above_its_policy_share() -> None:
    messages = [system(text(16)), user("hi")]  # system: 20 tokens of a 100-token budget
    res = run(messages, 100, policy=AllocationPolicy(0.1, 0.5, 0.2, 0.1))
    assert res.over_share == ("system",)
    assert not res.fitted


# --- WINDOW ----------------------------------------------------------------------------------


def test_window_keeps_the_newest_units_and_stops_at_the_first_that_does_not_fit() -> None:
    messages = [
        system(),
        user(text(1)),  # small and old: it would fit, but the window has stopped
        assistant(text(30)),
        user(text(5)),
        assistant(text(5)),
        user(text(1)),
    ]
    res = run(messages, count(messages[0]) + count(messages[5]) + 23)
    assert res.sources == (0, 3, 4, 5)
    assert res.dropped == (1, 2)


# --- PRIORITY --------------------------------------------------------------------------------

TRIP = [
    system(),
    user("my database password rotation schedule uses postgres vault"),
    assistant("ok noted the vault rotation"),
    user("what is the weather like today"),
    assistant("sunny and warm today"),
    user("how does postgres vault rotation work"),
]
TRIP_BUDGET = count(TRIP[0]) + count(TRIP[5]) + 21  # room for two of the four


def test_priority_keeps_a_relevant_old_message_over_an_irrelevant_newer_one() -> None:
    res = run(TRIP, TRIP_BUDGET, Strategy.PRIORITY)
    assert res.sources == (0, 1, 2, 5)
    assert run(TRIP, TRIP_BUDGET, Strategy.WINDOW).sources == (0, 3, 4, 5)


def test_explicit_priority_dominates_relevance_and_recency() -> None:
    messages = list(TRIP)
    messages[3] = user("what is the weather like today", priority=1)
    messages[1] = user(messages[1].content, priority=-1)
    res = run(messages, TRIP_BUDGET, Strategy.PRIORITY)
    assert 3 in res.sources
    assert 1 not in res.sources


def test_priority_skips_a_unit_too_big_and_keeps_smaller_ones() -> None:
    messages = [system(), user(text(2)), assistant(text(40)), user("go")]
    budget = count(messages[0]) + count(messages[3]) + 10
    assert run(messages, budget, Strategy.WINDOW).sources == (0, 3)
    assert run(messages, budget, Strategy.PRIORITY).sources == (0, 1, 3)


def test_priority_prefers_the_newer_of_otherwise_equal_units() -> None:
    messages = [system(), assistant("alpha beta"), assistant("alpha beta"), user("go")]
    res = run(messages, total(messages) - 6, Strategy.PRIORITY)
    assert res.sources == (0, 2, 3)


def test_priority_ranks_conversation_above_tool_chatter() -> None:
    messages = [
        system(),
        assistant("alpha beta gamma"),
        result("x", "alpha beta gamma"),
        user("go"),
    ]
    res = run(messages, total(messages) - 7, Strategy.PRIORITY)
    assert res.sources == (0, 1, 3)


def test_priority_is_deterministic() -> None:
    results = {run(TRIP, TRIP_BUDGET, Strategy.PRIORITY).sources for _ in range(5)}
    assert len(results) == 1


# --- TRUNCATE --------------------------------------------------------------------------------


def test_truncate_cuts_an_oversized_message_middle_out_keeping_head_and_tail() -> None:
    messages = [system(), user(text(100, "a")), assistant(text(3)), user(text(3))]
    res = run(messages, 100, Strategy.TRUNCATE)  # history share 0.5: 50 tokens per message
    assert res.truncated == (1,)
    assert res.dropped == ()
    cut = res.messages[1].content
    head, tail = MARKER.split(cut)[0], MARKER.split(cut)[2]
    removed = int(MARKER.search(cut).group(1))  # type: ignore[union-attr]
    assert messages[1].content.startswith(head)
    assert messages[1].content.endswith(tail)
    assert len(head) + removed + len(tail) == len(messages[1].content)
    assert 45 <= count(res.messages[1]) <= 50  # converges near the cap, never over it
    assert_budget_kept(res, 100)


def test_truncate_falls_back_to_dropping_the_oldest_units() -> None:
    messages = [system(), user(text(30)), assistant(text(30)), user(text(30)), user(text(2))]
    res = run(messages, 60, Strategy.TRUNCATE)
    assert res.sources == (0, 3, 4)
    assert res.truncated == (3,)  # 1 and 2 were cut too, but then dropped
    assert res.dropped == (1, 2)
    assert_budget_kept(res, 60)


def test_truncate_cuts_an_oversized_input_before_giving_up() -> None:
    messages = [system(text(20)), user(text(20))]
    res = run(messages, 40, Strategy.TRUNCATE, fixed=5)
    assert res.truncated == (1,)
    assert MARKER.search(res.messages[1].content)
    assert_budget_kept(res, 40, fixed=5)


@pytest.mark.parametrize(
    "messages",
    [
        [system(text(50)), user(text(2))],
        [system(), user(text(50), pinned=True), user(text(2))],
    ],
    ids=["system", "pinned"],
)
def test_truncate_never_cuts_system_or_pinned_messages(messages: list[ChatMessage]) -> None:
    with pytest.raises(DoesNotFit, match="short by"):
        run(messages, 40, Strategy.TRUNCATE)


# --- SUMMARIZE -------------------------------------------------------------------------------

TRAVEL = [
    system("You are a travel assistant."),
    user("I want to visit Japan in April. My budget is 3000 dollars."),
    assistant("April is cherry blossom season in Japan. Flights from Berlin cost about 900."),
    user("I prefer quiet towns over big cities. I also like hot springs."),
    assistant("Consider Kinosaki for hot springs. Takayama is a quiet town in the mountains."),
    user("Which town should I pick for hot springs?"),
]
TRAVEL_POLICY = AllocationPolicy(0.2, 0.4, 0.2, 0.2)
TRAVEL_BUDGET = total([TRAVEL[0], TRAVEL[4], TRAVEL[5]]) + 25


def summarize(summarizer: object = None) -> FitResult:
    request = FitRequest(
        TRAVEL, TRAVEL_BUDGET, Strategy.SUMMARIZE, TRAVEL_POLICY, start_on_user=False
    )
    return fit(request, count, summarizer)  # type: ignore[arg-type]


def test_summarize_replaces_the_dropped_span_by_one_summary_message() -> None:
    res = summarize()
    assert res.sources == (0, None, 4, 5)
    summary = res.messages[1]
    assert (
        (summary.role, summary.name) == (SUMMARY_ROLE, SUMMARY_NAME) == (Role.ASSISTANT, "summary")
    )
    assert summary.content.startswith("Summary of 3 earlier messages:\n")
    assert "hot springs" in summary.content
    assert res.summarized == (1, 2, 3)
    assert res.dropped == ()
    assert res.summary_tokens == count(summary) == res.breakdown.summary
    assert_budget_kept(res, TRAVEL_BUDGET)


def test_summarize_drops_more_history_than_window_to_make_room_for_the_summary() -> None:
    window = run(TRAVEL, TRAVEL_BUDGET, Strategy.WINDOW, TRAVEL_POLICY)
    assert window.sources == (0, 3, 4, 5)
    assert summarize().sources == (0, None, 4, 5)


class FixedSummarizer:
    """Returns a set text and records what it was asked."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.calls: list[tuple[list[ChatMessage], int, TextCount, str]] = []

    def summarize(
        self, messages: Sequence[ChatMessage], max_tokens: int, count: TextCount, *, query: str = ""
    ) -> str:
        self.calls.append((list(messages), max_tokens, count, query))
        return self.reply


def test_summarize_gives_the_summarizer_the_span_the_query_and_the_room() -> None:
    summarizer = FixedSummarizer("short")
    summarize(summarizer)
    [(messages, max_tokens, count_text, query)] = summarizer.calls
    assert messages == TRAVEL[1:4]
    assert max_tokens == 25
    assert query == TRAVEL[5].content
    assert count_text("two words") == 2 + 4  # the whole summary message, overhead included


def test_a_summarize_fit_stops_at_its_summary_and_finishes_with_any_text() -> None:
    """fit_until_summary hands out the span, the room and the query without calling a
    summarizer; finish_fit with a text gives what fit gives when a summarizer returns it."""
    request = FitRequest(
        TRAVEL, TRAVEL_BUDGET, Strategy.SUMMARIZE, TRAVEL_POLICY, start_on_user=False
    )
    step = fit_until_summary(request, count)
    assert isinstance(step, PendingFit)
    assert step.summary.messages == tuple(TRAVEL[1:4])
    assert (step.summary.max_tokens, step.summary.query) == (25, TRAVEL[5].content)
    assert finish_fit(step, "short", count) == summarize(FixedSummarizer("short"))
    assert finish_fit(step, text(500), count) == summarize(FixedSummarizer(text(500)))
    unchanged = FitRequest(
        TRAVEL, total(TRAVEL), Strategy.SUMMARIZE, TRAVEL_POLICY, start_on_user=False
    )
    assert fit_until_summary(unchanged, count) == fit(unchanged, count)


def test_summarize_cuts_a_summary_that_does_not_fit() -> None:
    res = summarize(FixedSummarizer(text(500)))
    summary = res.messages[1]
    assert summary.content.startswith("w0 w1")
    assert summary.content.endswith(" …")
    assert count(summary) <= 25
    assert_budget_kept(res, TRAVEL_BUDGET)


def test_summarize_without_a_summary_just_drops() -> None:
    res = summarize(FixedSummarizer(""))
    assert res.sources == (0, 4, 5)
    assert res.summarized == ()
    assert res.dropped == (1, 2, 3)
    assert res.summary_tokens == 0


# --- history starts on a user turn (the default, HISTORY_START_USER) --------------------------

LONG = [
    system(),
    user(text(10)),
    assistant(text(10)),
    user(text(10)),
    assistant(text(30)),
    user("go"),
]


def test_window_history_starts_on_a_user_message_by_default() -> None:
    """The window that fits begins with an assistant reply; by default it goes too, so the
    first message after the system prompt is a user message."""
    budget = total(LONG) - count(LONG[1]) - count(LONG[2])
    assert run(LONG, budget).sources == (0, 3, 4, 5)  # HISTORY_START_ANY
    res = run(LONG, budget, start_on_user=True)
    assert res.sources == (0, 3, 4, 5)
    budget = total(LONG) - count(LONG[1]) - count(LONG[2]) - count(LONG[3])
    assert run(LONG, budget).sources == (0, 4, 5)
    res = run(LONG, budget, start_on_user=True)
    assert res.sources == (0, 5)
    assert res.dropped == (1, 2, 3, 4)


def test_a_tool_call_is_never_the_first_kept_message() -> None:
    """An assistant tool call with its results before the first kept user message is dropped as
    one unit: never a result without its call, never a call without its results."""
    messages = [
        system(),
        user(text(10)),
        call("", "a"),
        result("a", text(3)),
        user("and then?"),
        assistant(text(2)),
        user("go"),
    ]
    budget = total(messages) - count(messages[1])
    assert run(messages, budget).sources == (0, 2, 3, 4, 5, 6)
    assert run(messages, budget, start_on_user=True).sources == (0, 4, 5, 6)


def test_priority_and_truncate_also_start_on_a_user_message() -> None:
    budget = total(LONG) - count(LONG[1]) - count(LONG[2]) - count(LONG[3])
    for strategy in (Strategy.PRIORITY, Strategy.TRUNCATE):
        res = run(LONG, budget, strategy, start_on_user=True)
        first = next(m for m in res.messages if m.role is not Role.SYSTEM)
        assert first.role is Role.USER, strategy


def test_a_pinned_assistant_message_stays_first_if_it_must() -> None:
    messages = [system(), assistant("pinned note", pinned=True), user(text(30)), user("go")]
    res = run(messages, total(messages) - count(messages[2]), start_on_user=True)
    assert res.sources == (0, 1, 3)


def test_summarize_folds_the_leading_replies_into_a_summary_that_speaks_as_the_user() -> None:
    request = FitRequest(TRAVEL, TRAVEL_BUDGET, Strategy.SUMMARIZE, TRAVEL_POLICY)
    res = fit(request, count)
    assert res.sources == (0, None, 5)
    assert res.summarized == (1, 2, 3, 4)
    summary = res.messages[1]
    assert (summary.role, summary.name) == (Role.USER, SUMMARY_NAME)
    assert_budget_kept(res, TRAVEL_BUDGET)


def test_a_conversation_that_fits_is_returned_as_sent_even_if_it_starts_on_a_reply() -> None:
    messages = [system(), assistant("hello, how can I help?"), user("go")]
    res = run(messages, total(messages), start_on_user=True)
    assert res.sources == (0, 1, 2)
    assert not res.fitted
