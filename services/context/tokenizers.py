"""Exact, offline token counting: tiktoken encodings built from verified rank files.

Exact encodings: cl100k_base, o200k_base (OpenAI), llama3 (Meta), qwen2 (Qwen 2/2.5/3) and tekken
(Mistral NeMo / Pixtral). Gemma and Claude have no public rank files, so their counts come from
an exact encoding plus a documented correction and are marked `exact=False`.

A TokenizerPool loads encodings lazily and bounds their memory; a TokenCounter counts text, single
messages (with the chat template's overhead) and whole chats, caching per-message counts by a
hash of their content. Special-token text inside content always counts as ordinary text.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import re
import struct
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import tiktoken

from services.context.messages import ChatMessage, Role
from services.context.tokenizer_data import read_verified

CL100K = "cl100k_base"
O200K = "o200k_base"
LLAMA3 = "llama3"
QWEN2 = "qwen2"
TEKKEN = "tekken"
GEMMA_ESTIMATE = "gemma_estimate"
CLAUDE_ESTIMATE = "claude_estimate"

POOL_MEMORY_BYTES_MAX_DEFAULT = 384 * 2**20  # all five exact encodings fit (284 MiB estimated)
COUNT_CACHE_ENTRIES_MAX_DEFAULT = 100_000

_MIB = 2**20


class UnknownEncodingError(KeyError):
    """An encoding name that this module cannot build."""

    def __str__(self) -> str:
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------
# Split patterns and special tokens, each from its reference implementation.
# ---------------------------------------------------------------------------------------------

# tiktoken_ext/openai_public.py (tiktoken 0.14).
CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
CL100K_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
O200K_SPECIALS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}

# meta-llama/llama3, llama/tokenizer.py.
LLAMA3_PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_SPECIALS_BASE = 128_000
_LLAMA3_NAMED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
]
# Meta's list: the ten above, then reserved 5..250, 256 in all (128000..128255). Llama 3.1+
# renames three reserved ids (eom_id, python_tag, finetune_right_pad_id); ids are unchanged.
LLAMA3_SPECIALS = {
    tok: LLAMA3_SPECIALS_BASE + i
    for i, tok in enumerate(
        _LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
    )
}

# QwenLM tokenization_qwen.py PAT_STR; Qwen2/2.5/3 reuse it with an NFC normaliser.
QWEN2_PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIALS_BASE = 151_643
# Qwen2.5's added tokens (151643..151664) and Qwen3's four more (151665..151668).
QWEN2_SPECIALS = {
    tok: QWEN2_SPECIALS_BASE + i
    for i, tok in enumerate(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        ]
    )
}

# mistral-common tekken.py: a v3 file without "special_tokens" uses these 20 control tokens,
# padded with <SPECIAL_i> up to default_num_special_tokens; ordinary ids are rank + that number.
_TEKKEN_CONTROL = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]


# ---------------------------------------------------------------------------------------------
# Rank-file parsers and encoding builders.
# ---------------------------------------------------------------------------------------------


def parse_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """The `.tiktoken` format: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def parse_llama3_vocab(data: bytes) -> dict[bytes, int]:
    """quicktok's binary vocab: u32 count, then per token u16 length, bytes, u32 rank (LE)."""
    (count,) = struct.unpack_from("<I", data, 0)
    offset, ranks = 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        ranks[token] = rank
        offset += 6 + length
    if offset != len(data):
        raise ValueError(f"llama3 vocab: {len(data) - offset} trailing bytes")
    return ranks


def _build_cl100k(data: bytes) -> tiktoken.Encoding:
    ranks = parse_tiktoken_ranks(data)
    return tiktoken.Encoding(
        CL100K, pat_str=CL100K_PAT, mergeable_ranks=ranks, special_tokens=CL100K_SPECIALS
    )


def _build_o200k(data: bytes) -> tiktoken.Encoding:
    ranks = parse_tiktoken_ranks(data)
    return tiktoken.Encoding(
        O200K, pat_str=O200K_PAT, mergeable_ranks=ranks, special_tokens=O200K_SPECIALS
    )


