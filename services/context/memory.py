"""Memory per conversation, the pure part: the bounds of a fact, the checks of SetMemory,
ListMemory and DeleteMemory requests, the one system message the facts are rendered as, and
which facts fit the memory's share (the most recently set first). The table is in
memory_store.py; PrepareContext's use of both in service.py and planning.py."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ledger import limits
from ledger.validation import ID_PATTERN, Checker
from services._gen.tokenledger.v1 import context_pb2 as cpb
from services.context.messages import ChatMessage, Role
from services.platform.errors import InvalidRequest

# --- limits ------------------------------------------------------------------------------------

memory_facts_count_max = 64
"""Facts one conversation may hold (and one SetMemory may set)."""
memory_key_chars_max = 64
memory_value_bytes_max = 1024
"""Bytes per fact value (UTF-8); the table checks it too."""
memory_share_default = 0.1
"""Share of the window less the output the memory message may take when the request names none."""
retention_markers_count_max = 64
retention_marker_chars_max = 256
source_index_max = 1_999
"""A message index of a conversation (PrepareContext takes at most 2,000 messages)."""

MEMORY_NAME = "memory"
"""The memory message's participant name, as the summary's is "summary"."""
MEMORY_HEADER = "Key facts of this conversation (newest first):"
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # C0 but tab, DEL, C1


@dataclass(frozen=True, slots=True)
class Fact:
    """One fact: `set_at_ms` is when it was last set (Unix ms), -1 `source_index`: none."""

    key: str
    value: str
    source_index: int = -1
    set_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Conversation:
    tenant_id: str
    user_id: str
    conversation_id: str


def _conversation(c: Checker, tenant_id: str, user_id: str, conversation_id: str) -> Conversation:
    for name, value in (("tenant_id", tenant_id), ("user_id", user_id),
                        ("conversation_id", conversation_id)):  # fmt: skip
        c.text(name, value, chars_max=limits.id_chars_max, pattern=ID_PATTERN)
    return Conversation(tenant_id, user_id, conversation_id)


def _raise(c: Checker) -> None:
    if c.violations:
        violations = [(v.field, v.description) for v in c.violations]
        text = "; ".join(f"{f} {d}" for f, d in violations)
        raise InvalidRequest(f"invalid memory request: {text}", violations=violations)


def value_problem(value: str) -> str:
    """What is wrong with a fact's value, or "" if nothing."""
    size = len(value.encode())
    if not value.strip():
        return "is required (not only spaces)"
    if size > memory_value_bytes_max:
        return f"is {size} bytes; at most {memory_value_bytes_max} allowed"
    if _CONTROL.search(value):
        return "must not contain control characters other than tab"
    return ""


def check_key(c: Checker, field: str, key: str) -> None:
    c.text(field, key, chars_max=memory_key_chars_max, pattern=KEY_PATTERN)


def _fact(c: Checker, i: int, f: cpb.MemoryFact, prefix: str = "facts") -> Fact:
    at = f"{prefix}[{i}]"
    check_key(c, f"{at}.key", f.key)
    problem = value_problem(f.value)
    if problem:
        c.fail(f"{at}.value", problem)
    if not -1 <= f.source_index <= source_index_max:
        c.fail(f"{at}.source_index", f"is {f.source_index}; must be -1 (none) or "
               f"between 0 and {source_index_max}")  # fmt: skip
    return Fact(f.key, f.value, f.source_index)


def key_information(c: Checker, messages: Sequence[cpb.ChatMessage], use: bool) -> list[Fact]:
    """The facts the messages state (a later message's value for a key wins), each with its
    message's index; at most `memory_facts_count_max` in one request."""
    facts: dict[str, Fact] = {}
    seen = 0
    for i, m in enumerate(messages):
        for j, f in enumerate(m.key_information):
            seen += 1
            if seen > memory_facts_count_max:
                c.fail(f"messages[{i}].key_information", f"more than {memory_facts_count_max} "
                       "facts in one request")  # fmt: skip
                return []
            fact = _fact(c, j, f, prefix=f"messages[{i}].key_information")
            facts.pop(fact.key, None)
            facts[fact.key] = Fact(fact.key, fact.value, i)
    if facts and not use:
        c.fail("use_memory", "must be set when messages carry key_information")
    return list(facts.values())


def parse_set(r: cpb.SetMemoryRequest) -> tuple[Conversation, list[Fact]]:
    c = Checker()
    conversation = _conversation(c, r.tenant_id, r.user_id, r.conversation_id)
    if not 1 <= len(r.facts) <= memory_facts_count_max:
        c.fail("facts", f"has {len(r.facts)}; must have 1 to {memory_facts_count_max}")
    facts = [_fact(c, i, f) for i, f in enumerate(r.facts[:memory_facts_count_max])]
    seen: set[str] = set()
    for i, f in enumerate(facts):
        if f.key in seen:
            c.fail(f"facts[{i}].key", f"{f.key!r} is set twice in one request")
        seen.add(f.key)
    _raise(c)
    return conversation, facts


def parse_list(r: cpb.ListMemoryRequest) -> Conversation:
    c = Checker()
    conversation = _conversation(c, r.tenant_id, r.user_id, r.conversation_id)
    _raise(c)
    return conversation


