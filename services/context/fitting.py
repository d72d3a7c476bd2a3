"""Fitting a conversation into the prompt's token budget: sliding window, priority pruning,
middle-out truncation and summarization of what falls out.

Pure and deterministic: no I/O and no tokenizer. The caller passes `count`, the tokens of one
message as sent (chat overhead included), and the budget left for the prompt after the output
reservation. Hard rules, whatever the strategy:

- system/developer messages, pinned messages and the input (the latest user message) are never
  dropped; if they alone (plus `fixed_tokens`) exceed the budget, `DoesNotFit` says by how much;
- an assistant message with tool calls and the tool messages answering them are one unit, kept
  or dropped together; kept messages keep their order;
- once anything is dropped, the first message after the system messages is a user message
  (`start_on_user`, the default), as several provider APIs require: the droppable units before
  the first kept user message go too (under SUMMARIZE into the summary, which then speaks as
  the user);
- the result never exceeds the budget, and a conversation that already fits comes back unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from services.context.messages import ChatMessage, Role
from services.context.relevance import Bm25, normalised, terms
from services.context.summarizer import ExtractiveSummarizer, Summarizer, TextCount

__all__ = [
    "SUMMARY_NAME",
    "SUMMARY_ROLE",
    "AllocationPolicy",
    "Breakdown",
    "Count",
    "DoesNotFit",
    "FitRequest",
    "FitResult",
    "PendingFit",
    "Strategy",
    "Summarizer",
    "SummaryRequest",
    "finish_fit",
    "fit",
    "fit_until_summary",
    "mandatory_part",
    "summary_role",
    "summary_text_count",
]

Count = Callable[[ChatMessage], int]  # tokens of one message incl. chat overhead (caller-cached)

# The summary speaks as the assistant, not the system: it quotes user and tool text, and putting
# that in a system message would give untrusted content system authority (prompt injection);
# several chat APIs also accept system messages only at the very start.
SUMMARY_ROLE = Role.ASSISTANT
SUMMARY_NAME = "summary"

# PRIORITY's soft score (explicit `priority` dominates it). Relevance leads so that an old message
# about what the user asks now outranks newer small talk; recency breaks the rest.
RELEVANCE_WEIGHT = 0.5
RECENCY_WEIGHT = 0.3
ROLE_WEIGHT = 0.2
ROLE_VALUE = {
    Role.SYSTEM: 1.0,
    Role.DEVELOPER: 1.0,
    Role.USER: 1.0,
    Role.ASSISTANT: 1.0,
    Role.TOOL: 0.5,  # tool chatter is bulky and usually re-derivable
}

SHARES_SUM_TOLERANCE = 1e-9  # 0.1 + 0.2 + 0.3 + 0.4 is 1.0000000000000002 in floating point

_SYSTEM_ROLES = frozenset({Role.SYSTEM, Role.DEVELOPER})


class Strategy(StrEnum):
    WINDOW = "window"
    PRIORITY = "priority"
    TRUNCATE = "truncate"
    SUMMARIZE = "summarize"


@dataclass(frozen=True, slots=True)
class AllocationPolicy:
    """Shares of the prompt budget (configuration). Each is in [0, 1] and they sum to at most 1.

    `history_share` and `input_share` cap one message's tokens under TRUNCATE; `reserve_share`
    is the room set aside for the summary under SUMMARIZE. System messages are never cut or
    dropped, so `system_share` is advisory: `FitResult.over_share` reports when it is exceeded.
    """

    system_share: float = 0.2
    history_share: float = 0.5
    input_share: float = 0.2
    reserve_share: float = 0.1

    def __post_init__(self) -> None:
        for name in ("system_share", "history_share", "input_share", "reserve_share"):
            value = getattr(self, name)
            # `not 0 <= value <= 1` is also true for NaN.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}: must be a number in [0, 1], got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value!r}")
        total = self.system_share + self.history_share + self.input_share + self.reserve_share
        if total > 1.0 + SHARES_SUM_TOLERANCE:
            raise ValueError(
                "system_share + history_share + input_share + reserve_share must be at most 1, "
                f"got {total:g}"
            )

    @staticmethod
    def tokens(share: float, budget_tokens: int) -> int:
        """The whole tokens a share of the budget allows (rounded down, so never over)."""
        return math.floor(share * budget_tokens)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer number of tokens, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class FitRequest:
    """What to fit: the conversation, the prompt budget and how to make room."""

    messages: Sequence[ChatMessage]
    budget_tokens: int  # for the prompt: min(context window, granted) - max output tokens
    strategy: Strategy = Strategy.WINDOW
    policy: AllocationPolicy = field(default_factory=AllocationPolicy)
    fixed_tokens: int = 0  # tool definitions, reply priming: counted by the caller, never cut
    start_on_user: bool = True  # once history is dropped, it resumes on a user message

    def __post_init__(self) -> None:
        if isinstance(self.messages, str | bytes) or not isinstance(self.messages, Sequence):
            raise ValueError("messages: must be a sequence of ChatMessage")
        # Frozen: a tuple so that the request cannot change under the fit.
        object.__setattr__(self, "messages", tuple(self.messages))
        if not self.messages:
            raise ValueError("messages: must not be empty")
        for i, message in enumerate(self.messages):
            if not isinstance(message, ChatMessage):
                raise ValueError(f"messages[{i}]: must be a ChatMessage, got {message!r}")
        _check_count("budget_tokens", self.budget_tokens)
        _check_count("fixed_tokens", self.fixed_tokens)
        if not isinstance(self.strategy, Strategy):
            raise ValueError(f"strategy: must be a Strategy, got {self.strategy!r}")
        if not isinstance(self.policy, AllocationPolicy):
            raise ValueError(f"policy: must be an AllocationPolicy, got {self.policy!r}")


@dataclass(frozen=True, slots=True)
class Breakdown:
    """Tokens of the result by kind; `total` equals `FitResult.tokens`."""

    system: int = 0  # system and developer messages
    pinned: int = 0  # pinned messages that are not system
    history: int = 0  # everything else that is not below
    tool_results: int = 0  # TOOL messages
    input: int = 0  # the latest user message
    summary: int = 0  # the summary message (SUMMARIZE)
    fixed: int = 0  # FitRequest.fixed_tokens

    @property
    def total(self) -> int:
        return (
            self.system
            + self.pinned
            + self.history
            + self.tool_results
            + self.input
            + self.summary
            + self.fixed
        )


@dataclass(frozen=True, slots=True)
class FitResult:
    """The fitted conversation. Every input index is in exactly one of: `sources` (kept, maybe
    truncated), `summarized` (replaced by the summary) or `dropped` (gone without trace)."""

    messages: tuple[ChatMessage, ...]
    sources: tuple[int | None, ...]  # input index of each output message; None for the summary
    tokens: int  # sum of count(m) over `messages` plus fixed_tokens; <= budget_tokens
    original_tokens: int  # the same for the input conversation
    strategy: Strategy
    dropped: tuple[int, ...]
    truncated: tuple[int, ...]
    summarized: tuple[int, ...]
    summary_tokens: int
    breakdown: Breakdown
    over_share: tuple[str, ...]  # "system", "history", "input": over their policy share
    fitted: bool  # False: the input fit and comes back unchanged

    @property
    def tokens_saved(self) -> int:
        return self.original_tokens - self.tokens


class DoesNotFit(Exception):
    """The messages that may not be dropped need more tokens than the budget has."""

    reason = "CONTEXT_DOES_NOT_FIT"

    def __init__(
        self, required_tokens: int, budget_tokens: int, fixed_tokens: int, kept: Sequence[int]
    ) -> None:
        self.required_tokens = required_tokens
        self.budget_tokens = budget_tokens
        self.fixed_tokens = fixed_tokens
        self.shortfall_tokens = required_tokens - budget_tokens
        self.mandatory_indices = tuple(kept)  # what could not be dropped
        super().__init__(
            f"system, pinned and input messages (indices {list(self.mandatory_indices)}, with "
            f"their tool calls and results) plus {fixed_tokens} fixed tokens need "
            f"{required_tokens} tokens but only {budget_tokens} are available "
            f"(short by {self.shortfall_tokens}); raise the budget, lower max_output_tokens, "
            "or shorten or unpin messages"
        )

    def metadata(self) -> dict[str, str]:
        """Machine-readable facts for an ErrorInfo."""
        return {
            "required_tokens": str(self.required_tokens),
            "budget_tokens": str(self.budget_tokens),
            "shortfall_tokens": str(self.shortfall_tokens),
        }


# --- the conversation as units ---------------------------------------------------------------


def _units(messages: Sequence[ChatMessage]) -> list[tuple[int, ...]]:
    """Messages grouped into units (a tool call with its results), ordered by first message."""
    units: list[list[int]] = []
    unit_of_call: dict[str, int] = {}
    for i, message in enumerate(messages):
        if message.role is Role.TOOL and message.tool_call_id in unit_of_call:
            units[unit_of_call[message.tool_call_id]].append(i)
            continue
        if message.role is Role.ASSISTANT:
            for call_id in message.tool_call_ids:
                # The first claim wins: a reused call id must not move results between units.
                unit_of_call.setdefault(call_id, len(units))
        units.append([i])
    return [tuple(u) for u in units]


def _input_index(messages: Sequence[ChatMessage]) -> int | None:
    return next((i for i in reversed(range(len(messages))) if messages[i].role is Role.USER), None)


@dataclass(slots=True)
class _Conversation:
    messages: list[ChatMessage]  # current versions: truncation replaces entries
    costs: list[int]
    units: list[tuple[int, ...]]
    mandatory: list[bool]  # per unit
    input_index: int | None

    def unit_cost(self, unit: int) -> int:
        return sum(self.costs[i] for i in self.units[unit])

    def mandatory_cost(self) -> int:
        return sum(self.unit_cost(u) for u, m in enumerate(self.mandatory) if m)

    def mandatory_indices(self) -> list[int]:
        return sorted(i for u, m in enumerate(self.mandatory) if m for i in self.units[u])

    def candidates(self) -> list[int]:
        """Units that may be dropped, oldest first."""
        return [u for u, m in enumerate(self.mandatory) if not m]

    def all_units(self) -> set[int]:
        return set(range(len(self.units)))


def _is_mandatory(message: ChatMessage, index: int, input_index: int | None) -> bool:
    return message.role in _SYSTEM_ROLES or message.pinned or index == input_index


def _conversation(messages: Sequence[ChatMessage], count: Count) -> _Conversation:
    costs = [count(m) for m in messages]
    for i, cost in enumerate(costs):
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError(f"count(messages[{i}]) returned {cost!r}; expected an int >= 0")
    units = _units(messages)
    input_index = _input_index(messages)
    mandatory = [any(_is_mandatory(messages[i], i, input_index) for i in u) for u in units]
    return _Conversation(list(messages), costs, units, mandatory, input_index)


def mandatory_part(
    messages: Sequence[ChatMessage], costs: Sequence[int]
) -> tuple[int, tuple[int, ...]]:
    """Tokens and indices of what no strategy drops: system, pinned and input messages, with
    the tool calls and results they belong to (what `fit` raises DoesNotFit over)."""
    input_index = _input_index(messages)
    indices = sorted(
        i
        for unit in _units(messages)
        if any(_is_mandatory(messages[j], j, input_index) for j in unit)
        for i in unit
    )
    return sum(costs[i] for i in indices), tuple(indices)


def _require_mandatory(conv: _Conversation, request: FitRequest) -> int:
    """The room left for droppable units; DoesNotFit when there is none for the mandatory."""
    required = conv.mandatory_cost() + request.fixed_tokens
    if required > request.budget_tokens:
        raise DoesNotFit(
            required, request.budget_tokens, request.fixed_tokens, conv.mandatory_indices()
        )
    return request.budget_tokens - required


# --- strategies: each picks the droppable units to keep --------------------------------------


def _window(conv: _Conversation, room: int) -> set[int]:
    """The newest droppable units that fit, stopping at the first that does not (a suffix)."""
    kept: set[int] = set()
    for unit in reversed(conv.candidates()):
        cost = conv.unit_cost(unit)
        if cost > room:
            break
        kept.add(unit)
        room -= cost
    return kept


def _start_on_user(conv: _Conversation, kept: set[int]) -> set[int]:
    """`kept` less the droppable units that come before the first kept user message (after the
    system messages). A mandatory non-user unit there (pinned) cannot be helped: it stays."""
    kept = set(kept)
    for unit in range(len(conv.units)):
        if not conv.mandatory[unit] and unit not in kept:
            continue
        first = conv.messages[conv.units[unit][0]]
        if first.role in _SYSTEM_ROLES:
            continue
        if first.role is Role.USER or conv.mandatory[unit]:
            break
        kept.discard(unit)
    return kept


def _priority_keys(conv: _Conversation, candidates: list[int]) -> dict[int, tuple[int, float, int]]:
    """(explicit priority, soft score, position) per unit: compared in that order."""
    query = terms(conv.messages[conv.input_index].content) if conv.input_index is not None else []
    documents = [
        terms(" ".join(conv.messages[i].content for i in conv.units[u])) for u in candidates
    ]
    relevance = normalised(Bm25(documents).scores(query)) if query else [0.0] * len(candidates)
    keys: dict[int, tuple[int, float, int]] = {}
    for k, unit in enumerate(candidates):
        members = [conv.messages[i] for i in conv.units[unit]]
        role = sum(ROLE_VALUE[m.role] for m in members) / len(members)
        recency = (unit + 1) / len(conv.units)
        soft = RELEVANCE_WEIGHT * relevance[k] + RECENCY_WEIGHT * recency + ROLE_WEIGHT * role
        keys[unit] = (max(m.priority for m in members), soft, unit)
    return keys


def _priority(conv: _Conversation, room: int) -> set[int]:
    """Greedy by score: the best-scored units that fit; a unit too big is skipped, not a stop."""
    candidates = conv.candidates()
    keys = _priority_keys(conv, candidates)
    kept: set[int] = set()
    # The unit's position is the last key, so equal scores keep the newer unit first.
    for unit in sorted(candidates, key=keys.__getitem__, reverse=True):
        cost = conv.unit_cost(unit)
        if cost <= room:
            kept.add(unit)
            room -= cost
    return kept


def _cut_middle(text: str, kept_chars: int) -> str:
    tail = kept_chars // 2
    head = text[: kept_chars - tail]
    return f"{head}\n[… {len(text) - kept_chars} characters removed …]\n{text[len(text) - tail :]}"


def _largest(upper: int, fits: Callable[[int], bool]) -> int | None:
    """The largest k in [0, upper] with fits(k), by binary search; None if not even fits(0).

    Token counts grow only roughly with characters, so the answer may not be the true maximum,
    but it always satisfies fits(k): that is what the budget needs.
    """
    if upper < 0 or not fits(0):
        return None
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _shrink(conv: _Conversation, index: int, limit: int, count: Count) -> bool:
    """Cut message `index` middle-out to at most `limit` tokens; False if it cannot get there."""
    original = conv.messages[index]
    counted: dict[int, tuple[ChatMessage, int]] = {}

    def fits(kept_chars: int) -> bool:
        cut = replace(original, content=_cut_middle(original.content, kept_chars))
        counted[kept_chars] = (cut, count(cut))
        return counted[kept_chars][1] <= limit

    best = _largest(len(original.content) - 1, fits)
    if best is None:
        return False
    conv.messages[index], conv.costs[index] = counted[best]
    return True


def _cut_input(conv: _Conversation, request: FitRequest, count: Count) -> int | None:
    """Cut the input to its share, then further while the mandatory part exceeds the budget.

    Returns the input's index if it was cut.
    """
    i = conv.input_index
    if i is None or conv.messages[i].pinned:
        return None
    cut = False
    cap = request.policy.tokens(request.policy.input_share, request.budget_tokens)
    if conv.costs[i] > cap:
        cut = _shrink(conv, i, cap, count)
    over = conv.mandatory_cost() + request.fixed_tokens - request.budget_tokens
    if over > 0:
        cut = _shrink(conv, i, conv.costs[i] - over, count) or cut
    return i if cut else None


def _truncate(conv: _Conversation, request: FitRequest, count: Count) -> set[int]:
    """Cut oversized history and input messages to their policy share; returns their indices.

    System, developer and pinned messages are never cut.
    """
    cap = request.policy.tokens(request.policy.history_share, request.budget_tokens)
    cut = {
        i
        for unit in conv.candidates()
        for i in conv.units[unit]
        if conv.costs[i] > cap and _shrink(conv, i, cap, count)
    }
    input_cut = _cut_input(conv, request, count)
    return cut if input_cut is None else cut | {input_cut}


# --- summarizing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Summary:
    message: ChatMessage
    tokens: int
    sources: tuple[int, ...]  # the dropped indices it stands for; placed at the first one


def _summary_message(text: str, role: Role = SUMMARY_ROLE) -> ChatMessage:
    return ChatMessage(role=role, content=text, name=SUMMARY_NAME)


def _cut_tail(text: str, limit: int, count_text: Callable[[str], int]) -> str:
    """`text` if it fits, else its longest fitting head with an ellipsis; "" if none does."""
    if count_text(text) <= limit:
        return text
    best = _largest(len(text) - 1, lambda k: count_text(text[:k].rstrip() + " …") <= limit)
    return text[:best].rstrip() + " …" if best else ""


def summary_text_count(count: Count, role: Role = SUMMARY_ROLE) -> TextCount:
    """The count a summarizer gets: of the whole summary message, overhead included."""

    def count_text(text: str) -> int:
        return count(_summary_message(text, role))

    return count_text


def summary_role(request: FitRequest) -> Role:
    """The summary opens the kept history when it must start on a user turn: then it speaks
    as the user (user text carries no authority a summary could abuse), else as the assistant."""
    return Role.USER if request.start_on_user else SUMMARY_ROLE


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    """What SUMMARIZE needs summarized: the dropped span, the room for the summary message
    (overhead included) and the latest user message, for summarizers that favour it."""

    messages: tuple[ChatMessage, ...]
    max_tokens: int
    query: str


@dataclass(frozen=True, slots=True, eq=False)
class PendingFit:
    """A SUMMARIZE fit stopped where its summary is needed. Whoever holds it asks a summarizer
    for `summary` (the built-in one, or an endpoint on the event loop), then calls `finish_fit`
    with the text: fitting itself never waits on I/O."""

    summary: SummaryRequest
    conversation: _Conversation
    request: FitRequest
    kept: frozenset[int]  # droppable units the window keeps
    dropped: tuple[int, ...]  # the indices the summary stands for
    original_tokens: int


def _start_summary(
    conv: _Conversation, request: FitRequest, original: int
) -> FitResult | PendingFit:
    """WINDOW with room set aside, the dropped units to be replaced by one summary message.

    The room is reserve_share of the budget (or what is left after the mandatory part), so more
    history is dropped than WINDOW would to make the summary fit; whatever the window leaves
    unused is given to the summary too. Nothing dropped, or no room: no summary is asked for.
    """
    room = _require_mandatory(conv, request)
    reserve = min(request.policy.tokens(request.policy.reserve_share, request.budget_tokens), room)
    kept = _window(conv, room - reserve)
    if request.start_on_user and len(kept) < len(conv.candidates()):
        kept = _start_on_user(conv, kept)
    dropped = sorted(i for u in conv.candidates() if u not in kept for i in conv.units[u])
    left = room - sum(conv.unit_cost(u) for u in kept)
    if not dropped or left <= 0:
        return _result(conv, request, kept, set(), None, original)
    query = conv.messages[conv.input_index].content if conv.input_index is not None else ""
    span = SummaryRequest(tuple(conv.messages[i] for i in dropped), left, query)
    return PendingFit(span, conv, request, frozenset(kept), tuple(dropped), original)


def finish_fit(pending: PendingFit, text: str, count: Count) -> FitResult:
    """The fit with `text` as its summary: cut to the room if it is longer (a remote summarizer
    may ignore the limit, so it is not trusted), left out if nothing fits or `text` is empty."""
    role = summary_role(pending.request)
    text = _cut_tail(text, pending.summary.max_tokens, summary_text_count(count, role))
    summary = None
    if text:
        message = _summary_message(text, role)
        summary = _Summary(message, count(message), pending.dropped)
    conv, request = pending.conversation, pending.request
    return _result(conv, request, set(pending.kept), set(), summary, pending.original_tokens)


# --- the result ------------------------------------------------------------------------------


def _kind(message: ChatMessage, index: int, input_index: int | None) -> str:
    if message.role in _SYSTEM_ROLES:
        return "system"
    if message.pinned:
        return "pinned"
    if index == input_index:
        return "input"
    return "tool_results" if message.role is Role.TOOL else "history"


def _breakdown(conv: _Conversation, kept: list[int], summary_tokens: int, fixed: int) -> Breakdown:
    totals = dict.fromkeys(("system", "pinned", "history", "tool_results", "input"), 0)
    for i in kept:
        totals[_kind(conv.messages[i], i, conv.input_index)] += conv.costs[i]
    return Breakdown(**totals, summary=summary_tokens, fixed=fixed)


def _over_share(breakdown: Breakdown, policy: AllocationPolicy, budget: int) -> tuple[str, ...]:
    shares = {
        "system": (breakdown.system, policy.system_share),
        "history": (breakdown.history + breakdown.tool_results, policy.history_share),
        "input": (breakdown.input, policy.input_share),
    }
    return tuple(k for k, (used, share) in shares.items() if used > policy.tokens(share, budget))


def _result(
    conv: _Conversation,
    request: FitRequest,
    kept_units: set[int],
    truncated: set[int],
    summary: _Summary | None,
    original_tokens: int,
) -> FitResult:
    kept_units = kept_units | {u for u, m in enumerate(conv.mandatory) if m}
    kept = sorted(i for u in kept_units for i in conv.units[u])
    entries: list[tuple[int, int | None, ChatMessage]] = [(i, i, conv.messages[i]) for i in kept]
    if summary is not None:
        entries.append((summary.sources[0], None, summary.message))
        entries.sort(key=lambda e: e[0])
    summarized = summary.sources if summary is not None else ()
    summary_tokens = summary.tokens if summary is not None else 0
    breakdown = _breakdown(conv, kept, summary_tokens, request.fixed_tokens)
    gone = set(range(len(conv.messages))) - set(kept) - set(summarized)
    return FitResult(
        messages=tuple(e[2] for e in entries),
        sources=tuple(e[1] for e in entries),
        tokens=breakdown.total,
        original_tokens=original_tokens,
        strategy=request.strategy,
        dropped=tuple(sorted(gone)),
        truncated=tuple(sorted(truncated & set(kept))),
        summarized=summarized,
        summary_tokens=summary_tokens,
        breakdown=breakdown,
        over_share=_over_share(breakdown, request.policy, request.budget_tokens),
        fitted=bool(gone or summarized or truncated & set(kept)),
    )


def fit_until_summary(request: FitRequest, count: Count) -> FitResult | PendingFit:
    """Like `fit`, but a SUMMARIZE fit that needs a summary stops there (see PendingFit)."""
    conv = _conversation(request.messages, count)
    original = sum(conv.costs) + request.fixed_tokens
    if original <= request.budget_tokens:
        return _result(conv, request, conv.all_units(), set(), None, original)
    truncated: set[int] = set()
    if request.strategy is Strategy.WINDOW:
        kept = _window(conv, _require_mandatory(conv, request))
    elif request.strategy is Strategy.PRIORITY:
        kept = _priority(conv, _require_mandatory(conv, request))
    elif request.strategy is Strategy.TRUNCATE:
        truncated = _truncate(conv, request, count)
        kept = _window(conv, _require_mandatory(conv, request))
    else:
        return _start_summary(conv, request, original)
    if request.start_on_user and len(kept) < len(conv.candidates()):
        kept = _start_on_user(conv, kept)
    return _result(conv, request, kept, truncated, None, original)


def fit(request: FitRequest, count: Count, summarizer: Summarizer | None = None) -> FitResult:
    """Fit `request.messages` into `request.budget_tokens` with `request.strategy`.

    Raises DoesNotFit when system, pinned and input messages plus fixed_tokens exceed the
    budget. Under TRUNCATE an oversized input (not pinned, not system) is first cut middle-out,
    so DoesNotFit is raised only if even that is not enough. `summarizer` is used by SUMMARIZE
    only; the default is the offline ExtractiveSummarizer.
    """
    step = fit_until_summary(request, count)
    if isinstance(step, FitResult):
        return step
    span = step.summary
    count_text = summary_text_count(count, summary_role(request))
    summarizer = summarizer or ExtractiveSummarizer()
    text = summarizer.summarize(span.messages, span.max_tokens, count_text, query=span.query)
    return finish_fit(step, text, count)
