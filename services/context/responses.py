"""From the context service's results to its protobuf responses (the servicer's "map" step)."""

from __future__ import annotations

from collections.abc import Sequence

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.context.fitting import FitResult
from services.context.messages import ChatMessage, RenderOptions, ToolDef
from services.context.planning import Counted, Plan, count_conversation
from services.context.remote_summarizer import SummarizerOutcome
from services.context.requests import PB_ROLES, PB_STRATEGIES, Prepare, Target
from services.context.tokenizers import TokenCounter

LIMITED_BY = {
    "NONE": cpb.LIMITED_BY_NONE,
    "BUDGET": cpb.LIMITED_BY_BUDGET,
    "WINDOW": cpb.LIMITED_BY_WINDOW,
}


def count_reply(
    counter: TokenCounter,
    target: Target,
    messages: list[ChatMessage],
    tools: list[ToolDef],
    text: str,
    render: RenderOptions,
) -> cpb.CountTokensResponse:
    """CountTokens' answer: `text` alone if given, else the chat with its tools (it counts, so
    it runs where counting runs)."""
    reply = cpb.CountTokensResponse(
        model_family=target.family,
        context_window_tokens=target.window_tokens if target.family else 0,
    )
    if text:
        counted = counter.count_text(target.count_target, text)
        reply.total_tokens, reply.encoding = counted.tokens, counted.encoding
        reply.exact, reply.method = counted.exact, counted.method
        return reply
    chat = count_conversation(counter, target, messages, tools, render)
    reply.total_tokens = chat.prompt_tokens
    reply.message_tokens.extend(chat.per_message)
    reply.reply_priming_tokens, reply.tool_tokens = chat.reply_priming, chat.tool_tokens
    reply.encoding, reply.exact, reply.method = chat.encoding, chat.exact, chat.method
    reply.chat_format = chat.chat_format
    reply.tool_method = chat.tool_method
    return reply


def messages_to_send(
    request: cpb.PrepareContextRequest, response: cpb.PrepareContextResponse
) -> list[cpb.ChatMessage]:
    """The messages to send, from a MESSAGES_VIEW_WRITTEN response and its request: for each
    source index, the request's message, or (a summary, the memory message, a cut message)
    the next one the response carries."""
    written = iter(response.messages)
    rewritten = set(response.truncated_indices)
    return [
        next(written) if s < 0 or s in rewritten else request.messages[s]
        for s in response.source_indices
    ]


def _pb_message(m: ChatMessage) -> cpb.ChatMessage:
    return cpb.ChatMessage(
        role=PB_ROLES[m.role],
        content=m.content,
        name=m.name,
        pinned=m.pinned,
        priority=m.priority,
        tool_call_id=m.tool_call_id,
        tool_call_ids=m.tool_call_ids,
        tool_calls=[
            cpb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json)
            for c in m.tool_calls
        ],
    )


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


def prepare_response(
    request: cpb.PrepareContextRequest,
    p: Prepare,
    counted: Counted,
    plan: Plan,
    reply: pb.ReserveResponse,
    fitted: FitResult,
    output: int,
    outcome: SummarizerOutcome | None,
    sent: Sequence[cpb.ChatMessage] | None = None,
    memory_index: int = -1,
) -> cpb.PrepareContextResponse:
    """PrepareContext's answer. Messages kept as they were come back as sent (no re-encoding),
    or, under MESSAGES_VIEW_WRITTEN, not at all; `sent` is the request's messages as fitted
    with the memory message at `memory_index`, if not as sent."""
    granted = reply.reservation.amount
    budget = granted - output
    response = cpb.PrepareContextResponse(
        reservation_id=reply.reservation.reservation_id,
        granted_tokens=granted,
        requested_tokens=plan.amount,
        partial=reply.partial,
        breakdown=_breakdown(fitted, counted, output),
        original_prompt_tokens=fitted.original_tokens,
        dropped_indices=fitted.dropped,
        summarized_indices=fitted.summarized,
        truncated_indices=fitted.truncated,
        summary_tokens=fitted.summary_tokens,
        limited_by=LIMITED_BY[plan.limited_by(granted, budget, output)],
        strategy=PB_STRATEGIES[p.strategy],
        encoding=counted.encoding,
        exact=counted.exact,
        method=counted.method,
        warnings=reply.warnings,
        over_share=fitted.over_share,
        context_window_tokens=p.target.window_tokens,
        tokens_saved=fitted.tokens_saved,
        max_tokens=output,
    )
    if reply.HasField("suggestion"):
        response.suggestion.CopyFrom(reply.suggestion)
    truncated = set(fitted.truncated)
    sent = request.messages if sent is None else sent
    every = not p.written_only
    response.messages.extend(  # one extend copies faster than an append per message
        _pb_message(m) if source is None or source in truncated else sent[source]
        for source, m in zip(fitted.sources, fitted.messages, strict=True)
        if every or source is None or source in truncated or source == memory_index
    )
    response.source_indices.extend(-1 if s is None else s for s in fitted.sources)
    if fitted.summarized or outcome is not None:
        response.summarizer.CopyFrom(_summarizer_report(outcome))
    return response
