"""Exact, offline token counting: tiktoken encodings built from verified rank files.

Exact encodings: cl100k_base, o200k_base (OpenAI), llama3 (Meta), qwen2 (Qwen 2/2.5/3) and tekken
(Mistral NeMo / Pixtral). Gemma and Claude have no public rank files, so their counts come from
an exact encoding plus a documented correction and are marked `exact=False`.

One module per family (openai, llama3, qwen, mistral, gemma, claude) declares its encodings,
rank files, chat formats and models (base.TokenizerFamily); `registry` lists the families and
derives the tables; `models` resolves model names; `data` reads verified rank files; `pool`
loads encodings lazily within a memory bound; `counter` counts text, messages and chats with a
per-message cache. A new family: one module and one line in registry.FAMILIES.
"""

from services.context.tokenizers.base import ChatFormat, UnknownEncodingError
from services.context.tokenizers.claude import CLAUDE_ESTIMATE
from services.context.tokenizers.counter import (
    COUNT_CACHE_ENTRIES_MAX_DEFAULT,
    ChatCount,
    CounterStats,
    CountTarget,
    TokenCounter,
)
from services.context.tokenizers.data import TokenizerDataError
from services.context.tokenizers.gemma import GEMMA_ESTIMATE
from services.context.tokenizers.llama3 import LLAMA3
from services.context.tokenizers.mistral import TEKKEN
from services.context.tokenizers.models import (
    DEFAULT_REGISTRY,
    ModelRegistry,
    ModelSpec,
    UnknownModelError,
    resolve_model,
)
from services.context.tokenizers.openai import CL100K, O200K
from services.context.tokenizers.pool import (
    POOL_MEMORY_BYTES_MAX_DEFAULT,
    TokenizationError,
    TokenizerPool,
    load_encoding,
    split_long_whitespace,
)
from services.context.tokenizers.qwen import QWEN2
from services.context.tokenizers.registry import ENCODINGS, is_exact, known_encodings, method_of

__all__ = [
    "CL100K",
    "CLAUDE_ESTIMATE",
    "COUNT_CACHE_ENTRIES_MAX_DEFAULT",
    "DEFAULT_REGISTRY",
    "ENCODINGS",
    "GEMMA_ESTIMATE",
    "LLAMA3",
    "O200K",
    "POOL_MEMORY_BYTES_MAX_DEFAULT",
    "QWEN2",
    "TEKKEN",
    "ChatCount",
    "ChatFormat",
    "CountTarget",
    "CounterStats",
    "ModelRegistry",
    "ModelSpec",
    "TokenCounter",
    "TokenizationError",
    "TokenizerDataError",
    "TokenizerPool",
    "UnknownEncodingError",
    "UnknownModelError",
    "is_exact",
    "known_encodings",
    "load_encoding",
    "method_of",
    "resolve_model",
    "split_long_whitespace",
]
