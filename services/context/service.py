"""ContextService: count a conversation exactly, reserve its tokens in the ledger, and fit it
into the model's window and the grant.

PrepareContext, step by step:
1. validate everything at the edge (nothing is reserved for a bad request);
2. count every message (cached per content), the tool definitions (estimated) and the reply
   priming; find the mandatory part: system, pinned and input messages with their tool pairs;
3. plan one Reserve: amount = the prompt capped by the window + max_output_tokens, floor
   (min_amount) = the mandatory part + min_output_tokens. If even the floor exceeds the window,
   fail before reserving (FAILED_PRECONDITION, CONTEXT_DOES_NOT_FIT, the shortfall named);
4. the grant is the budget: output reserve = min(max_output, grant - mandatory), prompt budget =
   grant - output reserve; fit the conversation to it with the strategy;
5. return the fitted messages with the reservation id. The caller commits that reservation with
   the model's actual usage (or rolls it back); the hold may exceed what the fitted prompt needs,
   and the commit releases the rest.

A failure after the hold was placed rolls it back (no orphan holds), except cancellation: the
caller may retry with the same key, and the ledger would then hand back the same reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ledger.validation import Checker
from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.context.fitting import (
    AllocationPolicy,
    DoesNotFit,
    FitRequest,
    FitResult,
    Strategy,
    fit,
)
from services.context.ledger_client import LedgerCallError, LedgerClient
from services.context.messages import ChatMessage, Role
from services.context.metrics import ContextMetrics
from services.context.registry import ModelRegistry, UnknownModelError
from services.context.remote_summarizer import (
    Account,
    RemoteSummarizer,
    RemoteSummarizerConfig,
    SummarizerOutcome,
)
from services.context.tokenizer_data import TokenizerDataError
from services.context.tokenizers import (
    CountTarget,
    TokenCounter,
    TokenizationError,
    known_encodings,
)
from services.errors import ERROR_DOMAIN, bad_request, clip

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
priority_abs_max = 1_000
idempotency_key_chars_max = 96
"""The ledger's keys are 128 characters: "ctx:" + this key must fit, with room to spare."""
id_chars_max = 128
model_chars_max = 128
context_window_tokens_max = 10_000_000
output_tokens_max = 10_000_000
ttl_s_max = 86_400
inline_count_bytes_max = 64 * 1024
"""Smaller requests are counted on the event loop: a thread hop costs more than they do."""

# Tool definitions: providers render them in undocumented ways. The JSON text is counted with
# the model's encoding, plus a per-tool and a per-request allowance (OpenAI's function-calling
# rendering measured at ~7-12 tokens of scaffolding per tool and per request).
TOOL_TOKENS_OVERHEAD = 8
TOOLS_TOKENS_OVERHEAD = 12
TOOL_METHOD = f"estimate:json+{TOOL_TOKENS_OVERHEAD}/tool+{TOOLS_TOKENS_OVERHEAD}"

LEDGER_KEY_PREFIX = "ctx:"
REASON_DOES_NOT_FIT = "CONTEXT_DOES_NOT_FIT"
LEDGER_RETRY_DELAY_S = 1

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]*")  # the ledger's id syntax
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=/-]*")  # the ledger's model syntax
_KEY = re.compile(r"[\x21-\x7e]+")
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


# --- errors ----------------------------------------------------------------------------------


