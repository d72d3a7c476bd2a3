"""PrepareContext's planning and fitting, pure: no I/O, no event loop. The servicer runs these
in a worker thread (small requests inline) and does the ledger and endpoint calls on the event
loop between them:

1. `plan_request` (thread): count the conversation as the serving stack renders it (each
   message's share, cached per content), the tool definitions and the template's own tokens;
   find the mandatory part (system, pinned and input
   messages with their tool pairs); plan one Reserve: amount = the prompt capped by the window
   + max_output_tokens, floor = the mandatory part + min_output_tokens (WindowTooSmall when
   even the floor exceeds the window: nothing is reserved); `Plan.with_hold` then holds a
   predicted output instead, the prompt's room unchanged;
2. the Reserve (loop); `Plan.split` turns the grant into a prompt budget and an output reserve;
3. `fit_budget` (thread): fit the conversation to the budget with the strategy; with a
   summarizer that does I/O, a SUMMARIZE fit stops where its summary is needed;
4. the summarizer's ledger hold and endpoint call (loop), then `finish_summary` (thread).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from services.context.fitting import (
    FitRequest,
    FitResult,
    PendingFit,
    Strategy,
    SummaryRequest,
    finish_fit,
    fit,
    fit_until_summary,
    mandatory_part,
    summary_role,
    summary_text_count,
)
from services.context.memory import Fact, MemorySelection, insert_at, select
from services.context.messages import DEFAULT_RENDER, ChatMessage, RenderOptions, Role, ToolDef
from services.context.requests import Prepare, Target
from services.context.summarizer import ExtractiveSummarizer, TextCount
from services.context.tokenizers import TokenCounter

Job = TypeVar("Job")

# --- counting --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counted:
    """A conversation's count: per message (overhead included), tools and priming."""

    messages: Sequence[ChatMessage]
    per_message: tuple[int, ...]
    reply_priming: int
    tool_tokens: int
    encoding: str
    exact: bool
    method: str
    chat_format: str
    tool_method: str = ""

    @property
    def fixed_tokens(self) -> int:
        """Tokens no strategy can remove: tool definitions and reply priming."""
        return self.reply_priming + self.tool_tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(self.per_message) + self.fixed_tokens


def count_conversation(
    counter: TokenCounter,
    target: Target,
    messages: Sequence[ChatMessage],
    tools: Sequence[ToolDef],
    render: RenderOptions = DEFAULT_RENDER,
) -> Counted:
    """The conversation as the model's serving stack renders it (see TokenCounter.count_chat)."""
    chat = counter.count_chat(target.count_target, messages, tools, render)
    return Counted(
        messages=messages,
        per_message=chat.per_message,
        reply_priming=chat.reply_priming,
        tool_tokens=chat.tool_tokens,
        encoding=chat.encoding,
        exact=chat.exact,
        method=chat.method,
        chat_format=chat.chat_format,
        tool_method=chat.tool_method,
    )


def message_count(
    counter: TokenCounter, target: Target, counted: Counted
) -> Callable[[ChatMessage], int]:
    """fitting.Count that reuses the counts already made (by identity), counting only the
    messages fitting creates (cut messages, the summary)."""
    known = {id(m): n for m, n in zip(counted.messages, counted.per_message, strict=True)}
    count_new = counter.message_counter(target.count_target)

    def count(m: ChatMessage) -> int:
        found = known.get(id(m))
        return count_new(m) if found is None else found

    return count


def mandatory_tokens(
    counted: Counted, strategy: Strategy, count: Callable[[ChatMessage], int]
) -> tuple[int, tuple[int, ...]]:
    """Tokens of what cannot be dropped (tools and priming included), and its indices.

    Under TRUNCATE the input may be cut, so it counts as its template and one token only.
    """
    tokens, indices = mandatory_part(counted.messages, counted.per_message)
    required = tokens + counted.fixed_tokens
    if strategy is Strategy.TRUNCATE:
        users = [i for i, m in enumerate(counted.messages) if m.role is Role.USER]
        if users and not counted.messages[users[-1]].pinned:
            i = users[-1]
            required -= counted.per_message[i] - count(replace(counted.messages[i], content="x"))
    return required, indices


# --- the reservation plan --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """One Reserve: `amount` wanted, at least `floor`; and how a grant splits.

    `send` is the most the reply may take (max_output, less where the window is short): the
    prompt is fitted to the window less `send`. `hold` is what the Reserve holds for it:
    `send`, or a predicted hold below it (`with_hold`). A grant of `amount` leaves the prompt
    the same room either way; a prediction only holds less for the reply."""

    prompt_tokens: int
    mandatory_tokens: int
    window_tokens: int
    max_output: int
    min_output: int
    amount: int
    floor: int
    send: int
    hold: int

    def split(self, granted: int) -> tuple[int, int]:
        """(prompt budget, output reserve) for a grant: the output keeps its hold while the
        mandatory part allows, and gives way down to min_output only when it does not. The
        budget never exceeds the window less `send`: a full grant leaves exactly the prompt
        planned (at most that), and a smaller one less."""
        output = min(self.hold, max(granted - self.mandatory_tokens, self.min_output))
        return granted - output, output

    def with_hold(self, hold: int) -> Plan:
        """The plan holding `hold` output tokens (at most `send`) instead of `send`; the floor
        asks no more output than that either."""
        held = min(hold, self.send)
        least = min(self.min_output, held)
        amount = self.amount - self.hold + held
        return replace(self, hold=held, min_output=least, amount=amount,
                       floor=self.mandatory_tokens + least)  # fmt: skip

    def bound_by(self, granted: int) -> str:
        """What limits a fit of `granted`: "BUDGET" when the ledger granted less than the plan
        asked for, else the model's "WINDOW"."""
        return "BUDGET" if granted < self.amount else "WINDOW"

    def limited_by(self, granted: int, budget: int, output: int) -> str:
        """NONE when the whole prompt and the full output fit, else what bound the fit."""
        whole_output = output == self.hold and self.send == self.max_output
        if budget >= self.prompt_tokens and whole_output:
            return "NONE"
        return self.bound_by(granted)


