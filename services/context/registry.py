"""Model names → encoding, exactness, context window, output cap and chat format.

Names resolve by the longest known name that is a prefix ending at a separator
("gpt-4o-mini-2024-07-18" → gpt-4o-mini, but "gpt-4o" is not gpt-4), after rewriting a leading
alias ("llama3.1:8b" → llama-3.1-8b). Provider prefixes such as "openai/" or "meta-llama/" and
fine-tune prefixes ("ft:") are ignored. An unknown name is an error;
a caller that knows better may count with an explicit encoding instead (see tokenizers).

Windows and output caps are the providers' published figures. Open-weight models have no output
cap of their own; theirs is the default serving cap noted per family.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.context.tokenizers import (
    CL100K,
    CLAUDE_CHAT,
    CLAUDE_ESTIMATE,
    GEMMA_CHAT,
    GEMMA_ESTIMATE,
    LLAMA3,
    LLAMA3_CHAT,
    O200K,
    OPENAI_CHAT,
    QWEN2,
    QWEN3_CHAT,
    QWEN25_CHAT,
    TEKKEN,
    TEKKEN_CHAT,
    ChatFormat,
    is_exact,
)

_SEPARATORS = "-@_ "


class UnknownModelError(LookupError):
    """A model name that no family in the registry claims."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model as the context service sees it (satisfies tokenizers.CountTarget)."""

    name: str
    family: str
    encoding: str
    exact: bool
    context_window_tokens: int
    max_output_tokens: int
    chat: ChatFormat


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    encoding: str
    chat: ChatFormat
    models: tuple[tuple[str, int, int], ...]  # (name or prefix, context window, max output)


K = 1024

FAMILIES: tuple[Family, ...] = (
    Family(
        "gpt-3.5",
        CL100K,
        OPENAI_CHAT,
        (("gpt-3.5-turbo", 16_385, 4_096), ("gpt-3.5-turbo-instruct", 4_096, 4_096)),
    ),
    Family(
        "gpt-4",
        CL100K,
        OPENAI_CHAT,
        (
            ("gpt-4", 8_192, 8_192),
            ("gpt-4-32k", 32_768, 32_768),
            ("gpt-4-turbo", 128_000, 4_096),
            ("gpt-4-1106", 128_000, 4_096),
            ("gpt-4-0125", 128_000, 4_096),
            ("gpt-4-vision", 128_000, 4_096),
        ),
    ),
    Family(
        "gpt-4o",
        O200K,
        OPENAI_CHAT,
        (("gpt-4o", 128_000, 16_384), ("gpt-4o-mini", 128_000, 16_384)),
    ),
    Family(
        "gpt-4.1",
        O200K,
        OPENAI_CHAT,
        (("gpt-4.1", 1_047_576, 32_768),),
    ),
    Family(
        "o-series",
        O200K,
        OPENAI_CHAT,
        (
            ("o1", 200_000, 100_000),
            ("o1-mini", 128_000, 65_536),
            ("o1-preview", 128_000, 32_768),
            ("o3", 200_000, 100_000),
            ("o3-mini", 200_000, 100_000),
            ("o4-mini", 200_000, 100_000),
        ),
    ),
    Family(
        "gpt-5",
        O200K,
        OPENAI_CHAT,
        (("gpt-5", 400_000, 128_000), ("gpt-5-chat", 128_000, 16_384)),
    ),
    # Llama 3.0 has an 8K window; 3.1-3.3 have 128K. Output cap: 8K serving default (4K on 3.0).
    Family(
        "llama-3",
        LLAMA3,
        LLAMA3_CHAT,
        (
            ("llama-3", 8 * K, 4 * K),
            ("llama-3.1", 128 * K, 8 * K),
            ("llama-3.2", 128 * K, 8 * K),
            ("llama-3.3", 128 * K, 8 * K),
        ),
    ),
    # Native windows (32K); Qwen's YaRN extension to 128K needs rope scaling set by the server.
    Family(
        "qwen2.5",
        QWEN2,
        QWEN25_CHAT,
        (("qwen2", 32 * K, 8 * K), ("qwen2.5", 32 * K, 8 * K)),
    ),
    Family("qwen3", QWEN2, QWEN3_CHAT, (("qwen3", 32 * K, 16 * K),)),
    Family(
        "mistral-tekken",
        TEKKEN,
        TEKKEN_CHAT,
        (("mistral-nemo", 128 * K, 8 * K), ("pixtral-12b", 128 * K, 8 * K)),
    ),
    Family(
        "gemma",
        GEMMA_ESTIMATE,
        GEMMA_CHAT,
        (
            ("gemma-2", 8 * K, 4 * K),
            ("gemma-3", 128 * K, 8 * K),
            ("gemma-3-1b", 32 * K, 8 * K),
            ("gemma-3-270m", 32 * K, 8 * K),
        ),
    ),
    Family(
        "claude",
        CLAUDE_ESTIMATE,
        CLAUDE_CHAT,
        (
            ("claude-3", 200_000, 4_096),
            ("claude-3-5", 200_000, 8_192),
            ("claude-3-7-sonnet", 200_000, 64_000),
            ("claude-sonnet-4", 200_000, 64_000),
            ("claude-sonnet-4-5", 200_000, 64_000),
            ("claude-opus-4", 200_000, 32_000),
            ("claude-opus-4-1", 200_000, 32_000),
            ("claude-opus-4-5", 200_000, 64_000),
            ("claude-haiku-4-5", 200_000, 64_000),
        ),
    ),
)

