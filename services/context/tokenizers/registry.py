"""The registry: every tokenizer family, one line each, and the tables derived from them.

A new family is a module beside this one that declares a `FAMILY` (see base.TokenizerFamily),
plus its line in FAMILIES. Order matters only for listings ("known families: ...").
"""

from __future__ import annotations

from services.context.tokenizers import claude, gemma, llama3, mistral, openai, qwen
from services.context.tokenizers.base import (
    ChatFormat,
    EncodingDef,
    Estimator,
    ModelFamily,
    RankFile,
    TokenizerFamily,
    UnknownEncodingError,
)

FAMILIES: tuple[TokenizerFamily, ...] = (
    openai.FAMILY,
    llama3.FAMILY,
    qwen.FAMILY,
    mistral.FAMILY,
    gemma.FAMILY,
    claude.FAMILY,
)

ENCODINGS: dict[str, EncodingDef] = {d.name: d for f in FAMILIES for d in f.encodings}
"""The exact encodings, loadable from their verified rank files."""
ESTIMATORS: dict[str, Estimator] = {e.name: e for f in FAMILIES for e in f.estimators}
METHODS: dict[str, str] = {
    **{name: f"exact:{name}" for name in ENCODINGS},
    **{e.name: e.method for e in ESTIMATORS.values()},
}
DEFAULT_CHAT_FORMATS: dict[str, ChatFormat] = {
    **{d.name: d.chat for d in ENCODINGS.values()},
    **{e.name: e.chat for e in ESTIMATORS.values()},
}
RANK_FILES: dict[str, RankFile] = {d.name: d.rank_file for d in ENCODINGS.values()}
MODEL_FAMILIES: tuple[ModelFamily, ...] = tuple(m for f in FAMILIES for m in f.models)
ALIASES: dict[str, str] = {a: name for f in FAMILIES for a, name in f.aliases.items()}


def known_encodings() -> tuple[str, ...]:
    return (*ENCODINGS, *ESTIMATORS)


def check_known(encoding: str) -> None:
    if encoding not in METHODS:
        known = ", ".join(known_encodings())
        raise UnknownEncodingError(f"unknown encoding {encoding!r}; known: {known}")


def is_exact(encoding: str) -> bool:
    check_known(encoding)
    return encoding in ENCODINGS


def method_of(encoding: str) -> str:
    check_known(encoding)
    return METHODS[encoding]


def normalise_model(name: str) -> str:
    """Every family's rewrite of a lower-cased model name, in registry order."""
    for family in FAMILIES:
        name = family.normalise(name)
    return name
