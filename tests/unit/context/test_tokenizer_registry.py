"""The tokenizer registry: one module per family, each listed once, names never claimed twice."""

from __future__ import annotations

import importlib
import pkgutil

import services.context.tokenizers as package
from services.context.tokenizers.base import TokenizerFamily
from services.context.tokenizers.registry import (
    ENCODINGS,
    ESTIMATORS,
    FAMILIES,
    MODEL_FAMILIES,
    RANK_FILES,
    known_encodings,
)


def _family_modules() -> dict[str, TokenizerFamily]:
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, TokenizerFamily):
            found[info.name] = family
    return found


def test_every_module_that_declares_a_family_is_in_the_registry_once() -> None:
    declared = _family_modules()
    assert len(declared) >= 6
    assert sorted(f.name for f in FAMILIES) == sorted(f.name for f in declared.values())
    assert len({id(f) for f in FAMILIES}) == len(FAMILIES)


def test_no_encoding_or_model_name_is_claimed_by_two_families() -> None:
    encodings = [d.name for f in FAMILIES for d in f.encodings]
    encodings += [e.name for f in FAMILIES for e in f.estimators]
    assert len(encodings) == len(set(encodings)) == len(known_encodings())
    models = [key for m in MODEL_FAMILIES for key, _, _ in m.models]
    assert len(models) == len(set(models))
    aliases = [a for f in FAMILIES for a in f.aliases]
    assert len(aliases) == len(set(aliases))


def test_every_reference_between_families_resolves() -> None:
    """Estimates rest on an exact encoding, models on a known one, rank files on their own."""
    assert all(e.base in ENCODINGS for e in ESTIMATORS.values())
    assert all(m.encoding in known_encodings() for m in MODEL_FAMILIES)
    assert all(spec.encoding == name for name, spec in RANK_FILES.items())
    assert set(RANK_FILES) == set(ENCODINGS)