def _build_llama3(data: bytes) -> tiktoken.Encoding:
    ranks = parse_llama3_vocab(data)
    if len(ranks) != LLAMA3_SPECIALS_BASE:
        raise ValueError(f"llama3 vocab has {len(ranks)} ranks, expected {LLAMA3_SPECIALS_BASE}")
    return tiktoken.Encoding(
        LLAMA3, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=LLAMA3_SPECIALS
    )


def _build_qwen2(data: bytes) -> tiktoken.Encoding:
    ranks = parse_tiktoken_ranks(data)
    if len(ranks) != QWEN2_SPECIALS_BASE:
        raise ValueError(f"qwen vocab has {len(ranks)} ranks, expected {QWEN2_SPECIALS_BASE}")
    return tiktoken.Encoding(
        QWEN2, pat_str=QWEN2_PAT, mergeable_ranks=ranks, special_tokens=QWEN2_SPECIALS
    )


def _build_tekken(data: bytes) -> tiktoken.Encoding:
    model = json.loads(data)
    config = model["config"]
    num_special = int(config["default_num_special_tokens"])
    inner = int(config["default_vocab_size"]) - num_special
    # Shifting every rank by the same amount keeps merge order, so tiktoken's ids are already
    # Mistral's ids (rank + num_special) and the control tokens can sit at 0..num_special-1.
    ranks = {
        base64.b64decode(t["token_bytes"]): int(t["rank"]) + num_special
        for t in model["vocab"][:inner]
    }
    names = _TEKKEN_CONTROL + [f"<SPECIAL_{i}>" for i in range(len(_TEKKEN_CONTROL), num_special)]
    specials = {tok: i for i, tok in enumerate(names)}
    return tiktoken.Encoding(
        TEKKEN, pat_str=config["pattern"], mergeable_ranks=ranks, special_tokens=specials
    )


@dataclass(frozen=True, slots=True)
class EncodingDef:
    """How to build one exact encoding, and what it costs to hold."""

    name: str
    build: Callable[[bytes], tiktoken.Encoding]
    memory_bytes: int
    nfc: bool = False


# memory_bytes: resident-set growth after loading each encoding alone in a fresh Python 3.11
# process with tiktoken 0.14 (measured 38/74/50/55/56 MiB, rounded up; the Python rank dict
# plus tiktoken's Rust tables). Loading tekken peaks ~64 MiB higher while its JSON is parsed.
# The pool sums these figures instead of sampling RSS, which is noisy in a threaded server.
ENCODINGS: dict[str, EncodingDef] = {
    d.name: d
    for d in (
        EncodingDef(CL100K, _build_cl100k, 40 * _MIB),
        EncodingDef(O200K, _build_o200k, 76 * _MIB),
        EncodingDef(LLAMA3, _build_llama3, 52 * _MIB),
        EncodingDef(QWEN2, _build_qwen2, 58 * _MIB, nfc=True),
        EncodingDef(TEKKEN, _build_tekken, 58 * _MIB),
    )
}


# ---------------------------------------------------------------------------------------------
# Estimated encodings.
# ---------------------------------------------------------------------------------------------

_DIGIT_RUN = re.compile(r"[0-9]+")
_CODE_CHARS = "{}[]();=<>_/\\|*#$&"
CODE_CHAR_SHARE_MIN = 0.05
CLAUDE_PROSE_FACTOR = 1.20
CLAUDE_CODE_FACTOR = 1.30


def _gemma_correction(base_count: int, text: str) -> int:
    # Gemma's SentencePiece splits every digit; o200k groups up to three per token.
    extra = 0
    for run in _DIGIT_RUN.finditer(text):
        n = run.end() - run.start()
        extra += n - (n + 2) // 3
    return base_count + extra


def looks_like_code(text: str) -> bool:
    symbols = sum(text.count(c) for c in _CODE_CHARS)
    return symbols > CODE_CHAR_SHARE_MIN * len(text)


def _claude_correction(base_count: int, text: str) -> int:
    # Published comparisons (Claude 3.5 Sonnet vs GPT-4o) found ~16 % more tokens on English
    # and ~30 % on Python; we round up on purpose: an over-count only shrinks the window.
    factor = CLAUDE_CODE_FACTOR if looks_like_code(text) else CLAUDE_PROSE_FACTOR
    return math.ceil(base_count * factor)


