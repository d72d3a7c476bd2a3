"""Mistral chats counted by mistral-common itself (the library Mistral's own serving uses), from
the tekken file we pin and verify (var/tokenizers/tekken_240718.json, the one mistral-common
1.13.1 ships).

`encode_chat_completion` validates the request, normalizes it (system messages joined with a
blank line and placed before the last user message, neighbouring messages of one role merged,
tools before the last user message) and concatenates BOS with each normalized message's tokens.
This module runs the same validation and normalization, then calls the same per-message
encoders, so the total is the library's own and each normalized message's share is known: it
is given to the first request message it came from (system prompts to the system messages,
the tool definitions apart).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from services.context.messages import ChatMessage, Role, ToolDef

MISTRAL_COMMON = "mistral-common==1.13.1"
_lock = threading.Lock()


class MistralRefused(ValueError):
    """mistral-common refused the conversation (the message says why)."""


@functools.cache
def _tokenizer(path: str) -> MistralTokenizer[Any, Any, Any, Any, Any]:
    with _lock:
        return MistralTokenizer.from_file(path)


@dataclass(frozen=True, slots=True)
class MistralCount:
    per_message: tuple[int, ...]
    fixed: int  # BOS, and an empty user turn the normalizer adds before a leading assistant
    tool_tokens: int

    @property
    def total(self) -> int:
        return sum(self.per_message) + self.fixed + self.tool_tokens


def _message(m: ChatMessage) -> Any:
    if m.role in (Role.SYSTEM, Role.DEVELOPER):
        return SystemMessage(content=m.content)
    if m.role is Role.USER:
        return UserMessage(content=m.content)
    if m.role is Role.TOOL:
        return ToolMessage(content=m.content, tool_call_id=m.tool_call_id)
    calls = [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments_json))
        for c in m.tool_calls
    ]
    return AssistantMessage(content=m.content or None, tool_calls=calls or None)


def _tool(t: ToolDef) -> Tool:
    return Tool(function=Function(name=t.name, description=t.description, parameters=t.parameters))


def _groups(messages: Sequence[ChatMessage]) -> list[int]:
    """The first request index of each message the normalizer keeps (runs of one role merge;
    system messages leave the list; each tool result stays its own)."""
    firsts: list[int] = []
    previous: Role | None = None
    for i, m in enumerate(messages):
        role = Role.SYSTEM if m.role is Role.DEVELOPER else m.role
        if role is Role.TOOL or (role is not Role.SYSTEM and role is not previous):
            firsts.append(i)
        previous = role
    return firsts


def count_mistral(
    data_file: Path, messages: Sequence[ChatMessage], tools: Sequence[ToolDef]
) -> MistralCount:
    tokenizer = _tokenizer(str(data_file))
    try:
        request = ChatCompletionRequest(
            messages=[_message(m) for m in messages], tools=[_tool(t) for t in tools] or None
        )
        validated = tokenizer._chat_completion_request_validator.validate_request(request)
        instruct = tokenizer._instruct_request_normalizer.from_chat_completion_request(validated)
        return _attribute(tokenizer, instruct, messages)
    except (MistralCommonException, ValueError, AssertionError) as exc:
        raise MistralRefused(f"mistral-common refuses this conversation: {exc}") from None


def _attribute(
    tokenizer: MistralTokenizer[Any, Any, Any, Any, Any],
    instruct: Any,
    messages: Sequence[ChatMessage],
) -> MistralCount:
    encoder: Any = tokenizer.instruct_tokenizer  # InstructTokenizerV3: the per-message encoders
    normalized = instruct.messages
    firsts = _groups(messages)
    leading = len(normalized) - len(firsts)  # an empty user turn the normalizer inserted
    per = [0] * len(messages)
    fixed = 1  # BOS
    tool_tokens = 0
    first_user, last_user = encoder.find_first_last_user(instruct)
    for k, msg in enumerate(normalized):
        if isinstance(msg, UserMessage) and k == last_user:
            n, tool_tokens = _user(encoder, instruct, msg, True, k == first_user, messages, per)
        else:
            n = _cached(encoder, msg, k < last_user, k == first_user)
        if k < leading:
            fixed += n
        else:
            per[firsts[k - leading]] += n
    return MistralCount(tuple(per), fixed, tool_tokens)


_CACHE_ENTRIES_MAX = 100_000
_cache: OrderedDict[bytes, int] = OrderedDict()


def _cached(encoder: Any, msg: Any, before_last_user: bool, first: bool) -> int:
    """Tokens of a message other than the last user turn (which carries the system prompt and
    the tools), cached by a hash of the message and its position flags: re-sent history is
    encoded once."""
    text = f"{type(msg).__name__}|{before_last_user}|{first}|{msg.model_dump_json()}"
    key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    with _lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    if isinstance(msg, UserMessage):
        n = len(encoder.encode_user_message(msg, None, False, first, system_prompt=None)[0])
    elif isinstance(msg, ToolMessage):
        n = len(encoder.encode_tool_message(msg, before_last_user)[0])
    else:
        n = len(encoder.encode_assistant_message(msg, before_last_user))
    with _lock:
        _cache[key] = n
        while len(_cache) > _CACHE_ENTRIES_MAX:
            _cache.popitem(last=False)
    return n


def _user(
    encoder: Any,
    instruct: Any,
    msg: UserMessage,
    last: bool,
    first: bool,
    messages: Sequence[ChatMessage],
    per: list[int],
) -> tuple[int, int]:
    """A user turn's own tokens and its tool definitions' (the last turn carries the tools and
    the system prompt, whose share goes to the system messages)."""
    system, tools = instruct.system_prompt, instruct.available_tools
    n = len(encoder.encode_user_message(msg, tools, last, first, system_prompt=system)[0])
    tool_tokens = 0
    if last and tools:
        bare = len(encoder.encode_user_message(msg, None, last, first, system_prompt=system)[0])
        tool_tokens, n = n - bare, bare
    if last and system:
        n -= _give_system(encoder, msg, first, system, messages, per)
    return n, tool_tokens


def _give_system(
    encoder: Any,
    user: UserMessage,
    first: bool,
    system_prompt: str,
    messages: Sequence[ChatMessage],
    per: list[int],
) -> int:
    """The system prompt's share of the last user turn, given to the system messages: each its
    own content's tokens, the last one the joins too."""
    without = len(encoder.encode_user_message(user, None, True, first, system_prompt=None)[0])
    full = len(encoder.encode_user_message(user, None, True, first, system_prompt=system_prompt)[0])
    systems = [i for i, m in enumerate(messages) if m.role in (Role.SYSTEM, Role.DEVELOPER)]
    share = 0
    for i in systems:
        per[i] = len(encoder.tokenizer.encode(messages[i].content, bos=False, eos=False))
        share += per[i]
    per[systems[-1]] += full - without - share
    return full - without
