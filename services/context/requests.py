"""PrepareContext and CountTokens requests checked at the edge: the limits (each with its
unit last), the refusals of the context service itself, and the parsing of a request into
the values the service works on. Nothing is reserved for a request refused here."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ledger import limits
from ledger.validation import KEY_PATTERN, MODEL_PATTERN, Checker, account_key
from services._gen.tokenledger.v1 import context_pb2 as cpb
from services.context.fitting import (
    AllocationPolicy,
    Strategy,
)
from services.context.memory import (
    Fact,
    key_information,
    memory_share_default,
    retention_marker_chars_max,
    retention_markers_count_max,
)
from services.context.messages import (
    ChatMessage,
    RenderOptions,
    Role,
    ServingStack,
    ToolCall,
    ToolDef,
)
from services.context.tokenizers import (
    CountTarget,
    ModelRegistry,
    UnknownModelError,
    known_encodings,
)
from services.platform.errors import InvalidRequest, UnknownModel

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

# --- limits (each checked at the edge; the unit is the last word) ----------------------------

MiB = 2**20
request_bytes_max = 8 * MiB
"""gRPC refuses a larger request (RESOURCE_EXHAUSTED) before it is parsed."""
messages_count_max = 2_000
message_content_bytes_max = 2 * MiB
messages_content_bytes_max = 6 * MiB
"""All contents of one request together (CountTokens text too)."""
name_chars_max = 64
tool_call_id_chars_max = 128
tool_call_ids_count_max = 128
"""Tool calls one assistant message may make."""
tools_count_max = 128
tool_description_chars_max = 8_192
tool_parameters_bytes_max = 64 * 1024
tool_arguments_bytes_max = 256 * 1024
"""The arguments of one tool call, as JSON text."""
priority_abs_max = 1_000
idempotency_key_chars_max = 96
"""The ledger's keys are 128 characters: "ctx:" + this key must fit, with room to spare."""
context_window_tokens_max = 10_000_000
output_tokens_max = 10_000_000
ttl_s_max = 86_400


_NAME = re.compile(r"[A-Za-z0-9_-]+")  # OpenAI's name and function-name syntax

ROLES: dict[cpb.ChatRole.ValueType, Role] = {
    cpb.CHAT_ROLE_SYSTEM: Role.SYSTEM,
    cpb.CHAT_ROLE_DEVELOPER: Role.DEVELOPER,
    cpb.CHAT_ROLE_USER: Role.USER,
    cpb.CHAT_ROLE_ASSISTANT: Role.ASSISTANT,
    cpb.CHAT_ROLE_TOOL: Role.TOOL,
}
PB_ROLES = {role: value for value, role in ROLES.items()}
STRATEGIES: dict[cpb.Strategy.ValueType, Strategy] = {
    cpb.STRATEGY_UNSPECIFIED: Strategy.WINDOW,
    cpb.STRATEGY_WINDOW: Strategy.WINDOW,
    cpb.STRATEGY_PRIORITY: Strategy.PRIORITY,
    cpb.STRATEGY_TRUNCATE: Strategy.TRUNCATE,
    cpb.STRATEGY_SUMMARIZE: Strategy.SUMMARIZE,
}
PB_STRATEGIES = {s: v for v, s in STRATEGIES.items() if v != cpb.STRATEGY_UNSPECIFIED}
STACKS: dict[cpb.ServingStack.ValueType, ServingStack] = {
    cpb.SERVING_STACK_UNSPECIFIED: ServingStack.HF_TEMPLATE,
    cpb.SERVING_STACK_HF_TEMPLATE: ServingStack.HF_TEMPLATE,
    cpb.SERVING_STACK_OLLAMA: ServingStack.OLLAMA,
}
START_ON_USER: dict[cpb.HistoryStart.ValueType, bool] = {
    cpb.HISTORY_START_UNSPECIFIED: True,
    cpb.HISTORY_START_USER: True,
    cpb.HISTORY_START_ANY: False,
}
PREDICT_OUTPUT: dict[cpb.OutputHold.ValueType, bool] = {
    cpb.OUTPUT_HOLD_UNSPECIFIED: False,
    cpb.OUTPUT_HOLD_MAX_TOKENS: False,
    cpb.OUTPUT_HOLD_PREDICTED: True,
}
WRITTEN_ONLY: dict[cpb.MessagesView.ValueType, bool] = {
    cpb.MESSAGES_VIEW_UNSPECIFIED: False,
    cpb.MESSAGES_VIEW_FULL: False,
    cpb.MESSAGES_VIEW_WRITTEN: True,
}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