@dataclass(frozen=True, slots=True)
class Estimator:
    """A stand-in for a tokenizer we do not have: an exact count, then a correction."""

    name: str
    base: str
    method: str
    correct: Callable[[int, str], int]


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(GEMMA_ESTIMATE, O200K, "estimate:o200k_base+split_digits", _gemma_correction),
        Estimator(
            CLAUDE_ESTIMATE,
            O200K,
            f"estimate:o200k_base*{CLAUDE_PROSE_FACTOR:.2f}|code*{CLAUDE_CODE_FACTOR:.2f}",
            _claude_correction,
        ),
    )
}


METHODS: dict[str, str] = {
    **{name: f"exact:{name}" for name in ENCODINGS},
    **{e.name: e.method for e in ESTIMATORS.values()},
}


def known_encodings() -> tuple[str, ...]:
    return (*ENCODINGS, *ESTIMATORS)


def is_exact(encoding: str) -> bool:
    _check_known(encoding)
    return encoding in ENCODINGS


def method_of(encoding: str) -> str:
    _check_known(encoding)
    return METHODS[encoding]


def _check_known(encoding: str) -> None:
    if encoding not in METHODS:
        known = ", ".join(known_encodings())
        raise UnknownEncodingError(f"unknown encoding {encoding!r}; known: {known}")


# ---------------------------------------------------------------------------------------------
# Chat formats: the template around each message, from which overhead tokens are derived.
# ---------------------------------------------------------------------------------------------


# eq=False: identity hashing keeps the per-(encoding, format) overhead lookup cheap.
@dataclass(frozen=True, slots=True, eq=False)
class ChatFormat:
    """How a model's chat template wraps messages.

    Overhead = tokens_per_message + tokens of (prefix, suffix) with `{role}` filled in, encoded with
    `specials` as special tokens. `reply_prefix` (BOS and the header that primes the reply) and
    `reply_priming` are counted once per chat. Content is counted on its own, so a message whose
    content starts with whitespace may be off by one token against the joined template.
    """

    name: str
    message_prefix: str = ""
    message_suffix: str = ""
    role_templates: tuple[tuple[Role, str, str], ...] = ()
    role_names: tuple[tuple[Role, str], ...] = ()
    specials: frozenset[str] = frozenset()
    reply_prefix: str = ""
    tokens_per_message: int = 0
    tokens_per_name: int = 0
    reply_priming: int = 0
    names_rendered: bool = False
    strip_content: bool = False

    def template(self, role: Role) -> tuple[str, str]:
        prefix, suffix = self.message_prefix, self.message_suffix
        for r, p, s in self.role_templates:
            if r is role:
                prefix, suffix = p, s
        name = dict(self.role_names).get(role, role.value)
        return prefix.replace("{role}", name), suffix.replace("{role}", name)