class WindowTooSmall(Exception):
    """The mandatory part plus min_output exceeds the window: nothing is worth reserving."""

    def __init__(
        self, required: int, window: int, mandatory: int = 0, indices: Sequence[int] = ()
    ) -> None:
        self.required = required
        self.window = window
        self.mandatory = mandatory
        self.indices = tuple(indices)
        super().__init__(f"{required} > {window}")


def plan(prompt: int, mandatory: int, window: int, max_output: int, min_output: int) -> Plan:
    if mandatory + min_output > window:
        raise WindowTooSmall(mandatory + min_output, window)
    output = min(max_output, window - mandatory)
    amount = min(prompt, window - output) + output
    return Plan(prompt, mandatory, window, max_output, min_output, amount,
                mandatory + min_output, output, output)  # fmt: skip


# --- the phases ------------------------------------------------------------------------------


def plan_request(counter: TokenCounter, p: Prepare) -> tuple[Counted, Plan]:
    """Count the conversation and plan its Reserve (WindowTooSmall: do not reserve at all)."""
    counted = count_conversation(counter, p.target, p.messages, p.tools, p.render)
    count = message_count(counter, p.target, counted)
    mandatory, indices = mandatory_tokens(counted, p.strategy, count)
    try:
        plan_ = plan(counted.prompt_tokens, mandatory, p.target.window_tokens, p.max_output,
                     p.min_output)  # fmt: skip
    except WindowTooSmall as exc:
        raise WindowTooSmall(exc.required, exc.window, mandatory, indices) from None
    return counted, plan_


def fit_budget(
    counter: TokenCounter,
    p: Prepare,
    counted: Counted,
    budget: int,
    summary_job: Callable[[SummaryRequest, TextCount], Job] | None = None,
) -> FitResult | tuple[PendingFit, Job]:
    """The conversation fitted to `budget` (DoesNotFit if its mandatory part cannot be).

    Without `summary_job`, SUMMARIZE uses the built-in summarizer and the fit is complete. With
    it, a fit that needs a summary stops there and returns what `summary_job` makes of the span
    (counted here, off the event loop) for a summarizer that does I/O; `finish_summary` ends it.
    """
    count = message_count(counter, p.target, counted)
    request = FitRequest(
        p.messages, budget, p.strategy, p.policy, counted.fixed_tokens, p.start_on_user
    )
    if summary_job is None:
        return fit(request, count)
    step = fit_until_summary(request, count)
    if isinstance(step, FitResult):
        return step
    return step, summary_job(step.summary, summary_text_count(count, summary_role(request)))


def finish_summary(
    counter: TokenCounter, p: Prepare, counted: Counted, pending: PendingFit, text: str | None
) -> FitResult:
    """The fit ended with `text` as its summary, or the built-in summary when `text` is None."""
    count = message_count(counter, p.target, counted)
    if text is None:
        span = pending.summary
        text = ExtractiveSummarizer().summarize(
            span.messages,
            span.max_tokens,
            summary_text_count(count, summary_role(pending.request)),
            query=span.query,
        )
    return finish_fit(pending, text, count)


def summary_counter(counter: TokenCounter, target: Target) -> TextCount:
    """Tokens of a summary message with a given text, for the model of `target`."""
    return summary_text_count(counter.message_counter(target.count_target))


# --- memory ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """The request with its memory message (if any fact fit) at `index` (-1: none)."""

    prepare: Prepare
    counted: Counted
    plan: Plan
    selection: MemorySelection
    index: int

    @property
    def tokens(self) -> int:
        """The memory message's tokens as the whole chat was counted (exact where it is)."""
        return self.counted.per_message[self.index] if self.index >= 0 else 0


def memory_room(p: Prepare, mandatory: int) -> int:
    """Tokens the memory message may take: its share of the window less the output, and never
    more than the window leaves beside the mandatory part and the full output."""
    free = p.target.window_tokens - p.max_output
    return max(0, min(int(p.memory_share * free), free - mandatory))


def plan_with_memory(counter: TokenCounter, p: Prepare, facts: Sequence[Fact]) -> MemoryPlan:
    """Count and plan the request as sent, choose the facts that fit the memory's room (the
    most recently set first), then count and plan again with their message inserted after the
    leading system messages. Memory never displaces system, pinned or input messages: if the
    inserted message (counted with the whole chat) would make the mandatory part too large for
    the window, the request goes without it and every fact is reported left out."""
    counted, plan_ = plan_request(counter, p)
    left_out = MemorySelection(None, (), tuple(f.key for f in facts), 0)
    none = MemoryPlan(p, counted, plan_, left_out, -1)
    if not facts:
        return none
    count = counter.message_counter(p.target.count_target)
    selection = select(facts, memory_room(p, plan_.mandatory_tokens), count)
    if selection.message is None:
        return none
    index = insert_at(p.messages)
    messages = [*p.messages[:index], selection.message, *p.messages[index:]]
    with_memory = replace(p, messages=messages)
    try:
        counted_m, plan_m = plan_request(counter, with_memory)
    except WindowTooSmall:
        return none
    if plan_m.mandatory_tokens + p.max_output > p.target.window_tokens:
        return none
    return MemoryPlan(with_memory, counted_m, plan_m, selection, index)