# --- errors ----------------------------------------------------------------------------------
# Refusals are values of services/platform/errors.py; the error boundary gives each its status.


def _raise_violations(c: Checker, unknown_model: str = "", families: str = "") -> None:
    found = [(v.field, v.description) for v in c.violations]
    text = "; ".join(f"{f}: {d}" for f, d in found)
    if unknown_model:
        meta = {"model": unknown_model, "families": families}
        raise UnknownModel(text, metadata=meta, violations=found)
    if found:
        raise InvalidRequest(text, violations=found)


# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """What to count with, and the model's limits (0: not known)."""

    count_target: CountTarget | str
    encoding: str
    family: str
    window_tokens: int
    output_cap_tokens: int
    model_key: str = ""  # the registry's name, e.g. "llama-3.1"; empty for an encoding


def _content_bytes(text: str) -> int:
    """UTF-8 bytes of `text`; isascii() is O(1) in CPython, so ASCII text is never encoded."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _resolve(
    c: Checker, registry: ModelRegistry, model: str, encoding: str, window_override: int
) -> tuple[Target | None, str]:
    """The target, or None with the unknown model's name."""
    spec = None
    if model:
        try:
            spec = registry.resolve(model)
        except UnknownModelError:
            if not encoding:
                c.fail("model", f"unknown model {model!r}; known families: "
                       f"{', '.join(registry.families())} (or pass `encoding`)")  # fmt: skip
                return None, model
    if encoding and encoding not in known_encodings():
        c.fail("encoding", f"unknown encoding {encoding!r}; known: {', '.join(known_encodings())}")
        return None, ""
    if spec is None and not encoding:
        return None, ""
    window = spec.context_window_tokens if spec else 0
    if window_override:
        if spec and window_override > window:
            c.fail("context_window_tokens", f"is {window_override}; {spec.name}'s window is "
                   f"{window} tokens")  # fmt: skip
        window = window_override
    return (
        Target(
            count_target=encoding or spec,  # type: ignore[arg-type]
            encoding=encoding or (spec.encoding if spec else ""),
            family=spec.family if spec and not encoding else "",
            window_tokens=window,
            output_cap_tokens=spec.max_output_tokens if spec else 0,
            model_key=spec.name if spec and not encoding else "",
        ),
        "",
    )


def _tool_call(c: Checker, f: str, call: cpb.ToolCall) -> ToolCall:
    c.text(f"{f}.id", call.id, chars_max=tool_call_id_chars_max, pattern=KEY_PATTERN)
    c.text(f"{f}.name", call.name, chars_max=name_chars_max, pattern=_NAME)
    arguments: dict[str, object] = {}
    if len(call.arguments_json.encode()) > tool_arguments_bytes_max:
        c.fail(f"{f}.arguments_json", f"is over {tool_arguments_bytes_max} bytes")
        return ToolCall(call.id, call.name, call.arguments_json)
    try:
        parsed = json.loads(call.arguments_json or "{}")
    except ValueError as exc:
        c.fail(f"{f}.arguments_json", f"is not JSON: {exc}")
        parsed = {}
    if not isinstance(parsed, dict):
        c.fail(f"{f}.arguments_json", "must be a JSON object")
    else:
        arguments = parsed
    return ToolCall(call.id, call.name, call.arguments_json or "{}", arguments)


def _calls(c: Checker, f: str, m: cpb.ChatMessage, role: Role | None) -> tuple[ToolCall, ...]:
    """The message's tool calls (tool_calls, or the ids alone in tool_call_ids)."""
    if (m.tool_call_ids or m.tool_calls) and role is not Role.ASSISTANT:
        which = "tool_calls" if m.tool_calls else "tool_call_ids"
        c.fail(f"{f}.{which}", "only an assistant message makes tool calls")
        return ()
    if max(len(m.tool_call_ids), len(m.tool_calls)) > tool_call_ids_count_max:
        c.fail(f"{f}.tool_calls", f"has {max(len(m.tool_call_ids), len(m.tool_calls))}; at most "
               f"{tool_call_ids_count_max} allowed")  # fmt: skip
        return ()
    calls = tuple(_tool_call(c, f"{f}.tool_calls[{j}]", t) for j, t in enumerate(m.tool_calls))
    for j, call in enumerate(m.tool_call_ids):
        c.text(
            f"{f}.tool_call_ids[{j}]", call, chars_max=tool_call_id_chars_max, pattern=KEY_PATTERN
        )
    if calls and m.tool_call_ids and list(m.tool_call_ids) != [t.id for t in calls]:
        c.fail(f"{f}.tool_call_ids", "must name the ids of tool_calls in order (or be empty)")
    return calls