def _pack(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


class ContextError(Exception):
    """A refusal of the context service itself, with its google.rpc details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message_text: str,
        *,
        metadata: dict[str, str] | None = None,
        violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.code = code
        self.reason = reason
        self.metadata = metadata or {}
        self.violations = tuple(violations)
        super().__init__(message_text)

    def status(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        details = [_pack(info)]
        if self.violations:
            details.append(_pack(bad_request(self.violations)))
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=clip(str(self)), details=details
        )


def _invalid(
    violations: Sequence[tuple[str, str]], reason: str = "INVALID_ARGUMENT", **meta: str
) -> ContextError:
    text = "; ".join(f"{f}: {d}" for f, d in violations)
    return ContextError(
        grpc.StatusCode.INVALID_ARGUMENT, reason, text, metadata=meta, violations=violations
    )


def _raise_violations(c: Checker, unknown_model: str = "", families: str = "") -> None:
    found = [(v.field, v.description) for v in c.violations]
    if unknown_model:
        raise _invalid(found, "UNKNOWN_MODEL", model=clip(unknown_model, 128), families=families)
    if found:
        raise _invalid(found)


def ledger_refusal(exc: LedgerCallError, what: str) -> LedgerCallError:
    """The ledger's error passed on: its code and details, the message prefixed with what was
    asked. A ledger that cannot be reached (or too slow for our deadline on the call) is
    UNAVAILABLE, reason LEDGER_UNAVAILABLE, with a RetryInfo: retrying is the right move."""
    status = status_pb2.Status()
    status.CopyFrom(exc.status)
    code = exc.code
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        code, status.code = grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE
        if not status.details:
            info = error_details_pb2.ErrorInfo(
                reason="LEDGER_UNAVAILABLE",
                domain=ERROR_DOMAIN,
                metadata={"ledger_status": exc.code.name},
            )
            delay = duration_pb2.Duration(seconds=LEDGER_RETRY_DELAY_S)
            retry = error_details_pb2.RetryInfo(retry_delay=delay)
            status.details.extend([_pack(info), _pack(retry)])
        status.message = f"the ledger could not be reached to {what}: {exc.message}"
    else:
        status.message = f"the ledger refused to {what}: {exc.message}"
    return LedgerCallError(code, status.message, status)


# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """What to count with, and the model's limits (0: not known)."""

    count_target: CountTarget | str
    encoding: str
    family: str
    window_tokens: int
    output_cap_tokens: int


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
        ),
        "",
    )


def _message(
    c: Checker, i: int, m: cpb.ChatMessage, size: int, calls: set[str]
) -> ChatMessage | None:
    f = f"messages[{i}]"
    role = ROLES.get(m.role)
    if role is None:
        c.fail(f"{f}.role", f"is {m.role}; must be one of {', '.join(r.name for r in Role)} "
               "(CHAT_ROLE_*)")  # fmt: skip
    if size > message_content_bytes_max:
        c.fail(f"{f}.content", f"is {size} bytes; at most {message_content_bytes_max} allowed")
    elif not m.content and not (role is Role.ASSISTANT and m.tool_call_ids):
        c.fail(f"{f}.content", "is required (only an assistant message making tool calls may "
               "be empty)")  # fmt: skip
    c.text(f"{f}.name", m.name, chars_max=name_chars_max, pattern=_NAME, required=False)
    c.number(f"{f}.priority", m.priority, low=-priority_abs_max, high=priority_abs_max)
    if m.tool_call_ids and role is not Role.ASSISTANT:
        c.fail(f"{f}.tool_call_ids", "only an assistant message makes tool calls")
    if len(m.tool_call_ids) > tool_call_ids_count_max:
        c.fail(f"{f}.tool_call_ids", f"has {len(m.tool_call_ids)}; at most "
               f"{tool_call_ids_count_max} allowed")  # fmt: skip
    for j, call in enumerate(m.tool_call_ids):
        c.text(f"{f}.tool_call_ids[{j}]", call, chars_max=tool_call_id_chars_max, pattern=_KEY)
    if role is Role.TOOL:
        c.text(f"{f}.tool_call_id", m.tool_call_id, chars_max=tool_call_id_chars_max, pattern=_KEY)
        if m.tool_call_id and m.tool_call_id not in calls:
            c.fail(f"{f}.tool_call_id", f"{m.tool_call_id!r} answers no earlier assistant tool "
                   "call; a tool result must follow its call")  # fmt: skip
    elif m.tool_call_id:
        c.fail(f"{f}.tool_call_id", "only a tool message answers a tool call")
    calls.update(m.tool_call_ids)
    if role is None:
        return None
    return ChatMessage(
        role=role,
        content=m.content,
        name=m.name,
        pinned=m.pinned,
        priority=m.priority,
        tool_call_id=m.tool_call_id,
        tool_call_ids=tuple(m.tool_call_ids),
    )