# OpenAI cookbook "How to count tokens with tiktoken" (gpt-3.5-turbo-0613+, gpt-4, gpt-4o):
# 3 per message + the role's and content's tokens, 1 more + its tokens for a name, 3 to prime.
OPENAI_CHAT = ChatFormat(
    "openai",
    message_prefix="{role}",
    tokens_per_message=3,
    tokens_per_name=1,
    reply_priming=3,
    names_rendered=True,
)
# meta-llama/llama3 ChatFormat: header(role) + "\n\n", content.strip(), <|eot_id|>; BOS once.
LLAMA3_CHAT = ChatFormat(
    "llama3",
    message_prefix="<|start_header_id|>{role}<|end_header_id|>\n\n",
    message_suffix="<|eot_id|>",
    role_names=((Role.TOOL, "ipython"), (Role.DEVELOPER, "system")),
    specials=frozenset(
        {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    ),
    reply_prefix="<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n",
    strip_content=True,
)
_CHATML_SPECIALS = frozenset({"<|im_start|>", "<|im_end|>"})
_QWEN_TOOL = "<|im_start|>user\n<tool_response>\n", "\n</tool_response><|im_end|>\n"
# Qwen2.5 ChatML; a tool result is a user turn wrapped in <tool_response> (plain text in 2.5).
QWEN25_CHAT = ChatFormat(
    "chatml",
    message_prefix="<|im_start|>{role}\n",
    message_suffix="<|im_end|>\n",
    role_templates=((Role.TOOL, *_QWEN_TOOL),),
    role_names=((Role.DEVELOPER, "system"),),
    specials=_CHATML_SPECIALS,
    reply_prefix="<|im_start|>assistant\n",
)
# Qwen3: the same, but <tool_response> is a special token.
QWEN3_CHAT = ChatFormat(
    "chatml-qwen3",
    message_prefix="<|im_start|>{role}\n",
    message_suffix="<|im_end|>\n",
    role_templates=((Role.TOOL, *_QWEN_TOOL),),
    role_names=((Role.DEVELOPER, "system"),),
    specials=_CHATML_SPECIALS | {"<tool_response>", "</tool_response>"},
    reply_prefix="<|im_start|>assistant\n",
)
# mistral-common v3 tekken: <s>[INST]user[/INST]assistant</s>; the system prompt is prepended
# to the last user message with "\n\n"; tool results sit in [TOOL_RESULTS]...[/TOOL_RESULTS].
TEKKEN_CHAT = ChatFormat(
    "mistral-tekken",
    role_templates=(
        (Role.USER, "[INST]", "[/INST]"),
        (Role.ASSISTANT, "", "</s>"),
        (Role.SYSTEM, "", "\n\n"),
        (Role.DEVELOPER, "", "\n\n"),
        (Role.TOOL, "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
    ),
    specials=frozenset({"<s>", "</s>", "[INST]", "[/INST]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"}),
    reply_prefix="<s>",
)
# Gemma: <start_of_turn>{user|model}\n ... <end_of_turn>\n. The two markers are special tokens
# the proxy encoding lacks, so they are counted as constants; BOS + <start_of_turn> prime.
GEMMA_CHAT = ChatFormat(
    "gemma",
    message_prefix="{role}\n",
    message_suffix="\n",
    role_names=((Role.ASSISTANT, "model"), (Role.SYSTEM, "user"), (Role.DEVELOPER, "user")),
    reply_prefix="model\n",
    tokens_per_message=2,
    reply_priming=2,
)
# Claude's real template is not public; the legacy "\n\nHuman: ...\n\nAssistant:" text format
# stands in for it (the count is an estimate anyway).
CLAUDE_CHAT = ChatFormat(
    "claude-legacy",
    message_prefix="\n\n{role}: ",
    role_names=(
        (Role.USER, "Human"),
        (Role.ASSISTANT, "Assistant"),
        (Role.TOOL, "Human"),
        (Role.SYSTEM, "System"),
        (Role.DEVELOPER, "System"),
    ),
    reply_prefix="\n\nAssistant:",
)

DEFAULT_CHAT_FORMATS: dict[str, ChatFormat] = {
    CL100K: OPENAI_CHAT,
    O200K: OPENAI_CHAT,
    LLAMA3: LLAMA3_CHAT,
    QWEN2: QWEN25_CHAT,
    TEKKEN: TEKKEN_CHAT,
    GEMMA_ESTIMATE: GEMMA_CHAT,
    CLAUDE_ESTIMATE: CLAUDE_CHAT,
}


# ---------------------------------------------------------------------------------------------
# Loaded encodings and the pool.
# ---------------------------------------------------------------------------------------------


# tiktoken's regex engine overflows its stack (a pyo3 PanicException, not an Exception) on one
# horizontal-whitespace run of ~400k+ chars (measured: o200k, llama3, qwen2, tekken). Runs longer
# than this are cut, as Meta's reference llama3 tokenizer does; each cut may move a count by one.
WHITESPACE_RUN_CHARS_MAX = 25_000
_PROBE_STEP = WHITESPACE_RUN_CHARS_MAX // 2
_WHITESPACE_RUN = re.compile(r"\s+")
_LONG_WHITESPACE_RUN = re.compile(rf"\s{{{WHITESPACE_RUN_CHARS_MAX + 1},}}")


class TokenizationError(Exception):
    """The tokenizer itself failed on an input."""


def _has_long_whitespace_run(text: str) -> bool:
    # Any run of 2*step chars covers a probe with at least `step` whitespace from there on, so
    # probing every `step` chars finds it without scanning ordinary text.
    for probe in range(0, len(text), _PROBE_STEP):
        if text[probe].isspace():
            run = _WHITESPACE_RUN.match(text, probe)
            if run is not None and run.end() - probe >= _PROBE_STEP:
                return True
    return False


def split_long_whitespace(text: str) -> list[str]:
    """`text` in pieces, cutting only inside whitespace runs longer than the maximum."""
    if len(text) <= WHITESPACE_RUN_CHARS_MAX or not _has_long_whitespace_run(text):
        return [text]
    pieces, cut = [], 0
    for run in _LONG_WHITESPACE_RUN.finditer(text):
        for at in range(
            run.start() + WHITESPACE_RUN_CHARS_MAX, run.end(), WHITESPACE_RUN_CHARS_MAX
        ):
            pieces.append(text[cut:at])
            cut = at
    pieces.append(text[cut:])
    return pieces


@dataclass(frozen=True, slots=True)
class LoadedEncoding:
    """A built encoding and what it costs; `count` is the hot path."""

    name: str
    encoding: tiktoken.Encoding
    nfc: bool
    memory_bytes: int
    load_s: float

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as ordinary text (after NFC where the model normalises)."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        return [t for piece in split_long_whitespace(text) for t in self._ordinary(piece)]

    def count(self, text: str) -> int:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if len(text) <= WHITESPACE_RUN_CHARS_MAX:
            return len(self._ordinary(text))
        return sum(len(self._ordinary(piece)) for piece in split_long_whitespace(text))

    def _ordinary(self, text: str) -> list[int]:
        # encode_ordinary == encode(text, disallowed_special=()): special-token text in user
        # content is ordinary text, and never raises on it.
        try:
            return self.encoding.encode_ordinary(text)
        except BaseException as e:  # pyo3's PanicException derives from BaseException
            if type(e).__name__ != "PanicException":
                raise
            raise TokenizationError(f"{self.name} failed on {len(text)} chars: {e}") from None


@dataclass(frozen=True, slots=True)
class PoolStats:
    loaded: tuple[str, ...]  # least recently used first
    bytes_estimated: int
    memory_bytes_max: int
    loads: int
    evictions: int
    load_s_total: float


def _definition(name: str) -> EncodingDef:
    definition = ENCODINGS.get(name)
    if definition is None:
        _check_known(name)
        raise UnknownEncodingError(f"{name!r} is an estimate, not a loadable encoding")
    return definition


def load_encoding(name: str, data_dir: Path | None = None) -> LoadedEncoding:
    """Build one exact encoding from its verified rank file (TokenizerDataError if absent)."""
    definition = _definition(name)
    started = time.perf_counter()
    encoding = definition.build(read_verified(name, data_dir))
    elapsed = time.perf_counter() - started
    return LoadedEncoding(name, encoding, definition.nfc, definition.memory_bytes, elapsed)


class TokenizerPool:
    """Loads exact encodings on first use and evicts the least recently used past a memory bound.

    The bound is on the estimated bytes of loaded encodings (EncodingDef.memory_bytes). The one
    just requested always stays, even if it alone exceeds the bound: refusing would leave the
    service unable to count at all. Thread-safe; concurrent requests load an encoding once.
    """

    def __init__(
        self, memory_bytes_max: int = POOL_MEMORY_BYTES_MAX_DEFAULT, data_dir: Path | None = None
    ) -> None:
        if memory_bytes_max <= 0:
            raise ValueError(f"memory_bytes_max must be positive, got {memory_bytes_max}")
        self._memory_bytes_max = memory_bytes_max
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedEncoding] = {}
        self._last_used: dict[str, int] = {}
        self._clock = itertools.count()
        self._load_locks: dict[str, threading.Lock] = {}
        self._loads = 0
        self._evictions = 0
        self._load_s_total = 0.0

    def get(self, name: str) -> LoadedEncoding:
        found = self._touch(name)
        if found is not None:
            return found
        return self._load(name)

    def _touch(self, name: str) -> LoadedEncoding | None:
        # The hot path takes no lock: a dict read, a dict store and next() on itertools.count
        # are each atomic under the GIL, and _loaded only changes under the lock.
        found = self._loaded.get(name)
        if found is not None:
            self._last_used[name] = next(self._clock)
        return found

    def _load(self, name: str) -> LoadedEncoding:
        _definition(name)  # fail on unknown names before creating a lock for them
        with self._lock:
            load_lock = self._load_locks.setdefault(name, threading.Lock())
        with load_lock:
            found = self._touch(name)  # another thread may have loaded it meanwhile
            if found is not None:
                return found
            loaded = load_encoding(name, self._data_dir)
            self._admit(loaded)
            return loaded

    def _admit(self, loaded: LoadedEncoding) -> None:
        with self._lock:
            total = sum(e.memory_bytes for e in self._loaded.values())
            while self._loaded and total + loaded.memory_bytes > self._memory_bytes_max:
                victim = min(self._loaded, key=self._last_used.__getitem__)
                total -= self._loaded.pop(victim).memory_bytes
                self._evictions += 1
            self._loaded[loaded.name] = loaded
            self._last_used[loaded.name] = next(self._clock)
            self._loads += 1
            self._load_s_total += loaded.load_s

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                loaded=tuple(sorted(self._loaded, key=self._last_used.__getitem__)),
                bytes_estimated=sum(e.memory_bytes for e in self._loaded.values()),
                memory_bytes_max=self._memory_bytes_max,
                loads=self._loads,
                evictions=self._evictions,
                load_s_total=self._load_s_total,
            )


