"""Summaries of the messages that fall out of the context window.

`Summarizer` is what fitting needs; `ExtractiveSummarizer` is the built-in one: offline,
deterministic, and it never exceeds the token limit it is given (measured with the caller's count).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.context.messages import ChatMessage
from services.context.relevance import idf, terms

TextCount = Callable[[str], int]  # tokens of a text as it will be sent (caller's tokenizer)

SENTENCE_CHARS_MAX = 400  # longer sentences are clipped: one code dump must not crowd out the rest
REJECTIONS_MAX = 64  # after this many candidates in a row that do not fit, the summary is full
QUERY_BOOST = 1.0  # extra weight of a term that also occurs in the latest user message

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class Summarizer(Protocol):
    """Turns the dropped span of a conversation into one text of at most `max_tokens`."""

    def summarize(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int,
        count: TextCount,
        *,
        query: str = "",
    ) -> str:
        """A summary of `messages` with `count(summary) <= max_tokens`, or "" if none fits.

        `query` is the latest user message, for summarizers that favour what it asks about.
        """
        ...


@dataclass(frozen=True, slots=True)
class _Sentence:
    message: int  # index into the summarized messages
    position: int  # order in the whole span
    text: str
    terms: tuple[str, ...]


def _label(message: ChatMessage) -> str:
    return f"{message.role.value} ({message.name})" if message.name else message.role.value


def _clip(sentence: str) -> str:
    if len(sentence) <= SENTENCE_CHARS_MAX:
        return sentence
    return sentence[: SENTENCE_CHARS_MAX - 1].rstrip() + "…"


def _sentences(messages: Sequence[ChatMessage]) -> list[_Sentence]:
    """Every sentence with at least one content word, in conversation order."""
    found: list[_Sentence] = []
    for index, message in enumerate(messages):
        for line in message.content.splitlines():
            for raw in _SENTENCE_END.split(line):
                text = _clip(raw.strip())
                sentence_terms = tuple(terms(text))
                if sentence_terms:
                    found.append(_Sentence(index, len(found), text, sentence_terms))
    return found


def _scores(sentences: Sequence[_Sentence], query: str) -> list[float]:
    """Frequency-in-span times rarity-across-sentences, boosted by the query, length-normalised."""
    frequency = Counter(t for s in sentences for t in s.terms)
    rarity = idf([s.terms for s in sentences])
    wanted = set(terms(query))
    weight = {
        t: (1.0 + math.log(f)) * rarity[t] * (1.0 + QUERY_BOOST * (t in wanted))
        for t, f in frequency.items()
    }
    # sqrt keeps long sentences from winning by length alone without favouring fragments.
    return [sum(weight[t] for t in set(s.terms)) / math.sqrt(len(s.terms)) for s in sentences]


def _render(messages: Sequence[ChatMessage], chosen: Sequence[_Sentence]) -> str:
    """The summary text: a header, then one line per message with its chosen sentences."""
    noun = "message" if len(messages) == 1 else "messages"
    lines = [f"Summary of {len(messages)} earlier {noun}:"]
    by_message: dict[int, list[str]] = {}
    for sentence in sorted(chosen, key=lambda s: s.position):
        by_message.setdefault(sentence.message, []).append(sentence.text)
    lines.extend(f"{_label(messages[i])}: {' '.join(texts)}" for i, texts in by_message.items())
    return "\n".join(lines)


class ExtractiveSummarizer:
    """Keeps the highest-scored sentences of the span, in their original order, role-prefixed.

    Sentences are scored by how frequent their words are in the span and how rare across its
    sentences (TF-IDF), with words of the latest user message weighted up. They are added best
    first while the rendered summary still fits `max_tokens`; ties go to the earlier sentence.
    """

    def summarize(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int,
        count: TextCount,
        *,
        query: str = "",
    ) -> str:
        sentences = _sentences(messages)
        if max_tokens <= 0 or not sentences:
            return ""
        scores = _scores(sentences, query)
        ranked = sorted(sentences, key=lambda s: (-scores[s.position], s.position))
        return self._greedy(messages, ranked, max_tokens, count)

    @staticmethod
    def _greedy(
        messages: Sequence[ChatMessage],
        ranked: Sequence[_Sentence],
        max_tokens: int,
        count: TextCount,
    ) -> str:
        """Add sentences best first while a bound on the summary's tokens fits: what is
        chosen so far, plus the sentence, plus its separator or its line's label. Counting
        each sentence alone keeps this linear; one exact count of the result confirms it
        (token counts of joined text are all but always at most the sum of the parts), and
        in the rare case they are not, the exact search decides."""
        header = count(_render(messages, []))
        if header >= max_tokens:  # not even one sentence after the header
            return ""
        overhead = count("")  # the message framing, counted once in `header`
        chosen: list[_Sentence] = []
        lines: set[int] = set()
        bound, rejections = header, 0
        for sentence in ranked:
            if rejections >= REJECTIONS_MAX:
                break
            joint = (
                " " if sentence.message in lines else f"\n{_label(messages[sentence.message])}: "
            )
            cost = count(joint + sentence.text) - overhead
            if bound + cost > max_tokens:
                rejections += 1
                continue
            chosen.append(sentence)
            lines.add(sentence.message)
            bound, rejections = bound + cost, 0
        text = _render(messages, chosen) if chosen else ""
        if not text or count(text) <= max_tokens:
            return text
        return ExtractiveSummarizer._exact_greedy(messages, ranked, max_tokens, count)

    @staticmethod
    def _exact_greedy(
        messages: Sequence[ChatMessage],
        ranked: Sequence[_Sentence],
        max_tokens: int,
        count: TextCount,
    ) -> str:
        """Like _greedy, but recounting the whole summary for every sentence."""
        chosen: list[_Sentence] = []
        best, rejections = "", 0
        for sentence in ranked:
            if rejections >= REJECTIONS_MAX:
                break
            text = _render(messages, [*chosen, sentence])
            if count(text) > max_tokens:
                rejections += 1
                continue
            chosen.append(sentence)
            best, rejections = text, 0
        return best
