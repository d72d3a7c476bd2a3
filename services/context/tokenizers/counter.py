"""Counting: text, single messages (with the chat template's overhead) and whole chats, for a
model or an explicitly named encoding, caching per-message counts by a hash of their content."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import tiktoken

from services.context.messages import (
    DEFAULT_RENDER,
    ChatMessage,
    RenderOptions,
    Role,
    ServingStack,
    ToolDef,
)
from services.context.tokenizers.base import ChatFormat
from services.context.tokenizers.chats import (
    JSON_TOOL_METHOD,
    MISTRAL_ENGINE,
    OPENAI_FUNC_INIT,
    TEMPLATES,
    WholeCount,
    count_template,
    count_with_mistral,
    json_tool_tokens,
    openai_tool_method,
    openai_tool_tokens,
    tool_call_tokens,
)
from services.context.tokenizers.pool import LoadedEncoding, PoolStats, TokenizerPool
from services.context.tokenizers.registry import (
    DEFAULT_CHAT_FORMATS,
    ENCODINGS,
    ESTIMATORS,
    METHODS,
    check_known,
)
from services.context.tokenizers.templates import RenderMismatch

COUNT_CACHE_ENTRIES_MAX_DEFAULT = 100_000

CacheKey = tuple[str, bytes]


def content_key(encoding: str, text: str) -> CacheKey:
    """(encoding, blake2b-128 of the UTF-8 text): the text itself is never held by the cache."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return encoding, digest


class CountCache:
    """A bounded, thread-safe LRU map from content key to token count, with hit counters."""

    def __init__(self, entries_max: int = COUNT_CACHE_ENTRIES_MAX_DEFAULT) -> None:
        if entries_max < 0:
            raise ValueError(f"entries_max must be >= 0, got {entries_max}")
        self.entries_max = entries_max
        self._entries: OrderedDict[CacheKey, int] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> int | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            return found

    def put(self, key: CacheKey, tokens: int) -> None:
        with self._lock:
            self._entries[key] = tokens
            self._entries.move_to_end(key)
            while len(self._entries) > self.entries_max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class CountTarget(Protocol):
    """What a count needs to know about a model (models.ModelSpec satisfies it)."""

    @property
    def encoding(self) -> str: ...

    @property
    def chat(self) -> ChatFormat: ...


class TextCount(NamedTuple):
    """A NamedTuple rather than a frozen dataclass: built per call on the hot path, 2x cheaper."""

    tokens: int
    encoding: str
    exact: bool
    method: str


@dataclass(frozen=True, slots=True)
class ChatCount:
    """total == sum(per_message) + reply_priming + tool_tokens. `reply_priming` is every token
    the template adds once per chat (BOS, an injected system block, the reply header)."""

    total: int
    per_message: tuple[int, ...]
    reply_priming: int
    encoding: str
    exact: bool
    method: str
    chat_format: str
    tool_tokens: int = 0
    tool_method: str = ""


@dataclass(frozen=True, slots=True)
class ChatOverhead:
    """Template tokens around each message, per role, and once per chat."""

    per_role: dict[Role, int]
    tokens_per_name: int
    reply_priming: int


@dataclass(frozen=True, slots=True)
class CounterStats:
    cache_hits: int
    cache_misses: int
    cache_hit_rate: float
    cache_entries: int
    tokens_encoded: int
    pool: PoolStats = field(repr=False)


def _resolve(target: CountTarget | str) -> tuple[str, ChatFormat]:
    if isinstance(target, str):
        check_known(target)
        return target, DEFAULT_CHAT_FORMATS[target]
    check_known(target.encoding)
    return target.encoding, target.chat


