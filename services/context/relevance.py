"""Lexical relevance for fitting and summarizing: lowercase word tokens, BM25 and IDF weights.

Small and dependency-free on purpose: it ranks a few hundred messages or sentences per request,
so an exact, deterministic pure-Python implementation is fast enough and easy to reason about.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

# Letters and digits of any script; "_" and punctuation split words.
_WORD = re.compile(r"[^\W_]+")

# Function words and chat fillers carry no topic; without them short documents rank by content,
# not by grammar.
_STOPWORDS_TEXT = """
    a about above after again all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers him his how i if in into is it its itself just me more
    most my no nor not now of off on once only or other our ours out over own same she should so
    some such than that the their theirs them then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you
    your yours
    ok okay thanks thank yes yeah sure please hi hello"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())

BM25_K1 = 1.2  # term-frequency saturation (the usual default)
BM25_B = 0.75  # length normalisation (the usual default)


def words(text: str) -> list[str]:
    """Lowercase word tokens of `text`, in order, stopwords included."""
    return _WORD.findall(text.lower())


def terms(text: str) -> list[str]:
    """Lowercase word tokens of `text` without stopwords: what relevance is computed on."""
    return [w for w in words(text) if w not in STOPWORDS]


def idf(documents: Sequence[Iterable[str]]) -> dict[str, float]:
    """BM25's inverse document frequency of every term, always positive (the "+1" variant)."""
    n = len(documents)
    df: Counter[str] = Counter()
    for doc in documents:
        df.update(set(doc))
    return {t: math.log(1.0 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}


class Bm25:
    """Okapi BM25 over a fixed list of tokenised documents."""

    def __init__(
        self, documents: Sequence[Sequence[str]], k1: float = BM25_K1, b: float = BM25_B
    ) -> None:
        self._tfs = [Counter(doc) for doc in documents]
        self._lengths = [len(doc) for doc in documents]
        self._avg_length = sum(self._lengths) / len(documents) if documents else 0.0
        self._idf = idf(documents)
        self._k1 = k1
        self._b = b

    def score(self, query: Iterable[str], index: int) -> float:
        """How well document `index` matches `query` (0.0 when they share no term)."""
        tf = self._tfs[index]
        # An empty corpus of words (all documents empty) has no length to normalise by.
        norm = self._lengths[index] / self._avg_length if self._avg_length else 1.0
        total = 0.0
        for term in set(query):
            f = tf.get(term, 0)
            if f:
                saturation = f * (self._k1 + 1) / (f + self._k1 * (1 - self._b + self._b * norm))
                total += self._idf[term] * saturation
        return total

    def scores(self, query: Iterable[str]) -> list[float]:
        """The score of every document against `query`, in document order."""
        q = list(query)
        return [self.score(q, i) for i in range(len(self._tfs))]


def normalised(scores: Sequence[float]) -> list[float]:
    """Scores scaled into [0, 1] by the largest one (all zeros stay zeros)."""
    top = max(scores, default=0.0)
    return [s / top for s in scores] if top > 0 else [0.0 for _ in scores]
