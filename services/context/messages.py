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
class ToolCall:
    """One tool call of an assistant message; `arguments` is the parsed JSON object and
    `arguments_json` the text as the caller sent it."""

    id: str
    name: str
    arguments_json: str
    arguments: dict[str, object] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class ToolDef:
    """A tool (function) offered to the model: its name, description and JSON Schema."""

    name: str
    description: str
    parameters: dict[str, object]

    def schema(self) -> dict[str, object]:
        """The tool as OpenAI-style JSON (what chat templates receive as `tools`)."""
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation.

    `tool_call_ids` on an assistant message names the tool calls it makes (`tool_calls` carries
    them whole, when the caller gave names and arguments); a TOOL message answers exactly one of
    them through `tool_call_id`. A call and its results stay together when fitting.
    """

    role: Role
    content: str
    name: str = ""
    pinned: bool = False
    priority: int = 0
    tool_call_id: str = ""
    tool_call_ids: tuple[str, ...] = field(default=())
    tool_calls: tuple[ToolCall, ...] = field(default=())


class ServingStack(StrEnum):
    HF_TEMPLATE = "hf-template"  # the official template, as vLLM and TGI apply it by default
    OLLAMA = "ollama"


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """How the serving stack renders the chat: which stack, the date a template states
    (YYYY-MM-DD; empty: the template's own), and the resolved model name (e.g. "llama-3.1")."""

    serving_stack: ServingStack = ServingStack.HF_TEMPLATE
    date: str = ""
    model: str = ""


DEFAULT_RENDER = RenderOptions()
