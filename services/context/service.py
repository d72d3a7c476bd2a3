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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2

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
from services.context.remote_summarizer import (
    Account,
    RemoteSummarizer,
    RemoteSummarizerConfig,
    SummarizerOutcome,
)
from services.context.requests import (
    PB_ROLES,
    PB_STRATEGIES,
    ContextError,
    Prepare,
    Target,
    parse_count,
    parse_prepare,
)
from services.context.tokenizers import (
    ModelRegistry,
    TokenCounter,
    TokenizationError,
    TokenizerDataError,
)
from services.platform.errors import error_info, pack

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

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


# --- errors ---------------------------------------------------------------------------------


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
            info = error_info("LEDGER_UNAVAILABLE", {"ledger_status": exc.code.name})
            delay = duration_pb2.Duration(seconds=LEDGER_RETRY_DELAY_S)
            retry = error_details_pb2.RetryInfo(retry_delay=delay)
            status.details.extend([info, pack(retry)])
        status.message = f"the ledger could not be reached to {what}: {exc.message}"
    else:
        status.message = f"the ledger refused to {what}: {exc.message}"
    return LedgerCallError(code, status.message, status)


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
        r = parse_count(request, self._registry)
        inline = r.content_bytes <= inline_count_bytes_max
        reply = await self._work(inline, self._count_reply, r.target, r.messages, r.tools, r.text)
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
