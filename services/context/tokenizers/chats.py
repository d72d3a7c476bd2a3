"""Whole-chat counting engines and tool counting.

Where a family's serving stack renders the chat with an official template (Llama 3.1+, Qwen 2.5
and 3) or encodes it with mistral-common (Mistral), the chat is counted as a whole by that
engine, and each message's share comes from the pieces the engine produced. Other families are
counted message by message (counter.py), with tool definitions and tool calls as below.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.context.messages import ChatMessage, RenderOptions, ToolDef
from services.context.tokenizers.mistral_chat import MISTRAL_COMMON, count_mistral
from services.context.tokenizers.templates import (
    LLAMA31_TEMPLATE,
    QWEN3_TEMPLATE,
    QWEN25_TEMPLATE,
    TemplateChat,
    render_pieces,
)

MISTRAL_ENGINE = "mistral-common"
TEMPLATES: dict[str, TemplateChat] = {
    "llama3.1": LLAMA31_TEMPLATE,
    "qwen2.5": QWEN25_TEMPLATE,
    "qwen3": QWEN3_TEMPLATE,
}
ENGINES = frozenset({*TEMPLATES, MISTRAL_ENGINE})

TextCount = Callable[[str], int]


@dataclass(frozen=True, slots=True)
class WholeCount:
    """A chat counted as a whole: per message, the template's own tokens, the tools."""

    per_message: tuple[int, ...]
    fixed: int
    tool_tokens: int
    method: str
    tool_method: str


def count_template(
    chat: TemplateChat,
    count_piece: TextCount,
    messages: Sequence[ChatMessage],
    tools: Sequence[ToolDef],
    options: RenderOptions,
) -> WholeCount:
    """The template rendered without the tools gives each message's pieces; rendered with them,
    the difference is the tools' (they may sit in the system block or the first user turn)."""
    rendered = render_pieces(chat, messages, (), options.model, options.date)
    per = [0] * len(messages)
    fixed = 0
    for piece, owner in zip(rendered.pieces, rendered.owners, strict=True):
        if owner is None:
            fixed += count_piece(piece)
        else:
            per[owner] += count_piece(piece)
    tool_tokens = 0
    if tools:
        with_tools = render_pieces(chat, messages, tools, options.model, options.date)
        tool_tokens = sum(count_piece(p) for p in with_tools.pieces) - sum(per) - fixed
    method = f"template:{chat.name}"
    return WholeCount(tuple(per), fixed, tool_tokens, method, method if tools else "")


def count_with_mistral(
    data_file: Path, messages: Sequence[ChatMessage], tools: Sequence[ToolDef]
) -> WholeCount:
    counted = count_mistral(data_file, messages, tools)
    method = f"encode_chat_completion:{MISTRAL_COMMON}"
    return WholeCount(
        counted.per_message, counted.fixed, counted.tool_tokens, method, method if tools else ""
    )


# --- message by message: tool definitions and tool calls -------------------------------------

# OpenAI cookbook, "How to count tokens with tiktoken", num_tokens_for_tools: the scaffolding
# the API adds per function, per property set, per property, per enum and per request. It
# reproduces every figure the cookbook publishes from the API (gpt-4o and gpt-4o-mini 101,
# gpt-3.5-turbo and gpt-4 105, on its weather example); nested schemas are not covered by it.
OPENAI_FUNC_INIT = {"o200k_base": 7, "cl100k_base": 10}
OPENAI_PROP_INIT = 3
OPENAI_PROP_KEY = 3
OPENAI_ENUM_INIT = -3
OPENAI_ENUM_ITEM = 3
OPENAI_FUNC_END = 12

# Other families without a template engine: the tool's JSON plus allowances per tool and per
# request (OpenAI-like scaffolding).
TOOL_TOKENS_OVERHEAD = 8
TOOLS_TOKENS_OVERHEAD = 12
JSON_TOOL_METHOD = f"estimate:json+{TOOL_TOKENS_OVERHEAD}/tool+{TOOLS_TOKENS_OVERHEAD}"

# A tool call in a message counted message by message: its name and arguments plus this.
TOOL_CALL_TOKENS_OVERHEAD = 3


def openai_tool_method(encoding: str) -> str:
    return (
        f"calibrated:openai-cookbook(func_init={OPENAI_FUNC_INIT[encoding]},prop_init="
        f"{OPENAI_PROP_INIT},prop_key={OPENAI_PROP_KEY},enum_init={OPENAI_ENUM_INIT},"
        f"enum_item={OPENAI_ENUM_ITEM},func_end={OPENAI_FUNC_END})"
    )


def _strip_dot(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


def openai_tool_tokens(count: TextCount, encoding: str, tools: Sequence[ToolDef]) -> int:
    """The cookbook's num_tokens_for_tools, less the messages (counted apart)."""
    if not tools:
        return 0
    tokens = 0
    for tool in tools:
        tokens += OPENAI_FUNC_INIT[encoding] + count(f"{tool.name}:{_strip_dot(tool.description)}")
        properties = tool.parameters.get("properties")
        if not isinstance(properties, dict) or not properties:
            continue
        tokens += OPENAI_PROP_INIT
        for key, prop in properties.items():
            prop = prop if isinstance(prop, dict) else {}
            tokens += OPENAI_PROP_KEY
            enum = prop.get("enum")
            if isinstance(enum, list):
                tokens += OPENAI_ENUM_INIT
                tokens += sum(OPENAI_ENUM_ITEM + count(str(item)) for item in enum)
            kind, described = prop.get("type", ""), _strip_dot(str(prop.get("description", "")))
            tokens += count(f"{key}:{kind}:{described}")
    return tokens + OPENAI_FUNC_END


def json_tool_tokens(count: TextCount, tools: Sequence[ToolDef]) -> int:
    if not tools:
        return 0
    text = sum(count(json.dumps(t.schema(), separators=(",", ":"))) for t in tools)
    return text + TOOL_TOKENS_OVERHEAD * len(tools) + TOOLS_TOKENS_OVERHEAD


def tool_call_tokens(count: TextCount, message: ChatMessage) -> int:
    return sum(
        TOOL_CALL_TOKENS_OVERHEAD + count(c.name) + count(c.arguments_json)
        for c in message.tool_calls
    )