def parse_delete(r: cpb.DeleteMemoryRequest) -> tuple[Conversation, list[str]]:
    c = Checker()
    conversation = _conversation(c, r.tenant_id, r.user_id, r.conversation_id)
    if len(r.keys) > memory_facts_count_max:
        c.fail("keys", f"has {len(r.keys)}; at most {memory_facts_count_max} allowed")
    for i, key in enumerate(r.keys[:memory_facts_count_max]):
        check_key(c, f"keys[{i}]", key)
    _raise(c)
    return conversation, list(dict.fromkeys(r.keys))


def pb_facts(facts: Sequence[Fact]) -> list[cpb.MemoryFact]:
    return [cpb.MemoryFact(key=f.key, value=f.value, source_index=f.source_index,
                           set_at_unix_ms=f.set_at_ms) for f in facts]  # fmt: skip


# --- the memory message --------------------------------------------------------------------------


def render(facts: Sequence[Fact]) -> ChatMessage:
    """The facts as one system message, in the order given (the most recently set first)."""
    lines = [MEMORY_HEADER, *(f"- {f.key}: {f.value}" for f in facts)]
    return ChatMessage(Role.SYSTEM, "\n".join(lines), name=MEMORY_NAME, pinned=True)


@dataclass(frozen=True, slots=True)
class MemorySelection:
    """The memory message (None when no fact fits), its facts' keys and those left out."""

    message: ChatMessage | None
    kept: tuple[str, ...]
    left_out: tuple[str, ...]
    tokens: int


def select(
    facts: Sequence[Fact], room_tokens: int, count: Callable[[ChatMessage], int]
) -> MemorySelection:
    """The most recently set facts first, each kept if the message with it still fits
    `room_tokens` (counted exactly, as the message is sent); a fact that does not fit is left
    out and the next, older one is tried (it may be shorter)."""
    kept: list[Fact] = []
    left_out: list[str] = []
    tokens = 0
    for fact in sorted(facts, key=lambda f: (-f.set_at_ms, f.key)):
        trial = count(render([*kept, fact]))
        if trial <= room_tokens:
            kept.append(fact)
            tokens = trial
        else:
            left_out.append(fact.key)
    if not kept:
        return MemorySelection(None, (), tuple(left_out), 0)
    return MemorySelection(render(kept), tuple(f.key for f in kept), tuple(left_out), tokens)


def insert_at(messages: Sequence[ChatMessage]) -> int:
    """Where the memory message goes: after the leading system and developer messages."""
    for i, m in enumerate(messages):
        if m.role not in (Role.SYSTEM, Role.DEVELOPER):
            return i
    return len(messages)


# --- the response ----------------------------------------------------------------------------


def _shift(indices: Sequence[int], at: int) -> list[int]:
    return [i - 1 if i > at else i for i in indices]


def apply_memory(
    response: cpb.PrepareContextResponse, selection: MemorySelection, index: int, tokens: int
) -> None:
    """Map a response fitted with the memory message at `index` back to the caller's request:
    that message's source index is -2, later indices shift down by one; its tokens move from
    `breakdown.system` to `breakdown.memory`."""
    response.memory_left_out.extend(selection.left_out)
    if index < 0:
        return
    sources = [-2 if s == index else (s - 1 if s > index else s) for s in response.source_indices]
    del response.source_indices[:]
    response.source_indices.extend(sources)
    for field in (response.dropped_indices, response.summarized_indices,
                  response.truncated_indices):  # fmt: skip
        shifted = _shift(field, index)
        del field[:]
        field.extend(shifted)
    response.breakdown.system -= tokens
    response.breakdown.memory = tokens
    response.memory_keys.extend(selection.kept)


def _text(messages: Sequence[cpb.ChatMessage]) -> str:
    parts: list[str] = []
    for m in messages:
        parts.append(m.content)
        parts.extend(c.arguments_json for c in m.tool_calls)
    return "\n".join(parts)


def retention(
    facts: Sequence[Fact],
    markers: Sequence[str],
    original: Sequence[cpb.ChatMessage],
    fitted: Sequence[cpb.ChatMessage],
) -> cpb.Retention:
    """The guide's information retention ratio: facts present in the fitted prompt over facts
    in the original. A memory fact is in the original by being in memory, and kept when its
    value is in the fitted prompt (the memory message or a kept turn); a marker counts when the
    request's messages contain it, and is kept when the fitted ones still do."""
    report = cpb.Retention()
    if not (facts or markers):  # nothing to look for: the texts are not built
        report.ratio = 1.0
        return report
    before, after = _text(original) if markers else "", _text(fitted)
    total = kept = 0
    for f in facts:
        total += 1
        if f.value in after:
            kept += 1
        else:
            report.lost.append(f.key)
    for marker in markers:
        if marker not in before:
            report.markers_not_in_original.append(marker)
            continue
        total += 1
        if marker in after:
            kept += 1
        else:
            report.lost.append(marker)
    report.facts_total, report.facts_kept = total, kept
    report.ratio = kept / total if total else 1.0
    return report
