"""Official chat templates (templates/*.jinja, see templates/SOURCES.md) rendered with jinja2 as
Hugging Face's `apply_chat_template` renders them (and so as vLLM and TGI do by default), then
cut into pieces owned by the messages.

The rendered text is cut only right before a special token (`<|start_header_id|>`,
`<|im_start|>`, `<tool_response>`): tiktoken never merges across a special token, so the tokens
of the whole text are exactly the sum of the tokens of its pieces. Each piece's count is cached
by its text, which keeps re-sent history nearly free; each piece belongs to one message (or to
the template's own text: BOS, an injected system block, the reply priming).
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.context.messages import ChatMessage, Role, ToolDef

TEMPLATE_DIR = Path(__file__).parent / "templates"


class TemplateRefused(ValueError):
    """The template itself refused the conversation (its raise_exception), e.g. Llama 3.1 with
    two tool calls in one message."""


def _raise(message: str) -> None:
    raise TemplateRefused(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' own tojson: jinja2's escapes HTML characters and sorts keys.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now(dt.UTC).strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.cache
def load_template(file_name: str) -> jinja2.Template:
    return _environment().from_string((TEMPLATE_DIR / file_name).read_text(encoding="utf-8"))


def render(
    file_name: str, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
    variables: dict[str, Any],
) -> str:  # fmt: skip
    """The template's text for a conversation, with the reply primed (add_generation_prompt)."""
    try:
        return load_template(file_name).render(
            messages=conversation, tools=tools, add_generation_prompt=True, **variables
        )
    except TemplateRefused:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateRefused(f"the chat template failed: {exc}") from None


# --- messages as the templates receive them (OpenAI-style dicts, arguments parsed) ----------