# Other spellings of the same models (after lower-casing and dropping any "org/" prefix).
ALIASES: dict[str, str] = {
    "gpt-3.5": "gpt-3.5-turbo",
    "gpt-35-turbo": "gpt-3.5-turbo",
    "chatgpt-4o-latest": "gpt-4o",
    "gpt-4-turbo-preview": "gpt-4-turbo",
    "llama3": "llama-3",
    "llama3.1": "llama-3.1",
    "llama3.2": "llama-3.2",
    "llama3.3": "llama-3.3",
    "meta-llama-3": "llama-3",
    "meta-llama-3.1": "llama-3.1",
    "qwen-2.5": "qwen2.5",
    "qwen-3": "qwen3",
    "open-mistral-nemo": "mistral-nemo",
    "gemma2": "gemma-2",
    "gemma3": "gemma-3",
}


class ModelRegistry:
    """Resolves model names to ModelSpecs."""

    def __init__(
        self, families: Iterable[Family] = FAMILIES, aliases: dict[str, str] | None = None
    ):
        self._families = tuple(families)
        self._aliases = dict(ALIASES if aliases is None else aliases)
        self._by_key: dict[str, ModelSpec] = {}
        for family in self._families:
            for key, window, output in family.models:
                self._by_key[key] = ModelSpec(
                    name=key,
                    family=family.name,
                    encoding=family.encoding,
                    exact=is_exact(family.encoding),
                    context_window_tokens=window,
                    max_output_tokens=output,
                    chat=family.chat,
                )
        # Longest first, so the most specific prefix (or alias) wins.
        self._keys = sorted(self._by_key, key=len, reverse=True)
        self._alias_keys = sorted(self._aliases, key=len, reverse=True)

    def families(self) -> tuple[str, ...]:
        return tuple(f.name for f in self._families)

    def models(self) -> tuple[str, ...]:
        return tuple(self._by_key)

    def resolve(self, model: str) -> ModelSpec:
        name = self._unalias(_normalise(model))
        for key in self._keys:
            if _has_prefix(name, key):
                return self._by_key[key]
        raise UnknownModelError(
            f"unknown model {model!r}; known families: {', '.join(self.families())} "
            "(or count with an explicit encoding)"
        )

    def _unalias(self, name: str) -> str:
        for alias in self._alias_keys:
            if _has_prefix(name, alias):
                return self._aliases[alias] + name[len(alias) :]
        return name


def _normalise(model: str) -> str:
    name = model.strip().lower()
    name = name.removeprefix("ft:")
    name = name.rsplit("/", 1)[-1].replace(":", "-")  # ollama tags: "llama3.1:8b"
    if name.startswith("claude-"):
        name = name.replace(".", "-")  # "claude-3.5-sonnet" (OpenRouter) → claude-3-5-sonnet
    return name


def _has_prefix(name: str, key: str) -> bool:
    if not key or not name.startswith(key):
        return False
    return len(name) == len(key) or name[len(key)] in _SEPARATORS


DEFAULT_REGISTRY = ModelRegistry()


def resolve_model(model: str) -> ModelSpec:
    """The default registry's ModelSpec for `model` (UnknownModelError if none)."""
    return DEFAULT_REGISTRY.resolve(model)
