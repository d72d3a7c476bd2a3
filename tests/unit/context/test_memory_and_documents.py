"""The pure parts of issue #19: which facts fit the memory's share, the retention ratio, where
a document chunk may end, and a plan's coverage on real tokenizers (no server)."""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import pytest

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services.context.documents import _kind, parse_plan, plan_chunks
from services.context.memory import Fact, insert_at, render, retention, select
from services.context.messages import ChatMessage, Role
from services.context.remote_summarizer import proposed_facts_count_max, split_facts
from services.context.tokenizer_data import DATA_DIR_ENV
from services.context.tokenizers import DEFAULT_REGISTRY, TokenCounter, TokenizerPool
from services.platform.errors import InvalidRequest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    data = Path(os.environ.get(DATA_DIR_ENV) or REPO / "var" / "tokenizers")
    return TokenCounter(TokenizerPool(data_dir=data))


def length(m: ChatMessage) -> int:
    """A stand-in count: one token per character (the selection only compares counts)."""
    return len(m.content)


def test_select_keeps_the_newest_facts_that_fit_and_tries_older_shorter_ones() -> None:
    facts = [Fact("old_short", "x", set_at_ms=1), Fact("mid_long", "y" * 50, set_at_ms=2),
             Fact("new", "z", set_at_ms=3)]  # fmt: skip
    room = len(render([facts[2], facts[0]]).content)
    chosen = select(facts, room, length)
    assert chosen.kept == ("new", "old_short") and chosen.left_out == ("mid_long",)
    assert chosen.message is not None and chosen.tokens == room
    assert chosen.message.role is Role.SYSTEM and chosen.message.pinned
    assert select(facts, 3, length).message is None
    assert select(facts, 3, length).left_out == ("new", "mid_long", "old_short")


def test_the_memory_goes_after_the_leading_system_messages() -> None:
    sys_, dev, user = (ChatMessage(Role.SYSTEM, "s"), ChatMessage(Role.DEVELOPER, "d"),
                       ChatMessage(Role.USER, "u"))  # fmt: skip
    assert insert_at([sys_, dev, user, sys_]) == 2
    assert insert_at([user]) == 0 and insert_at([sys_]) == 1


def test_retention_counts_memory_values_and_markers_found_in_the_original() -> None:
    original = [cpb.ChatMessage(content="my code is AB-1 and my room 12"),
                cpb.ChatMessage(content="ok")]  # fmt: skip
    fitted = [cpb.ChatMessage(content="- code: AB-1"), cpb.ChatMessage(content="ok")]
    facts = [Fact("code", "AB-1"), Fact("city", "Porto")]
    report = retention(facts, ["AB-1", "room 12", "nowhere"], original, fitted)
    assert (report.facts_total, report.facts_kept) == (4, 2)
    assert report.ratio == 0.5
    assert list(report.lost) == ["city", "room 12"]
    assert list(report.markers_not_in_original) == ["nowhere"]
    assert retention([], [], original, fitted).ratio == 1.0