def template_message(m: ChatMessage, roles: dict[Role, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": roles.get(m.role, m.role.value), "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]  # fmt: skip
    if m.role is Role.TOOL:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def template_tools(tools: Sequence[ToolDef]) -> list[dict[str, Any]] | None:
    return [t.schema() for t in tools] if tools else None


# --- pieces and their owners -----------------------------------------------------------------


def cut(text: str, boundaries: Sequence[str]) -> list[str]:
    """`text` cut right before every occurrence of a boundary special token."""
    cuts = sorted({i for b in boundaries for i in _occurrences(text, b) if i > 0} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(cuts) if a < b]


def _occurrences(text: str, needle: str) -> list[int]:
    found, start = [], text.find(needle)
    while start != -1:
        found.append(start)
        start = text.find(needle, start + 1)
    return found


class RenderMismatch(Exception):
    """The pieces did not start as the family expects (content that imitates the template)."""


def assign(pieces: Sequence[str], starts: Sequence[tuple[str, int | None]]) -> list[int | None]:
    """The owner of each piece: the first piece is the template's (None); a piece that starts
    with the next expected prefix takes that prefix's owner; any other piece (a special token
    inside content) stays with the current owner."""
    owners: list[int | None] = []
    owner: int | None = None
    j = 0
    for piece in pieces:
        if j < len(starts) and piece.startswith(starts[j][0]):
            owner = starts[j][1]
            j += 1
        owners.append(owner)
    if j != len(starts):
        raise RenderMismatch(f"{j} of {len(starts)} expected template blocks found")
    return owners


@dataclass(frozen=True, slots=True)
class TemplateChat:
    """One family's official template and how its rendering splits into message pieces."""

    name: str
    file_name: str
    boundaries: tuple[str, ...]
    starts: Callable[[Sequence[ChatMessage], bool], list[tuple[str, int | None]]]
    variables: Callable[[str, str], dict[str, Any]]  # (model, date) -> template variables
    roles: tuple[tuple[Role, str], ...] = ((Role.DEVELOPER, "system"),)


@dataclass(frozen=True, slots=True)
class Rendered:
    pieces: tuple[str, ...]
    owners: tuple[int | None, ...]


def render_pieces(
    chat: TemplateChat,
    messages: Sequence[ChatMessage],
    tools: Sequence[ToolDef],
    model: str,
    date: str,
) -> Rendered:
    roles = dict(chat.roles)
    conversation = [template_message(m, roles) for m in messages]
    text = render(chat.file_name, conversation, template_tools(tools), chat.variables(model, date))
    pieces = cut(text, chat.boundaries)
    return Rendered(tuple(pieces), tuple(assign(pieces, chat.starts(messages, bool(tools)))))


# --- Llama 3.1+ ------------------------------------------------------------------------------

_LLAMA_ROLE = {Role.TOOL: "ipython", Role.DEVELOPER: "system"}


def _llama_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>"


def llama31_starts(messages: Sequence[ChatMessage], tools: bool) -> list[tuple[str, int | None]]:
    system = bool(messages) and messages[0].role in (Role.SYSTEM, Role.DEVELOPER)
    starts: list[tuple[str, int | None]] = [(_llama_header("system"), 0 if system else None)]
    for i in range(1 if system else 0, len(messages)):
        role = _LLAMA_ROLE.get(messages[i].role, messages[i].role.value)
        if messages[i].tool_calls:
            role = "assistant"
        first_after_system = i == (1 if system else 0)
        starts.append((_llama_header("user" if tools and first_after_system else role), i))
    starts.append((_llama_header("assistant"), None))
    return starts


def llama31_variables(model: str, date: str) -> dict[str, Any]:
    """The date the serving stack passes: the request's, else what the model's own template
    does without one (3.1: its fixed default; 3.2 and 3.3: strftime_now, i.e. today)."""
    if date:
        return {"date_string": dt.date.fromisoformat(date).strftime("%d %b %Y")}
    if model.startswith("llama-3.1"):
        return {}
    return {"date_string": _strftime_now("%d %b %Y")}


Variables = Callable[[str, str], dict[str, Any]]


def _with_bos(variables: Variables) -> Variables:
    return lambda model, date: {"bos_token": "<|begin_of_text|>", **variables(model, date)}


LLAMA31_TEMPLATE = TemplateChat(
    "llama3.1-hf-template",
    "llama3.1.jinja",
    ("<|start_header_id|>",),
    llama31_starts,
    _with_bos(llama31_variables),
    ((Role.DEVELOPER, "system"), (Role.TOOL, "tool")),
)


# --- Qwen 2.5 and 3 (ChatML) -----------------------------------------------------------------


def _qwen_starts(default_system: bool) -> Callable[..., list[tuple[str, int | None]]]:
    def starts(messages: Sequence[ChatMessage], tools: bool) -> list[tuple[str, int | None]]:
        system = bool(messages) and messages[0].role in (Role.SYSTEM, Role.DEVELOPER)
        out: list[tuple[str, int | None]] = []
        if system or tools or default_system:
            out.append(("<|im_start|>system", 0 if system else None))
        for i in range(1 if system else 0, len(messages)):
            m = messages[i]
            if m.role is Role.TOOL:
                if i == 0 or messages[i - 1].role is not Role.TOOL:
                    out.append(("<|im_start|>user", i))
                out.append(("<tool_response>", i))
            else:
                role = "system" if m.role is Role.DEVELOPER else m.role.value
                out.append((f"<|im_start|>{role}", i))
        out.append(("<|im_start|>assistant", None))
        return out

    return starts


def _no_variables(model: str, date: str) -> dict[str, Any]:
    return {}


QWEN25_TEMPLATE = TemplateChat(
    "qwen2.5-hf-template",
    "qwen2.5.jinja",
    ("<|im_start|>", "<tool_response>"),
    _qwen_starts(default_system=True),
    _no_variables,
)
QWEN3_TEMPLATE = TemplateChat(
    "qwen3-hf-template",
    "qwen3.jinja",
    ("<|im_start|>", "<tool_response>"),
    _qwen_starts(default_system=False),
    _no_variables,
)
