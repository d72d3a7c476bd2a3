"""Lexical relevance: word tokens and BM25."""

from __future__ import annotations

import pytest

from services.context.relevance import Bm25, normalised, terms, words


def test_words_are_lowercase_and_split_on_punctuation() -> None:
    assert words("Hello, World! snake_case Zürich 42x") == [
        "hello",
        "world",
        "snake",
        "case",
        "zürich",
        "42x",
    ]


def test_terms_leave_out_stopwords() -> None:
    assert terms("What is the status of the deploy?") == ["status", "deploy"]


def test_bm25_ranks_the_matching_document_first_and_unrelated_at_zero() -> None:
    docs = [terms("the weather is sunny"), terms("postgres vacuum settings"), terms("postgres")]
    scores = Bm25(docs).scores(terms("tune postgres vacuum"))
    assert scores[0] == 0.0
    assert scores[1] > scores[2] > 0.0


def test_bm25_weighs_a_rare_term_above_a_common_one() -> None:
    docs = [["deploy", "rollback"], ["deploy"], ["deploy"], ["deploy", "canary"]]
    index = Bm25(docs)
    assert index.score(["rollback"], 0) > index.score(["deploy"], 0)


def test_bm25_of_empty_documents_is_zero() -> None:
    assert Bm25([[], []]).scores(["x"]) == [0.0, 0.0]


@pytest.mark.parametrize(
    ("scores", "expected"),
    [([2.0, 1.0, 0.0], [1.0, 0.5, 0.0]), ([0.0, 0.0], [0.0, 0.0]), ([], [])],
)
def test_normalised_scales_by_the_largest(scores: list[float], expected: list[float]) -> None:
    assert normalised(scores) == expected