@dataclass(slots=True)
class _Calls:
    """Tool call ids seen so far, and those still waiting for their result."""

    seen: set[str]
    open: dict[str, str]  # call id -> field of the call


def _answer(c: Checker, f: str, m: cpb.ChatMessage, role: Role | None, calls: _Calls) -> None:
    if role is not Role.TOOL:
        if m.tool_call_id:
            c.fail(f"{f}.tool_call_id", "only a tool message answers a tool call")
        return
    c.text(f"{f}.tool_call_id", m.tool_call_id, chars_max=tool_call_id_chars_max,
           pattern=KEY_PATTERN)  # fmt: skip
    if not m.tool_call_id:
        return
    if m.tool_call_id not in calls.seen:
        c.fail(f"{f}.tool_call_id", f"{m.tool_call_id!r} answers no earlier assistant tool "
               "call; a tool result must follow its call")  # fmt: skip
    elif calls.open.pop(m.tool_call_id, None) is None:
        c.fail(f"{f}.tool_call_id", f"{m.tool_call_id!r} was already answered; a call has "
               "exactly one result")  # fmt: skip


def _message(
    c: Checker, i: int, m: cpb.ChatMessage, size: int, calls: _Calls
) -> ChatMessage | None:
    f = f"messages[{i}]"
    role = ROLES.get(m.role)
    if role is None:
        c.fail(f"{f}.role", f"is {m.role}; must be one of {', '.join(r.name for r in Role)} "
               "(CHAT_ROLE_*)")  # fmt: skip
    if size > message_content_bytes_max:
        c.fail(f"{f}.content", f"is {size} bytes; at most {message_content_bytes_max} allowed")
    elif not m.content and not (role is Role.ASSISTANT and (m.tool_call_ids or m.tool_calls)):
        c.fail(f"{f}.content", "is required (only an assistant message making tool calls may "
               "be empty)")  # fmt: skip
    c.text(f"{f}.name", m.name, chars_max=name_chars_max, pattern=_NAME, required=False)
    c.number(f"{f}.priority", m.priority, low=-priority_abs_max, high=priority_abs_max)
    tool_calls = _calls(c, f, m, role)
    _answer(c, f, m, role, calls)
    ids = [t.id for t in tool_calls] or list(m.tool_call_ids)
    which = "tool_calls" if tool_calls else "tool_call_ids"
    for j, call_id in enumerate(ids if role is Role.ASSISTANT else ()):
        if call_id in calls.seen:
            c.fail(f"{f}.{which}[{j}]", f"{call_id!r} is already the id of another call")
        calls.seen.add(call_id)
        calls.open[call_id] = f"{f}.{which}[{j}]"
    if role is None:
        return None
    return ChatMessage(
        role=role,
        content=m.content,
        name=m.name,
        pinned=m.pinned,
        priority=m.priority,
        tool_call_id=m.tool_call_id,
        tool_call_ids=tuple(ids),
        tool_calls=tool_calls,
    )


def _messages(c: Checker, messages: Sequence[cpb.ChatMessage]) -> tuple[list[ChatMessage], int]:
    if not messages:
        c.fail("messages", "is required: at least one message")
        return [], 0
    if len(messages) > messages_count_max:
        c.fail("messages", f"has {len(messages)} messages; at most {messages_count_max} allowed")
        return [], 0
    calls = _Calls(set(), {})
    sizes = [_content_bytes(m.content) for m in messages]
    parsed = [_message(c, i, messages[i], n, calls) for i, n in enumerate(sizes)]
    for call_id, f in calls.open.items():
        c.fail(f, f"call {call_id!r} has no tool result; every call must be answered by a tool "
               "message with its tool_call_id")  # fmt: skip
    size = sum(sizes)
    if size > messages_content_bytes_max:
        c.fail("messages", f"contents total {size} bytes; at most {messages_content_bytes_max}")
    return [m for m in parsed if m is not None], size


def _tool(c: Checker, i: int, tool: cpb.ToolDefinition) -> ToolDef | None:
    """The tool with its parsed JSON Schema (None when it is malformed)."""
    f = f"tools[{i}]"
    c.text(f"{f}.name", tool.name, chars_max=name_chars_max, pattern=_NAME)
    if len(tool.description) > tool_description_chars_max:
        c.fail(f"{f}.description", f"is {len(tool.description)} characters long; at most "
               f"{tool_description_chars_max} allowed")  # fmt: skip
    parameters = tool.parameters_json or "{}"
    if len(parameters.encode()) > tool_parameters_bytes_max:
        c.fail(f"{f}.parameters_json", f"is over {tool_parameters_bytes_max} bytes")
        return None
    try:
        schema = json.loads(parameters)
    except ValueError as exc:
        c.fail(f"{f}.parameters_json", f"is not JSON: {exc}")
        return None
    if not isinstance(schema, dict):
        c.fail(f"{f}.parameters_json", "must be a JSON object (a JSON Schema)")
        return None
    return ToolDef(tool.name, tool.description, schema)