def _messages(c: Checker, messages: Sequence[cpb.ChatMessage]) -> tuple[list[ChatMessage], int]:
    if not messages:
        c.fail("messages", "is required: at least one message")
        return [], 0
    if len(messages) > messages_count_max:
        c.fail("messages", f"has {len(messages)} messages; at most {messages_count_max} allowed")
        return [], 0
    calls: set[str] = set()
    sizes = [_content_bytes(m.content) for m in messages]
    parsed = [_message(c, i, messages[i], n, calls) for i, n in enumerate(sizes)]
    size = sum(sizes)
    if size > messages_content_bytes_max:
        c.fail("messages", f"contents total {size} bytes; at most {messages_content_bytes_max}")
    return [m for m in parsed if m is not None], size


def _tool_text(c: Checker, i: int, tool: cpb.ToolDefinition) -> str:
    """The tool as the JSON a provider would be sent (what its count is estimated from)."""
    f = f"tools[{i}]"
    c.text(f"{f}.name", tool.name, chars_max=name_chars_max, pattern=_NAME)
    if len(tool.description) > tool_description_chars_max:
        c.fail(f"{f}.description", f"is {len(tool.description)} characters long; at most "
               f"{tool_description_chars_max} allowed")  # fmt: skip
    parameters = tool.parameters_json or "{}"
    if len(parameters.encode()) > tool_parameters_bytes_max:
        c.fail(f"{f}.parameters_json", f"is over {tool_parameters_bytes_max} bytes")
        return ""
    try:
        schema = json.loads(parameters)
    except ValueError as exc:
        c.fail(f"{f}.parameters_json", f"is not JSON: {exc}")
        return ""
    if not isinstance(schema, dict):
        c.fail(f"{f}.parameters_json", "must be a JSON object (a JSON Schema)")
        return ""
    function = {"name": tool.name, "description": tool.description, "parameters": schema}
    return json.dumps({"type": "function", "function": function}, separators=(",", ":"))


def _tools(c: Checker, tools: Sequence[cpb.ToolDefinition]) -> list[str]:
    if len(tools) > tools_count_max:
        c.fail("tools", f"has {len(tools)} tools; at most {tools_count_max} allowed")
        return []
    return [_tool_text(c, i, t) for i, t in enumerate(tools)]


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


def _account(c: Checker, r: cpb.PrepareContextRequest) -> None:
    c.text("idempotency_key", r.idempotency_key, chars_max=idempotency_key_chars_max, pattern=_KEY)
    c.text("tenant_id", r.tenant_id, chars_max=id_chars_max, pattern=_ID)
    c.text("user_id", r.user_id, chars_max=id_chars_max, pattern=_ID)
    c.text("conversation_id", r.conversation_id, chars_max=id_chars_max, pattern=_ID,
           required=False)  # fmt: skip
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
    tools: list[str]
    strategy: Strategy
    policy: AllocationPolicy
    max_output: int
    min_output: int
    content_bytes: int


def parse_prepare(
    r: cpb.PrepareContextRequest, registry: ModelRegistry, default_policy: AllocationPolicy
) -> Prepare:
    """Every field checked; all problems reported at once (ContextError)."""
    c = Checker()
    _account(c, r)
    c.text("model", r.model, chars_max=model_chars_max, pattern=_MODEL)
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
    )


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

    @property
    def fixed_tokens(self) -> int:
        """Tokens no strategy can remove: tool definitions and reply priming."""
        return self.reply_priming + self.tool_tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(self.per_message) + self.fixed_tokens


def count_tools(counter: TokenCounter, target: Target, tools: Sequence[str]) -> int:
    """Estimated: the JSON of each tool counted (and cached) as message text, plus allowances."""
    if not tools:
        return 0
    overhead = counter.chat_overhead(target.count_target).per_role[Role.SYSTEM]
    text = sum(
        counter.count_message(target.count_target, ChatMessage(Role.SYSTEM, t)) - overhead
        for t in tools
    )
    return text + TOOL_TOKENS_OVERHEAD * len(tools) + TOOLS_TOKENS_OVERHEAD