# ---------------------------------------------------------------------------------------------
# The per-message count cache.
# ---------------------------------------------------------------------------------------------

CacheKey = tuple[str, bytes]


def content_key(encoding: str, text: str) -> CacheKey:
    """(encoding, blake2b-128 of the UTF-8 text): the text itself is never held by the cache."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return encoding, digest


class CountCache:
    """A bounded, thread-safe LRU map from content key to token count, with hit counters."""

    def __init__(self, entries_max: int = COUNT_CACHE_ENTRIES_MAX_DEFAULT) -> None:
        if entries_max < 0:
            raise ValueError(f"entries_max must be >= 0, got {entries_max}")
        self.entries_max = entries_max
        self._entries: OrderedDict[CacheKey, int] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> int | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            return found

    def put(self, key: CacheKey, tokens: int) -> None:
        with self._lock:
            self._entries[key] = tokens
            self._entries.move_to_end(key)
            while len(self._entries) > self.entries_max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------------------------------------
# Counting.
# ---------------------------------------------------------------------------------------------


class CountTarget(Protocol):
    """What a count needs to know about a model (registry.ModelSpec satisfies it)."""

    @property
    def encoding(self) -> str: ...

    @property
    def chat(self) -> ChatFormat: ...


class TextCount(NamedTuple):
    """A NamedTuple rather than a frozen dataclass: built per call on the hot path, 2x cheaper."""

    tokens: int
    encoding: str
    exact: bool
    method: str


@dataclass(frozen=True, slots=True)
class ChatCount:
    """total == sum(per_message) + reply_priming."""

    total: int
    per_message: tuple[int, ...]
    reply_priming: int
    encoding: str
    exact: bool
    method: str
    chat_format: str


@dataclass(frozen=True, slots=True)
class ChatOverhead:
    """Template tokens around each message, per role, and once per chat."""

    per_role: dict[Role, int]
    tokens_per_name: int
    reply_priming: int


@dataclass(frozen=True, slots=True)
class CounterStats:
    cache_hits: int
    cache_misses: int
    cache_hit_rate: float
    cache_entries: int
    tokens_encoded: int
    pool: PoolStats = field(repr=False)


def _resolve(target: CountTarget | str) -> tuple[str, ChatFormat]:
    if isinstance(target, str):
        _check_known(target)
        return target, DEFAULT_CHAT_FORMATS[target]
    _check_known(target.encoding)
    return target.encoding, target.chat


class TokenCounter:
    """Counts tokens for a model (a registry.ModelSpec) or an explicitly named encoding."""

    def __init__(
        self, pool: TokenizerPool, cache_entries_max: int = COUNT_CACHE_ENTRIES_MAX_DEFAULT
    ) -> None:
        self._pool = pool
        self._cache = CountCache(cache_entries_max)
        self._overheads: dict[tuple[str, ChatFormat], ChatOverhead] = {}
        self._lock = threading.Lock()
        self._tokens_encoded = 0

    def count_text(self, target: CountTarget | str, text: str) -> TextCount:
        """Tokens of `text` alone (no chat overhead, no cache)."""
        encoding, _ = _resolve(target)
        tokens = self._encode_count(encoding, text)
        return TextCount(tokens, encoding, encoding in ENCODINGS, METHODS[encoding])

    def count_message(self, target: CountTarget | str, message: ChatMessage) -> int:
        """Content + the template around it (+ the name, where the template renders one)."""
        encoding, chat = _resolve(target)
        return self._count_message(encoding, chat, self._overhead(encoding, chat), message)

    def count_chat(self, target: CountTarget | str, messages: Sequence[ChatMessage]) -> ChatCount:
        encoding, chat = _resolve(target)
        overhead = self._overhead(encoding, chat)
        per_message = tuple(self._count_message(encoding, chat, overhead, m) for m in messages)
        return ChatCount(
            total=sum(per_message) + overhead.reply_priming,
            per_message=per_message,
            reply_priming=overhead.reply_priming,
            encoding=encoding,
            exact=encoding in ENCODINGS,
            method=METHODS[encoding],
            chat_format=chat.name,
        )

    def chat_overhead(self, target: CountTarget | str) -> ChatOverhead:
        """Template tokens per role and per chat, derived by encoding the template itself."""
        return self._overhead(*_resolve(target))

    def message_counter(self, target: CountTarget | str) -> Callable[[ChatMessage], int]:
        """count_message bound to one model: the shape fitting.Count expects."""
        encoding, chat = _resolve(target)
        return lambda m: self._count_message(encoding, chat, self._overhead(encoding, chat), m)

    def text_counter(self, target: CountTarget | str) -> Callable[[str], int]:
        """Token count of plain text for one model: the shape summarizer.TextCount expects."""
        encoding, _ = _resolve(target)
        return lambda text: self._encode_count(encoding, text)

    def stats(self) -> CounterStats:
        hits, misses = self._cache.hits, self._cache.misses
        return CounterStats(
            cache_hits=hits,
            cache_misses=misses,
            cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
            cache_entries=len(self._cache),
            tokens_encoded=self._tokens_encoded,
            pool=self._pool.stats(),
        )

    def _count_message(
        self, encoding: str, chat: ChatFormat, overhead: ChatOverhead, message: ChatMessage
    ) -> int:
        content = message.content.strip() if chat.strip_content else message.content
        tokens = overhead.per_role[message.role] + self._cached_count(encoding, content)
        if message.name and chat.names_rendered:
            tokens += overhead.tokens_per_name + self._cached_count(encoding, message.name)
        return tokens

    def _overhead(self, encoding: str, chat: ChatFormat) -> ChatOverhead:
        found = self._overheads.get((encoding, chat))
        if found is None:
            found = _template_overhead(self._pool.get(_base_of(encoding)).encoding, chat)
            self._overheads[(encoding, chat)] = found
        return found

    def _cached_count(self, encoding: str, text: str) -> int:
        if not text:
            return 0
        key = content_key(encoding, text)
        found = self._cache.get(key)
        if found is None:
            found = self._encode_count(encoding, text)
            self._cache.put(key, found)
        return found

    def _encode_count(self, encoding: str, text: str) -> int:
        estimator = ESTIMATORS.get(encoding)
        if estimator is None:
            tokens = self._pool.get(encoding).count(text)
        else:
            tokens = estimator.correct(self._pool.get(estimator.base).count(text), text)
        with self._lock:
            self._tokens_encoded += tokens
        return tokens


def _base_of(encoding: str) -> str:
    estimator = ESTIMATORS.get(encoding)
    return estimator.base if estimator else encoding


def _template_overhead(encoding: tiktoken.Encoding, chat: ChatFormat) -> ChatOverhead:
    missing = chat.specials - encoding.special_tokens_set
    if missing:
        raise ValueError(f"chat format {chat.name} needs specials {encoding.name} lacks: {missing}")

    def tokens(text: str) -> int:
        return len(encoding.encode(text, allowed_special=chat.specials, disallowed_special=()))

    per_role = {
        role: chat.tokens_per_message + sum(tokens(part) for part in chat.template(role))
        for role in Role
    }
    reply = chat.reply_priming + tokens(chat.reply_prefix)
    return ChatOverhead(per_role, chat.tokens_per_name, reply)