def _tools(c: Checker, tools: Sequence[cpb.ToolDefinition]) -> list[ToolDef]:
    if len(tools) > tools_count_max:
        c.fail("tools", f"has {len(tools)} tools; at most {tools_count_max} allowed")
        return []
    parsed = [_tool(c, i, t) for i, t in enumerate(tools)]
    return [t for t in parsed if t is not None]


def _render(
    c: Checker, stack: cpb.ServingStack.ValueType, date: str, target: Target | None
) -> RenderOptions:
    serving = STACKS.get(stack)
    if serving is None:
        c.fail("serving_stack", f"is {stack}; must be one of SERVING_STACK_*")
    if date:
        try:
            if not _DATE.fullmatch(date):
                raise ValueError("not YYYY-MM-DD")
            dt.date.fromisoformat(date)
        except ValueError:
            c.fail("date", f"is {date!r}; must be a date as YYYY-MM-DD")
            date = ""
    model = target.model_key if target else ""
    return RenderOptions(serving or ServingStack.HF_TEMPLATE, date, model)


_SHARES = ("system_share", "history_share", "input_share", "reserve_share")


def _policy(
    c: Checker, request: cpb.PrepareContextRequest, default: AllocationPolicy
) -> AllocationPolicy:
    if not request.HasField("policy"):
        return default
    shares = {name: getattr(default, name) for name in _SHARES}
    for name in _SHARES:
        if request.policy.HasField(name):  # type: ignore[arg-type]
            value = getattr(request.policy, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                c.fail(f"policy.{name}", f"is {value}; must be in [0, 1]")
            shares[name] = value
    if any(f.startswith("policy.") for f in (v.field for v in c.violations)):
        return default
    try:
        return AllocationPolicy(**shares)
    except ValueError as exc:
        c.fail("policy", str(exc))
        return default


def _memory(c: Checker, r: cpb.PrepareContextRequest) -> tuple[float, tuple[str, ...]]:
    """The memory share (from the policy, else the default) and the retention markers (the
    messages' key_information is checked by memory.key_information)."""
    share = memory_share_default
    if r.HasField("policy") and r.policy.HasField("memory_share"):
        share = r.policy.memory_share
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            c.fail("policy.memory_share", f"is {share}; must be in [0, 1]")
    if r.use_memory and not r.conversation_id:
        c.fail("use_memory", "needs a conversation_id: memory belongs to a conversation")
    if len(r.retention_markers) > retention_markers_count_max:
        c.fail("retention_markers", f"has {len(r.retention_markers)}; at most "
               f"{retention_markers_count_max} allowed")  # fmt: skip
    for i, marker in enumerate(r.retention_markers[:retention_markers_count_max]):
        if not marker.strip() or len(marker) > retention_marker_chars_max:
            c.fail(f"retention_markers[{i}]", f"is {len(marker)} characters; must be 1 to "
                   f"{retention_marker_chars_max}, not only spaces")  # fmt: skip
    return share, tuple(dict.fromkeys(r.retention_markers))


def _account(c: Checker, r: cpb.PrepareContextRequest) -> None:
    c.text(
        "idempotency_key",
        r.idempotency_key,
        chars_max=idempotency_key_chars_max,
        pattern=KEY_PATTERN,
    )
    account_key(c, r.tenant_id, r.user_id, r.conversation_id, user=True)
    c.number("ttl_seconds", r.ttl_seconds, low=0, high=ttl_s_max)


def _output(c: Checker, r: cpb.PrepareContextRequest, target: Target | None) -> None:
    cap = (target.output_cap_tokens if target else 0) or output_tokens_max
    if not 1 <= r.max_output_tokens <= cap:
        who = "the model" if target and target.output_cap_tokens else "the service"
        c.fail("max_output_tokens", f"is {r.max_output_tokens}; must be between 1 and {cap} "
               f"({who}'s output cap)")  # fmt: skip
    elif target and target.window_tokens and r.max_output_tokens >= target.window_tokens:
        c.fail("max_output_tokens", f"is {r.max_output_tokens}; the context window is "
               f"{target.window_tokens} tokens and the prompt needs some")  # fmt: skip
    if not 0 <= r.min_output_tokens <= max(r.max_output_tokens, 0):
        c.fail("min_output_tokens", f"is {r.min_output_tokens}; must be between 0 and "
               "max_output_tokens")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Prepare:
    """A validated PrepareContext request."""

    model: str
    target: Target
    messages: list[ChatMessage]
    tools: list[ToolDef]
    strategy: Strategy
    policy: AllocationPolicy
    max_output: int
    min_output: int
    content_bytes: int
    render: RenderOptions
    start_on_user: bool = True
    use_memory: bool = False
    memory_share: float = memory_share_default
    markers: tuple[str, ...] = ()
    stated: tuple[Fact, ...] = ()
    """Facts the messages' key_information states, to set before fitting."""
    predict_output: bool = False
    """OUTPUT_HOLD_PREDICTED: hold the user's recent p95 of output, send max_output."""
    written_only: bool = False
    """MESSAGES_VIEW_WRITTEN: the response carries only the messages the service wrote."""


def parse_prepare(
    r: cpb.PrepareContextRequest, registry: ModelRegistry, default_policy: AllocationPolicy
) -> Prepare:
    """Every field checked; all problems reported at once (InvalidRequest, UnknownModel)."""
    c = Checker()
    _account(c, r)
    c.text("model", r.model, chars_max=limits.model_chars_max, pattern=MODEL_PATTERN)
    c.number("context_window_tokens", r.context_window_tokens, low=0,
             high=context_window_tokens_max)  # fmt: skip
    target, unknown = _resolve(c, registry, r.model, r.encoding, r.context_window_tokens)
    if target is not None and not target.window_tokens:
        c.fail("context_window_tokens", "is required when the model is not known")
    _output(c, r, target)
    messages, size = _messages(c, r.messages)
    tools = _tools(c, r.tools)
    strategy = STRATEGIES.get(r.strategy)
    if strategy is None:
        c.fail("strategy", f"is {r.strategy}; must be one of STRATEGY_*")
    policy = _policy(c, r, default_policy)
    memory_share, markers = _memory(c, r)
    stated = key_information(c, r.messages, r.use_memory)
    render = _render(c, r.serving_stack, r.date, target)
    start_on_user = START_ON_USER.get(r.history_start)
    if start_on_user is None:
        c.fail("history_start", f"is {r.history_start}; must be one of HISTORY_START_*")
    predict_output = PREDICT_OUTPUT.get(r.output_hold)
    if predict_output is None:
        c.fail("output_hold", f"is {r.output_hold}; must be one of OUTPUT_HOLD_*")
    written_only = WRITTEN_ONLY.get(r.messages_view)
    if written_only is None:
        c.fail("messages_view", f"is {r.messages_view}; must be one of MESSAGES_VIEW_*")
    _raise_violations(c, unknown, ", ".join(registry.families()))
    assert target is not None and strategy is not None
    return Prepare(
        model=r.model,
        target=target,
        messages=messages,
        tools=tools,
        strategy=strategy,
        policy=policy,
        max_output=r.max_output_tokens,
        min_output=r.min_output_tokens or r.max_output_tokens,
        content_bytes=size,
        render=render,
        start_on_user=bool(start_on_user),
        use_memory=r.use_memory,
        memory_share=memory_share,
        markers=markers,
        stated=tuple(stated),
        predict_output=bool(predict_output),
        written_only=bool(written_only),
    )


@dataclass(frozen=True, slots=True)
class Count:
    """A validated CountTokens request: messages (with tools) or a text."""

    target: Target
    messages: list[ChatMessage]
    tools: list[ToolDef]
    text: str
    content_bytes: int
    render: RenderOptions


def parse_count(r: cpb.CountTokensRequest, registry: ModelRegistry) -> Count:
    """Every field checked; all problems reported at once (InvalidRequest, UnknownModel)."""
    c = Checker()
    c.text("model", r.model, chars_max=limits.model_chars_max, pattern=MODEL_PATTERN,
           required=not r.encoding)  # fmt: skip
    target, unknown = _resolve(c, registry, r.model, r.encoding, 0)
    if bool(r.messages) == bool(r.text):
        c.fail("messages", "exactly one of messages and text is required")
    messages, size = _messages(c, r.messages) if r.messages else ([], 0)
    if _content_bytes(r.text) > messages_content_bytes_max:
        c.fail("text", f"is over {messages_content_bytes_max} bytes")
    if r.tools and not r.messages:
        c.fail("tools", "are counted with messages only")
    tools = _tools(c, r.tools)
    render = _render(c, r.serving_stack, r.date, target)
    _raise_violations(c, unknown, ", ".join(registry.families()))
    assert target is not None
    return Count(target, messages, tools, r.text, max(size, len(r.text)), render)
