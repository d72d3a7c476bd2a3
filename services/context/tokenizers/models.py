"""Model names → encoding, exactness, context window, output cap and chat format.

Names resolve by the longest known name that is a prefix ending at a separator
("gpt-4o-mini-2024-07-18" → gpt-4o-mini, but "gpt-4o" is not gpt-4), after rewriting a leading
alias ("llama3.1:8b" → llama-3.1-8b). Provider prefixes such as "openai/" or "meta-llama/" and
fine-tune prefixes ("ft:") are ignored. An unknown name is an error;
a caller that knows better may count with an explicit encoding instead.

The models, their aliases and windows are declared by each family module (registry.FAMILIES).
Windows and output caps are the providers' published figures. Open-weight models have no output
cap of their own; theirs is the default serving cap noted per family.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.context.tokenizers.base import ChatFormat, ModelFamily
from services.context.tokenizers.registry import (
    ALIASES,
    MODEL_FAMILIES,
    is_exact,
    normalise_model,
)

_SEPARATORS = "-@_ "


class UnknownModelError(LookupError):
    """A model name that no family in the registry claims."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model as the context service sees it (satisfies counter.CountTarget)."""

    name: str
    family: str
    encoding: str
    exact: bool
    context_window_tokens: int
    max_output_tokens: int
    chat: ChatFormat


class ModelRegistry:
    """Resolves model names to ModelSpecs."""

    def __init__(
        self,
        families: Iterable[ModelFamily] = MODEL_FAMILIES,
        aliases: dict[str, str] | None = None,
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
    return normalise_model(name)


def _has_prefix(name: str, key: str) -> bool:
    if not key or not name.startswith(key):
        return False
    return len(name) == len(key) or name[len(key)] in _SEPARATORS


DEFAULT_REGISTRY = ModelRegistry()


def resolve_model(model: str) -> ModelSpec:
    """The default registry's ModelSpec for `model` (UnknownModelError if none)."""
    return DEFAULT_REGISTRY.resolve(model)
