"""The built-in extractive summarizer: offline, deterministic, never over its token limit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.context.messages import ChatMessage, Role
from services.context.summarizer import SENTENCE_CHARS_MAX, ExtractiveSummarizer
from tests.unit.context_fitting._support import assistant, result, user


def words(text: str) -> int:
    return len(text.split())


SPAN = [
    user("We deploy the billing service to Kubernetes. The billing database is PostgreSQL."),
    assistant("Billing runs three replicas. Nice weather today. The database has a replica too."),
    result("c1", "Billing pods: 3 running. Billing database: healthy."),
    user("Thanks!"),
]


def test_summary_is_deterministic() -> None:
    first = ExtractiveSummarizer().summarize(SPAN, 30, words)
    assert first
    assert all(ExtractiveSummarizer().summarize(SPAN, 30, words) == first for _ in range(5))


def test_summary_keeps_sentences_in_original_order_prefixed_by_role() -> None:
    summary = ExtractiveSummarizer().summarize(SPAN, 1000, words)
    lines = summary.splitlines()
    assert lines[0] == "Summary of 4 earlier messages:"
    assert lines[1].startswith("user: We deploy the billing service")
    assert lines[2].startswith("assistant: Billing runs three replicas.")
    assert lines[3].startswith("tool (search): Billing pods")
    # A sentence without content words ("Thanks!") carries nothing worth keeping.
    assert "Thanks" not in summary


def test_summary_prefers_topical_sentences_to_small_talk() -> None:
    summary = ExtractiveSummarizer().summarize(SPAN, 25, words)
    assert "billing" in summary.lower()
    assert "weather" not in summary


def test_summary_favours_what_the_latest_user_message_asks_about() -> None:
    span = [
        user("The cache uses Redis. The queue uses RabbitMQ."),
        assistant("The cache has two nodes. The queue has three nodes."),
    ]
    about_queue = ExtractiveSummarizer().summarize(span, 10, words, query="how is the queue set up")
    about_cache = ExtractiveSummarizer().summarize(span, 10, words, query="tell me about the cache")
    assert "queue" in about_queue and "cache" not in about_queue
    assert "cache" in about_cache and "queue" not in about_cache


def test_summary_is_empty_when_not_even_one_sentence_fits() -> None:
    assert ExtractiveSummarizer().summarize(SPAN, 6, words) == ""
    assert ExtractiveSummarizer().summarize(SPAN, 0, words) == ""
    assert ExtractiveSummarizer().summarize([user("ok!")], 100, words) == ""


def test_an_overlong_sentence_is_clipped() -> None:
    summary = ExtractiveSummarizer().summarize([user("word " * 1000)], 10_000, len)
    line = summary.splitlines()[1]
    assert line.endswith("…")
    assert len(line) <= len("user: ") + SENTENCE_CHARS_MAX


@settings(max_examples=150, deadline=None)
@given(
    contents=st.lists(
        st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta.", "eps!", "zeta?", "\n"])),
        min_size=1,
        max_size=8,
    ),
    max_tokens=st.integers(0, 60),
    per_char=st.booleans(),
)
def test_summary_never_exceeds_its_token_limit(
    contents: list[list[str]], max_tokens: int, per_char: bool
) -> None:
    """Whatever the span and the count function, count(summary) <= max_tokens."""
    span = [user(" ".join(c)) if i % 2 else assistant(" ".join(c)) for i, c in enumerate(contents)]
    measure = (lambda t: len(t) // 4) if per_char else words
    summary = ExtractiveSummarizer().summarize(span, max_tokens, measure)
    assert measure(summary) <= max_tokens
    assert summary == ExtractiveSummarizer().summarize(list(span), max_tokens, measure)


def test_summary_labels_a_named_message_with_its_name() -> None:
    span = [ChatMessage(Role.USER, "Deploys run nightly.", name="alice")]
    summary = ExtractiveSummarizer().summarize(span, 100, words)
    assert summary == "Summary of 1 earlier message:\nuser (alice): Deploys run nightly."
