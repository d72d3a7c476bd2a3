"""The context service from a backend: fit an OpenAI-format conversation to the model's window
and the user's budget (PrepareContext), and send what comes back.

    with ContextClient("context:50052") as ctx, LedgerClient("ledger:50051") as ledger:
        p = ctx.prepare(tenant_id="acme", user_id="ann", conversation_id="c-7",
                        model="gpt-4o", messages=history, max_tokens=1_000)
        reply = openai_client.chat.completions.create(
            model="gpt-4o", messages=p.messages, max_tokens=p.max_tokens)
        ledger.commit(tenant_id="acme", reservation_id=p.reservation_id,
                      usage=usage_from_openai(reply.usage))

The service answers with only the messages it wrote (MESSAGES_VIEW_WRITTEN): the messages it
kept are the caller's own objects, in the service's order, so nothing is echoed back and
every field the caller put on them (tool calls, anything else) goes to the model as it was.
A message whose content was cut is the caller's message with the cut content. The request is
built once with one idempotency key, so gRPC's retries (and the caller's own, with the same
`idempotency_key`) meet the first outcome: one hold, one answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services.client.channel import ContextChannels
from services.client.counting import ROLES, chat_message, tool_definition
from services.client.errors import ClientError

STRATEGIES = {
    "window": cpb.STRATEGY_WINDOW,
    "priority": cpb.STRATEGY_PRIORITY,
    "truncate": cpb.STRATEGY_TRUNCATE,
    "summarize": cpb.STRATEGY_SUMMARIZE,
}
_ROLE_NAMES = {v: k for k, v in ROLES.items() if k != "function"}


@dataclass(frozen=True)
class Prepared:
    """What to send and what was held. `messages`: the caller's messages the service kept
    (the same objects) and those it wrote (a summary, the memory message) as new dicts.
    `max_tokens`: what to send as the model's max tokens. The hold is `reservation_id` of
    `tenant_id`: commit it with the model's usage, or roll it back. `response` has the rest
    (breakdown, what was dropped, suggestion, retention...)."""

    messages: list[Mapping[str, Any]]
    max_tokens: int
    reservation_id: str
    tenant_id: str
    response: cpb.PrepareContextResponse


class ContextClient(ContextChannels):
    """A client of the context service's PrepareContext, blocking and asyncio alike; one
    channel of each kind, opened on first use (`target` and settings as ContextChannels)."""

    def __enter__(self) -> ContextClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ContextClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def prepare(self, **fields: Any) -> Prepared:
        """Fit and hold (see `request` for the fields); raises the service's refusal as a
        LedgerError subclass (InvalidArgument, BudgetExhausted, ...)."""
        messages, request = self.request(**fields)
        return prepared(messages, request, self._unary("PrepareContext", request))

    async def aprepare(self, **fields: Any) -> Prepared:
        """`prepare` on asyncio."""
        messages, request = self.request(**fields)
        return prepared(messages, request, await self._aunary("PrepareContext", request))

    @staticmethod
    def request(
        *,
        tenant_id: str,
        user_id: str,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int,
        tools: Sequence[Mapping[str, Any]] = (),
        strategy: str = "window",
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> tuple[list[Mapping[str, Any]], cpb.PrepareContextRequest]:
        """The PrepareContext request for OpenAI-format `messages` and `tools` (a provider
        prefix such as "openai/" is dropped from `model`); `strategy` is window, priority,
        truncate or summarize; `fields` are the request's other fields by their proto names
        (conversation_id, min_output_tokens, context_window_tokens, ttl_seconds, use_memory,
        output_hold, ...). ClientError names what is wrong before anything is sent."""
        if strategy not in STRATEGIES:
            raise ClientError(f"strategy is {strategy!r}; must be one of {', '.join(STRATEGIES)}")
        if "messages_view" in fields:
            raise ClientError("messages_view is the client's own (it rebuilds the messages)")
        listed = list(messages)
        try:
            request = cpb.PrepareContextRequest(
                idempotency_key=idempotency_key or uuid.uuid4().hex,
                tenant_id=tenant_id,
                user_id=user_id,
                model=model.rsplit("/", 1)[-1],
                messages=[chat_message(m) for m in listed],
                tools=[tool_definition(t) for t in tools],
                max_output_tokens=max_tokens,
                strategy=STRATEGIES[strategy],
                messages_view=cpb.MESSAGES_VIEW_WRITTEN,
                **fields,
            )
        except (TypeError, ValueError) as exc:
            raise ClientError(f"bad PrepareContext field: {exc}") from None
        return listed, request


def prepared(
    messages: list[Mapping[str, Any]],
    request: cpb.PrepareContextRequest,
    reply: cpb.PrepareContextResponse,
) -> Prepared:
    """The messages to send, by the rule of MESSAGES_VIEW_WRITTEN: for each source index, the
    caller's message, or the next one the service wrote (a cut message keeps the caller's
    other fields)."""
    written = iter(reply.messages)
    cut = set(reply.truncated_indices)
    out: list[Mapping[str, Any]] = []
    for source in reply.source_indices:
        if source < 0:
            out.append(_message(next(written)))
        elif source in cut:
            out.append({**messages[source], "content": next(written).content})
        else:
            out.append(messages[source])
    return Prepared(out, reply.max_tokens, reply.reservation_id, request.tenant_id, reply)


def _message(m: cpb.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": _ROLE_NAMES.get(m.role, "user"), "content": m.content}
    if m.name:
        out["name"] = m.name
    return out
