"""Message builders and a word-counting stand-in for a tokenizer (fitting is tokenizer-agnostic)."""

from __future__ import annotations

from services.context.messages import ChatMessage, Role

OVERHEAD = 4  # per-message chat overhead of the stand-in count


def count(message: ChatMessage) -> int:
    """Tokens of a message: its words plus a fixed overhead."""
    return len(message.content.split()) + OVERHEAD


def total(messages: list[ChatMessage]) -> int:
    return sum(count(m) for m in messages)


def text(n: int, word: str = "w") -> str:
    """n distinct words: n tokens (plus overhead) under `count`."""
    return " ".join(f"{word}{i}" for i in range(n))


def system(content: str = "be helpful", *, pinned: bool = False) -> ChatMessage:
    return ChatMessage(Role.SYSTEM, content, pinned=pinned)


def user(content: str, *, pinned: bool = False, priority: int = 0) -> ChatMessage:
    return ChatMessage(Role.USER, content, pinned=pinned, priority=priority)


def assistant(content: str, *, pinned: bool = False, priority: int = 0) -> ChatMessage:
    return ChatMessage(Role.ASSISTANT, content, pinned=pinned, priority=priority)


def call(content: str, *ids: str, pinned: bool = False) -> ChatMessage:
    return ChatMessage(Role.ASSISTANT, content, pinned=pinned, tool_call_ids=ids)


def result(call_id: str, content: str, *, pinned: bool = False) -> ChatMessage:
    return ChatMessage(Role.TOOL, content, pinned=pinned, tool_call_id=call_id, name="search")