@pytest.mark.parametrize(("text", "at", "kind"), [
    (b"One.\n\nTwo", 6, "paragraph"),
    (b"One.\n\nTwo", 5, "paragraph"),
    (b"One. Two", 5, "sentence"),
    (b"One. Two", 4, "sentence"),
    (b"Why? Two", 5, "sentence"),
    (b"3.14 is pi", 2, ""),
    (b"one two", 4, ""),
])  # fmt: skip
def test_a_chunk_ends_on_a_paragraph_or_a_sentence_end(text: bytes, at: int, kind: str) -> None:
    assert _kind(text, at) == kind


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "llama-3.1-8b", "qwen2.5-7b", "mistral-nemo"])
def test_a_plan_covers_every_token_with_exact_overlaps_for_each_exact_family(
    counter: TokenCounter, model: str
) -> None:
    text = "\n\n".join(f"Paragraph {i}. " + "Some words here, and more. " * (i % 9 + 1)
                       for i in range(300))  # fmt: skip
    request = cpb.PlanDocumentRequest(tenant_id="t", model=model, text=text, chunk_tokens=256,
                                      overlap_tokens=32)  # fmt: skip
    chunks, total = plan_chunks(counter, parse_plan(request, DEFAULT_REGISTRY))
    assert chunks[0].start_token == 0 and chunks[-1].end_token == total
    for before, c in itertools.pairwise(chunks):
        assert c.start_token == before.end_token - 32 and c.overlap_tokens == 32
    assert all(0 < c.tokens <= 256 for c in chunks)
    assert {c.boundary for c in chunks[:-1]} <= {"paragraph", "sentence"}
    data = text.encode()
    rebuilt = chunks[0].text + "".join(
        data[b.end_byte : c.end_byte].decode() for b, c in itertools.pairwise(chunks)
    )
    assert rebuilt == text
    assert all(data[c.start_byte : c.end_byte].decode() == c.text for c in chunks)


def test_proposed_facts_are_split_off_the_summary_checked_and_bounded() -> None:
    facts_line = '{"booking_code": "ZX-1", "bad key": "x", "n": 42, "e": " "}'
    text = "The user booked a hotel.\nFACTS: " + facts_line
    summary, facts, note = split_facts(text)
    assert summary == "The user booked a hotel."
    assert [(f.key, f.value) for f in facts] == [("booking_code", "ZX-1"), ("n", "42")]
    assert "'bad key'" in note and "'e'" in note
    many = "S.\nFACTS: " + json.dumps({f"k{i}": "v" for i in range(20)})
    summary, facts, note = split_facts(many)
    assert len(facts) == proposed_facts_count_max and "more than 16" in note
    assert split_facts("Only a summary.") == ("Only a summary.", (), "no FACTS line in the summary")
    assert split_facts("S.\nFACTS: [1, 2]")[1:] == ((), "the FACTS line is not a JSON object")
    assert split_facts("S.\nFACTS: {oops")[1:] == ((), "the FACTS line is not JSON")
    assert split_facts('S.\nFACTS: {"v": "a\\nb  c"}')[1][0].value == "a b c"


def test_random_multibyte_plans_cover_every_token_never_cut_a_character_and_always_advance(
    counter: TokenCounter,
) -> None:
    """Tiny chunks over emoji, CJK and accents (characters of several tokens): every plan
    covers the document in order, each chunk decodes to its byte range and fits its size, and
    each starts and ends later than the one before; a chunk too small for one character is
    refused naming chunk_tokens."""
    rng = random.Random(0)
    planned = refused = 0
    for _ in range(400):
        text = "".join(rng.choice("ab .\n€😀Ô東京 ") for _ in range(rng.randint(1, 80)))
        size = rng.randint(1, 12)
        model = rng.choice(["gpt-4o", "llama-3.1-8b", "gpt-4", "qwen2.5-7b", "mistral-nemo"])
        overlap = rng.randrange(size)
        request = cpb.PlanDocumentRequest(tenant_id="t", model=model, text=text,
                                          chunk_tokens=size, overlap_tokens=overlap)  # fmt: skip
        try:
            chunks, total = plan_chunks(counter, parse_plan(request, DEFAULT_REGISTRY))
        except InvalidRequest as exc:
            assert [f for f, _ in exc.violations] == ["chunk_tokens"]
            refused += 1
            continue
        planned += 1
        data = text.encode()
        assert chunks[0].start_token == 0 and chunks[-1].end_token == total
        for before, c in itertools.pairwise(chunks):
            assert c.start_token == before.end_token - c.overlap_tokens
            assert c.start_token > before.start_token and c.end_token > before.end_token
        for c in chunks:
            assert c.tokens <= size and data[c.start_byte : c.end_byte].decode() == c.text
    assert planned > 100 and refused > 10