class TokenCounter:
    """Counts tokens for a model (a models.ModelSpec) or an explicitly named encoding."""

    def __init__(
        self, pool: TokenizerPool, cache_entries_max: int = COUNT_CACHE_ENTRIES_MAX_DEFAULT
    ) -> None:
        self._pool = pool
        self._cache = CountCache(cache_entries_max)
        self._overheads: dict[tuple[str, ChatFormat], ChatOverhead] = {}
        self._lock = threading.Lock()
        self._tokens_encoded = 0

    def count_text(self, target: CountTarget | str, text: str) -> TextCount:
        """Tokens of `text` alone (no chat overhead, no cache)."""
        encoding, _ = _resolve(target)
        tokens = self._encode_count(encoding, text)
        return TextCount(tokens, encoding, encoding in ENCODINGS, METHODS[encoding])

    def encoding(self, name: str) -> LoadedEncoding:
        """The loaded encoding itself, for work on token ids (document chunk plans)."""
        return self._pool.get(name)

    def count_message(self, target: CountTarget | str, message: ChatMessage) -> int:
        """Content + the template around it (+ the name, where the template renders one)."""
        encoding, chat = _resolve(target)
        return self._count_message(encoding, chat, self._overhead(encoding, chat), message)

    def count_chat(
        self,
        target: CountTarget | str,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolDef] = (),
        options: RenderOptions = DEFAULT_RENDER,
    ) -> ChatCount:
        """The chat as the serving stack renders it: by the family's whole-chat engine where it
        has one (TemplateRefused, MistralRefused when that refuses the chat), else message by
        message."""
        encoding, chat = _resolve(target)
        exact = encoding in ENCODINGS
        whole = None
        if chat.whole_chat and options.serving_stack is ServingStack.HF_TEMPLATE:
            try:
                whole = self._whole(encoding, chat.whole_chat, messages, tools, options)
            except RenderMismatch:
                exact = False  # content imitating the template: counted message by message
        if whole is None:
            whole, by_message_exact = self._by_message(encoding, chat, messages, tools, options)
            exact = exact and by_message_exact
        method = whole.method
        if any(m.tool_call_ids and not m.tool_calls for m in messages):
            exact, method = False, method + "+tool-call-ids-without-calls"
        return ChatCount(
            total=sum(whole.per_message) + whole.fixed + whole.tool_tokens,
            per_message=whole.per_message,
            reply_priming=whole.fixed,
            encoding=encoding,
            exact=exact,
            method=method,
            chat_format=chat.name,
            tool_tokens=whole.tool_tokens,
            tool_method=whole.tool_method,
        )

    def _whole(
        self,
        encoding: str,
        engine: str,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolDef],
        options: RenderOptions,
    ) -> WholeCount:
        if engine == MISTRAL_ENGINE:
            return count_with_mistral(self._pool.verified_file(encoding), messages, tools)
        count = functools.partial(self._cached_special_count, encoding)
        return count_template(TEMPLATES[engine], count, messages, tools, options)

    def _by_message(
        self,
        encoding: str,
        chat: ChatFormat,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolDef],
        options: RenderOptions,
    ) -> tuple[WholeCount, bool]:
        """Per-message overhead (the template approximated by prefix and suffix), tool calls and
        tool definitions estimated; exact only for plain chats of a family without an engine."""
        overhead = self._overhead(encoding, chat)
        per_message = tuple(self._count_message(encoding, chat, overhead, m) for m in messages)
        count = functools.partial(self._cached_count, encoding)
        if chat.name == "openai" and encoding in OPENAI_FUNC_INIT:
            tool_tokens = openai_tool_tokens(count, encoding, tools)
            tool_method = openai_tool_method(encoding)
        else:
            tool_tokens, tool_method = json_tool_tokens(count, tools), JSON_TOOL_METHOD
        agentic = any(m.tool_calls or m.role is Role.TOOL for m in messages)
        method = METHODS[encoding]
        if chat.whole_chat:
            method += f"+{options.serving_stack.value}:{chat.name}-message-format"
        elif agentic:
            method += "+tool-messages:estimate"
        exact = not (chat.whole_chat or agentic or tools)
        whole = WholeCount(per_message, overhead.reply_priming, tool_tokens, method,
                           tool_method if tools else "")  # fmt: skip
        return whole, exact

    def chat_overhead(self, target: CountTarget | str) -> ChatOverhead:
        """Template tokens per role and per chat, derived by encoding the template itself."""
        return self._overhead(*_resolve(target))

    def message_counter(self, target: CountTarget | str) -> Callable[[ChatMessage], int]:
        """count_message bound to one model: the shape fitting.Count expects."""
        encoding, chat = _resolve(target)
        return lambda m: self._count_message(encoding, chat, self._overhead(encoding, chat), m)

    def text_counter(self, target: CountTarget | str) -> Callable[[str], int]:
        """Token count of plain text for one model: the shape summarizer.TextCount expects."""
        encoding, _ = _resolve(target)
        return lambda text: self._encode_count(encoding, text)

    def stats(self) -> CounterStats:
        hits, misses = self._cache.hits, self._cache.misses
        return CounterStats(
            cache_hits=hits,
            cache_misses=misses,
            cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
            cache_entries=len(self._cache),
            tokens_encoded=self._tokens_encoded,
            pool=self._pool.stats(),
        )

    def _count_message(
        self, encoding: str, chat: ChatFormat, overhead: ChatOverhead, message: ChatMessage
    ) -> int:
        content = message.content.strip() if chat.strip_content else message.content
        if chat.rstrip_assistant and message.role is Role.ASSISTANT:
            content = content.rstrip(" ")
        tokens = overhead.per_role[message.role] + self._cached_count(encoding, content)
        if message.name and chat.names_rendered:
            tokens += overhead.tokens_per_name + self._cached_count(encoding, message.name)
        if message.tool_calls:
            tokens += tool_call_tokens(functools.partial(self._cached_count, encoding), message)
        return tokens

    def _cached_special_count(self, encoding: str, text: str) -> int:
        """Template text with its special tokens, cached like message content."""
        key = content_key("*" + encoding, text)
        found = self._cache.get(key)
        if found is None:
            found = self._pool.get(encoding).count_with_specials(text)
            self._cache.put(key, found)
            with self._lock:
                self._tokens_encoded += found
        return found

    def _overhead(self, encoding: str, chat: ChatFormat) -> ChatOverhead:
        found = self._overheads.get((encoding, chat))
        if found is None:
            found = _template_overhead(self._pool.get(_base_of(encoding)).encoding, chat)
            self._overheads[(encoding, chat)] = found
        return found

    def _cached_count(self, encoding: str, text: str) -> int:
        if not text:
            return 0
        key = content_key(encoding, text)
        found = self._cache.get(key)
        if found is None:
            found = self._encode_count(encoding, text)
            self._cache.put(key, found)
        return found

    def _encode_count(self, encoding: str, text: str) -> int:
        estimator = ESTIMATORS.get(encoding)
        if estimator is None:
            tokens = self._pool.get(encoding).count(text)
        else:
            tokens = estimator.correct(self._pool.get(estimator.base).count(text), text)
        with self._lock:
            self._tokens_encoded += tokens
        return tokens


def _base_of(encoding: str) -> str:
    estimator = ESTIMATORS.get(encoding)
    return estimator.base if estimator else encoding


def _template_overhead(encoding: tiktoken.Encoding, chat: ChatFormat) -> ChatOverhead:
    missing = chat.specials - encoding.special_tokens_set
    if missing:
        raise ValueError(f"chat format {chat.name} needs specials {encoding.name} lacks: {missing}")

    def tokens(text: str) -> int:
        return len(encoding.encode(text, allowed_special=chat.specials, disallowed_special=()))

    per_role = {
        role: chat.tokens_per_message + sum(tokens(part) for part in chat.template(role))
        for role in Role
    }
    reply = chat.reply_priming + tokens(chat.reply_prefix)
    return ChatOverhead(per_role, chat.tokens_per_name, reply)
