"""Chat messages as the context service sees them, independent of the wire format."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation.

    `tool_call_ids` on an assistant message names the tool calls it makes; a TOOL message answers
    exactly one of them through `tool_call_id`. The pair must stay together when fitting.
    """

    role: Role
    content: str
    name: str = ""
    pinned: bool = False
    priority: int = 0
    tool_call_id: str = ""
    tool_call_ids: tuple[str, ...] = field(default=())
