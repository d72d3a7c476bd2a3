"""Counting a prompt before the call, so that the hold covers it.

`Counter` is what the adapters need: the tokens of a chat (messages and tools, with the
template's overhead) and of a plain text (what a stream delivered before it was cut).
`ContextServiceCounter` asks the context service (CountTokens), which counts exactly for the
model's family, offline; any object with the two methods counts in-process instead (e.g.
`litellm.token_counter` in the LiteLLM callback).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services.client.channel import ContextChannels

ROLES = {
    "system": cpb.CHAT_ROLE_SYSTEM,
    "developer": cpb.CHAT_ROLE_DEVELOPER,
    "user": cpb.CHAT_ROLE_USER,
    "assistant": cpb.CHAT_ROLE_ASSISTANT,
    "tool": cpb.CHAT_ROLE_TOOL,
    "function": cpb.CHAT_ROLE_TOOL,
}


class Counter(Protocol):
    def count_chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()
    ) -> int: ...

    def count_text(self, model: str, text: str) -> int: ...


class AsyncCounter(Protocol):
    async def acount_chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()
    ) -> int: ...

    async def acount_text(self, model: str, text: str) -> int: ...


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        parts = (p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
        return "\n".join(p for p in parts if p)
    return str(content)


def _tool_call(call: Mapping[str, Any]) -> cpb.ToolCall | None:
    """An OpenAI tool call (`{"id", "function": {"name", "arguments"}}`) as the service's
    ToolCall; None when it lacks an id or a name, or its arguments are not a JSON object."""
    spec = call.get("function", call)
    arguments = spec.get("arguments") or "{}"
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, separators=(",", ":"))
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return None
    if not (call.get("id") and spec.get("name") and isinstance(parsed, dict)):
        return None
    return cpb.ToolCall(id=str(call["id"]), name=str(spec["name"]), arguments_json=arguments)


def chat_message(message: Mapping[str, Any]) -> cpb.ChatMessage:
    """An OpenAI-style message as the context service counts it. An assistant message's tool
    calls go as tool calls, which the service counts as the model's family formats them; if
    any is malformed (no id or name, arguments not a JSON object), they all count as their
    JSON text instead (estimated), since the model still reads them."""
    role = ROLES.get(str(message.get("role", "")), cpb.CHAT_ROLE_USER)
    calls = list(message.get("tool_calls") or ())
    content = _text(message.get("content"))
    out = cpb.ChatMessage(role=role, name=str(message.get("name") or ""))
    if role == cpb.CHAT_ROLE_TOOL:
        out.tool_call_id = str(message.get("tool_call_id") or "")
    elif calls:
        converted = [_tool_call(c) for c in calls]
        if all(c is not None for c in converted):
            out.tool_calls.extend(c for c in converted if c is not None)
        else:
            content = content or json.dumps(
                [c.get("function", c) for c in calls], separators=(",", ":")
            )
            out.tool_call_ids.extend(str(c["id"]) for c in calls if c.get("id"))
    out.content = content
    return out


def tool_definition(tool: Mapping[str, Any]) -> cpb.ToolDefinition:
    spec = tool.get("function", tool)
    return cpb.ToolDefinition(
        name=str(spec.get("name", "")),
        description=str(spec.get("description") or ""),
        parameters_json=json.dumps(spec["parameters"]) if spec.get("parameters") else "",
    )


def responses_input(value: Any, instructions: str | None = None) -> list[dict[str, Any]]:
    """The Responses API's `input` (a string or a list of items) as chat messages."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        return [*messages, {"role": "user", "content": value}]
    for item in value or ():
        if isinstance(item, Mapping) and "role" in item:
            messages.append({"role": item["role"], "content": item.get("content")})
        elif isinstance(item, Mapping) and item.get("type") == "function_call_output":
            messages.append({"role": "tool", "content": str(item.get("output", ""))})
    return messages


class ContextServiceCounter(ContextChannels):
    """Counts with the context service's CountTokens (exact for the model's family). Give
    `encoding` to count a model the service does not know (e.g. "o200k_base")."""

    def __init__(self, target: str, *, encoding: str = "", **kwargs: Any) -> None:
        """`kwargs`: as ContextChannels takes them."""
        super().__init__(target, **kwargs)
        self.encoding = encoding

    def _request(
        self, model: str, messages: Sequence[Mapping[str, Any]] = (), tools: Sequence[Any] = (),
        text: str = "",
    ) -> cpb.CountTokensRequest:  # fmt: skip
        return cpb.CountTokensRequest(
            model="" if self.encoding else model.rsplit("/", 1)[-1],
            encoding=self.encoding,
            messages=[chat_message(m) for m in messages],
            tools=[tool_definition(t) for t in tools or ()],
            text=text,
        )

    def _call(self, request: cpb.CountTokensRequest) -> int:
        return int(self._unary("CountTokens", request).total_tokens)

    async def _acall(self, request: cpb.CountTokensRequest) -> int:
        return int((await self._aunary("CountTokens", request)).total_tokens)

    def count_chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()
    ) -> int:
        return self._call(self._request(model, messages, tools))

    def count_text(self, model: str, text: str) -> int:
        return self._call(self._request(model, text=text)) if text else 0

    async def acount_chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()
    ) -> int:
        return await self._acall(self._request(model, messages, tools))

    async def acount_text(self, model: str, text: str) -> int:
        return await self._acall(self._request(model, text=text)) if text else 0