def count_conversation(
    counter: TokenCounter, target: Target, messages: Sequence[ChatMessage], tools: Sequence[str]
) -> Counted:
    chat = counter.count_chat(target.count_target, messages)
    return Counted(
        messages=messages,
        per_message=chat.per_message,
        reply_priming=chat.reply_priming,
        tool_tokens=count_tools(counter, target, tools),
        encoding=chat.encoding,
        exact=chat.exact,
        method=chat.method,
        chat_format=chat.chat_format,
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
    try:
        fit(FitRequest(counted.messages, budget_tokens=0, fixed_tokens=counted.fixed_tokens), count)
    except DoesNotFit as exc:
        required, indices = exc.required_tokens, exc.mandatory_indices
    else:
        return counted.prompt_tokens, tuple(range(len(counted.messages)))
    if strategy is Strategy.TRUNCATE:
        users = [i for i, m in enumerate(counted.messages) if m.role is Role.USER]
        if users and not counted.messages[users[-1]].pinned:
            i = users[-1]
            required -= counted.per_message[i] - count(replace(counted.messages[i], content="x"))
    return required, indices


# --- the reservation plan --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """One Reserve: `amount` wanted, at least `floor`; and how a grant splits."""

    prompt_tokens: int
    mandatory_tokens: int
    window_tokens: int
    max_output: int
    min_output: int
    amount: int
    floor: int

    def split(self, granted: int) -> tuple[int, int]:
        """(prompt budget, output reserve) for a grant: the output keeps max_output while the
        mandatory part allows, and gives way down to min_output only when it does not."""
        output = min(self.max_output, max(granted - self.mandatory_tokens, self.min_output))
        return granted - output, output


class WindowTooSmall(Exception):
    def __init__(self, required: int, window: int) -> None:
        self.required = required
        self.window = window
        super().__init__(f"{required} > {window}")


def plan(prompt: int, mandatory: int, window: int, max_output: int, min_output: int) -> Plan:
    if mandatory + min_output > window:
        raise WindowTooSmall(mandatory + min_output, window)
    output = min(max_output, window - mandatory)
    amount = min(prompt, window - output) + output
    return Plan(prompt, mandatory, window, max_output, min_output, amount,
                mandatory + min_output)  # fmt: skip


def _does_not_fit(
    target: Target,
    model: str,
    required: int,
    available: int,
    mandatory: int,
    min_output: int,
    indices: Sequence[int],
    limited_by: str,
) -> ContextError:
    shortfall = required - available
    limit = (
        f"{model or target.encoding}'s context window of {available} tokens"
        if limited_by == "WINDOW"
        else f"the {available} tokens the ledger granted"
    )
    text = (
        f"the system, pinned and input messages (indices {list(indices)}, with their tool calls "
        f"and results, tool definitions and reply priming) need {mandatory} prompt tokens, plus "
        f"{min_output} for the output makes {required}: more than {limit}, short by "
        f"{shortfall}; shorten or unpin messages, lower min_output_tokens, or use a model with "
        "a larger window"
    )
    code = (
        grpc.StatusCode.FAILED_PRECONDITION
        if limited_by == "WINDOW"
        else grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    metadata = {
        "required_tokens": str(required),
        "available_tokens": str(available),
        "shortfall_tokens": str(shortfall),
        "mandatory_prompt_tokens": str(mandatory),
        "min_output_tokens": str(min_output),
        "mandatory_indices": ",".join(map(str, indices)),
        "limited_by": limited_by,
    }
    return ContextError(code, REASON_DOES_NOT_FIT, text, metadata=metadata)


# --- responses -------------------------------------------------------------------------------


def _pb_message(m: ChatMessage) -> cpb.ChatMessage:
    return cpb.ChatMessage(
        role=PB_ROLES[m.role],
        content=m.content,
        name=m.name,
        pinned=m.pinned,
        priority=m.priority,
        tool_call_id=m.tool_call_id,
        tool_call_ids=m.tool_call_ids,
    )


def _limited_by(plan_: Plan, granted: int, budget: int, output: int) -> cpb.LimitedBy.ValueType:
    if budget >= plan_.prompt_tokens and output == plan_.max_output:
        return cpb.LIMITED_BY_NONE
    return cpb.LIMITED_BY_BUDGET if granted < plan_.amount else cpb.LIMITED_BY_WINDOW


def _breakdown(result: FitResult, counted: Counted, output: int) -> cpb.TokenBreakdown:
    b = result.breakdown
    return cpb.TokenBreakdown(
        system=b.system,
        pinned=b.pinned,
        history=b.history,
        tool_definitions=counted.tool_tokens,
        tool_results=b.tool_results,
        input=b.input,
        summary=b.summary,
        reply_priming=counted.reply_priming,
        output_reserve=output,
        prompt_total=result.tokens,
    )


def _summarizer_report(outcome: SummarizerOutcome | None) -> cpb.SummarizerReport:
    if outcome is None:
        return cpb.SummarizerReport(kind="extractive")
    return cpb.SummarizerReport(
        kind=outcome.kind,
        model=outcome.model,
        reservation_id=outcome.reservation_id,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        fallback_reason=outcome.fallback_reason,
    )


def fingerprint(request: message.Message) -> str:
    """Of the whole request, kept as a label on the hold: a different request under the same
    idempotency key then differs from the first and the ledger refuses it."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()[:32]


# --- the service -----------------------------------------------------------------------------


class ContextService(cpb_grpc.ContextServiceServicer):
    def __init__(
        self,
        counter: TokenCounter,
        ledger: LedgerClient,
        metrics: ContextMetrics,
        executor: Executor,
        *,
        registry: ModelRegistry,
        policy: AllocationPolicy,
        remote_summarizer: RemoteSummarizerConfig | None = None,
    ) -> None:
        self._counter = counter
        self._ledger = ledger
        self._metrics = metrics
        self._executor = executor
        self._registry = registry
        self._policy = policy
        self._remote = remote_summarizer

    async def _work(self, inline: bool, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking tokenization on the executor, keeping the event loop free; small
        requests inline. Tokenizer failures become errors that say so (never a silent 0)."""
        try:
            if inline:
                return fn(*args)
            ctx = contextvars.copy_context()  # the request's span follows into the worker
            call = functools.partial(ctx.run, fn, *args)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except TokenizerDataError as exc:
            raise ContextError(grpc.StatusCode.FAILED_PRECONDITION, "TOKENIZER_UNAVAILABLE",
                               f"cannot count: {exc}") from None  # fmt: skip
        except TokenizationError as exc:
            raise ContextError(grpc.StatusCode.INVALID_ARGUMENT, "TOKENIZATION_FAILED",
                               f"cannot count: {exc}") from None  # fmt: skip

    # --- CountTokens -------------------------------------------------------------------------

    async def CountTokens(
        self, request: cpb.CountTokensRequest, context: Context
    ) -> cpb.CountTokensResponse:
        c = Checker()
        c.text("model", request.model, chars_max=model_chars_max, pattern=_MODEL,
               required=not request.encoding)  # fmt: skip
        target, unknown = _resolve(c, self._registry, request.model, request.encoding, 0)
        if bool(request.messages) == bool(request.text):
            c.fail("messages", "exactly one of messages and text is required")
        messages, size = _messages(c, request.messages) if request.messages else ([], 0)
        if _content_bytes(request.text) > messages_content_bytes_max:
            c.fail("text", f"is over {messages_content_bytes_max} bytes")
        if request.tools and not request.messages:
            c.fail("tools", "are counted with messages only")
        tools = _tools(c, request.tools)
        _raise_violations(c, unknown, ", ".join(self._registry.families()))
        assert target is not None
        inline = max(size, len(request.text)) <= inline_count_bytes_max
        reply = await self._work(inline, self._count_reply, target, messages, tools, request.text)
        self._metrics.counted(reply.total_tokens, reply.encoding, "CountTokens")
        return reply

    def _count_reply(
        self, target: Target, messages: list[ChatMessage], tools: list[str], text: str
    ) -> cpb.CountTokensResponse:
        reply = cpb.CountTokensResponse(
            model_family=target.family,
            context_window_tokens=target.window_tokens if target.family else 0,
        )
        if text:
            counted = self._counter.count_text(target.count_target, text)
            reply.total_tokens, reply.encoding = counted.tokens, counted.encoding
            reply.exact, reply.method = counted.exact, counted.method
            return reply
        chat = count_conversation(self._counter, target, messages, tools)
        reply.total_tokens = chat.prompt_tokens
        reply.message_tokens.extend(chat.per_message)
        reply.reply_priming_tokens, reply.tool_tokens = chat.reply_priming, chat.tool_tokens
        reply.encoding, reply.exact, reply.method = chat.encoding, chat.exact, chat.method
        reply.chat_format = chat.chat_format
        reply.tool_method = TOOL_METHOD if tools else ""
        return reply

    # --- PrepareContext ----------------------------------------------------------------------

    async def PrepareContext(
        self, request: cpb.PrepareContextRequest, context: Context
    ) -> cpb.PrepareContextResponse:
        started = time.perf_counter()
        p = parse_prepare(request, self._registry, self._policy)
        remote = self._remote is not None and p.strategy is Strategy.SUMMARIZE
        inline = p.content_bytes <= inline_count_bytes_max and not remote
        counted, plan_ = await self._work(inline, self._plan, p)
        reply = await self._reserve(request, p, plan_, context)
        reservation = reply.reservation
        try:
            summarizer = self._summarizer(request, asyncio.get_running_loop()) if remote else None
            budget, output = plan_.split(reservation.amount)
            fitted = await self._work(inline, self._fit, p, counted, budget, summarizer)
        except DoesNotFit as exc:
            await self._rollback(request.tenant_id, reservation.reservation_id, "does not fit")
            limited = "BUDGET" if reservation.amount < plan_.amount else "WINDOW"
            raise _does_not_fit(p.target, request.model, exc.required_tokens + output,
                                reservation.amount, exc.required_tokens, output,
                                exc.mandatory_indices, limited) from None  # fmt: skip
        except asyncio.CancelledError:
            raise  # the hold stays for a retry with the same key, or expires
        except BaseException:
            await self._rollback(request.tenant_id, reservation.reservation_id, "internal error")
            raise
        response = self._response(request, p, counted, plan_, reply, fitted, budget, output)
        outcome = summarizer.outcome if summarizer else None
        if fitted.summarized or outcome is not None:
            response.summarizer.CopyFrom(_summarizer_report(outcome))
        self._record(p, counted, fitted, outcome, started)
        return response

    def _plan(self, p: Prepare) -> tuple[Counted, Plan]:
        counted = count_conversation(self._counter, p.target, p.messages, p.tools)
        count = message_count(self._counter, p.target, counted)
        mandatory, indices = mandatory_tokens(counted, p.strategy, count)
        try:
            plan_ = plan(counted.prompt_tokens, mandatory, p.target.window_tokens, p.max_output,
                         p.min_output)  # fmt: skip
        except WindowTooSmall as exc:
            raise _does_not_fit(p.target, p.model, exc.required, exc.window, mandatory,
                                p.min_output, indices, "WINDOW") from None  # fmt: skip
        return counted, plan_

    def _fit(
        self, p: Prepare, counted: Counted, budget: int, summarizer: RemoteSummarizer | None
    ) -> FitResult:
        count = message_count(self._counter, p.target, counted)
        fit_request = FitRequest(p.messages, budget, p.strategy, p.policy, counted.fixed_tokens)
        return fit(fit_request, count, summarizer)

    def _summarizer(
        self, request: cpb.PrepareContextRequest, loop: asyncio.AbstractEventLoop
    ) -> RemoteSummarizer:
        assert self._remote is not None
        account = Account(request.tenant_id, request.user_id, request.conversation_id)
        return RemoteSummarizer(self._remote, self._ledger, loop, account,
                                request.idempotency_key, int(request.ttl_seconds))  # fmt: skip

    async def _reserve(
        self,
        request: cpb.PrepareContextRequest,
        p: Prepare,
        plan_: Plan,
        context: Context,
    ) -> pb.ReserveResponse:
        ask = pb.ReserveRequest(
            idempotency_key=LEDGER_KEY_PREFIX + request.idempotency_key,
            tenant_id=request.tenant_id,
            user_id=request.user_id,
            conversation_id=request.conversation_id,
            model=request.model,
            amount=plan_.amount,
            min_amount=plan_.floor if plan_.floor < plan_.amount else 0,
            ttl_seconds=request.ttl_seconds,
            labels={
                "source": "context",
                "ctx.strategy": p.strategy.value,
                "ctx.request": fingerprint(request),
            },
        )
        try:
            return await self._ledger.reserve(ask, timeout_s=_remaining(context))
        except LedgerCallError as exc:
            floor = f"at least {plan_.floor}, " if plan_.floor < plan_.amount else ""
            raise ledger_refusal(
                exc,
                f"reserve {plan_.amount} tokens ({floor}the mandatory "
                f"messages need {plan_.mandatory_tokens} plus {p.min_output} for the output)",
            ) from None

    async def _rollback(self, tenant_id: str, reservation_id: str, reason: str) -> None:
        request = pb.RollbackRequest(
            tenant_id=tenant_id, reservation_id=reservation_id, reason=f"context: {reason}"
        )
        # If the ledger cannot be told, the hold expires by its TTL; the first error matters more.
        with contextlib.suppress(LedgerCallError):
            await self._ledger.rollback(request)

    def _response(
        self,
        request: cpb.PrepareContextRequest,
        p: Prepare,
        counted: Counted,
        plan_: Plan,
        reply: pb.ReserveResponse,
        fitted: FitResult,
        budget: int,
        output: int,
    ) -> cpb.PrepareContextResponse:
        granted = reply.reservation.amount
        response = cpb.PrepareContextResponse(
            reservation_id=reply.reservation.reservation_id,
            granted_tokens=granted,
            requested_tokens=plan_.amount,
            partial=reply.partial,
            breakdown=_breakdown(fitted, counted, output),
            original_prompt_tokens=fitted.original_tokens,
            dropped_indices=fitted.dropped,
            summarized_indices=fitted.summarized,
            truncated_indices=fitted.truncated,
            summary_tokens=fitted.summary_tokens,
            limited_by=_limited_by(plan_, granted, budget, output),
            strategy=PB_STRATEGIES[p.strategy],
            encoding=counted.encoding,
            exact=counted.exact,
            method=counted.method,
            warnings=reply.warnings,
            over_share=fitted.over_share,
            context_window_tokens=p.target.window_tokens,
            tokens_saved=fitted.tokens_saved,
        )
        if reply.HasField("suggestion"):
            response.suggestion.CopyFrom(reply.suggestion)
        truncated = set(fitted.truncated)
        for source, m in zip(fitted.sources, fitted.messages, strict=True):
            if source is None or source in truncated:
                response.messages.append(_pb_message(m))
            else:
                response.messages.append(request.messages[source])  # as sent: no re-encoding
            response.source_indices.append(-1 if source is None else source)
        return response

    def _record(
        self,
        p: Prepare,
        counted: Counted,
        fitted: FitResult,
        outcome: SummarizerOutcome | None,
        started: float,
    ) -> None:
        self._metrics.counted(counted.prompt_tokens, counted.encoding, "PrepareContext")
        if outcome is not None:
            result = "fallback" if outcome.fallback_reason else "ok"
            self._metrics.summarizer_calls.add(1, {"outcome": result})
        if fitted.fitted:
            self._metrics.fitted(
                p.strategy.value,
                pruned=bool(fitted.dropped),
                truncated=bool(fitted.truncated),
                summarized=bool(fitted.summarized),
                tokens_saved=fitted.tokens_saved,
            )
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._metrics.prepare_duration.record(elapsed_ms, {"strategy": p.strategy.value})


def _remaining(context: Context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining > 0 else None
