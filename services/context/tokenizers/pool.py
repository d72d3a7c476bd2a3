"""Exact encodings, loaded on first use from their verified rank files and held within a memory
bound. Special-token text inside content always counts as ordinary text."""

from __future__ import annotations

import itertools
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from services.context.tokenizers.base import EncodingDef, UnknownEncodingError
from services.context.tokenizers.data import read_verified, verified_path
from services.context.tokenizers.registry import ENCODINGS, check_known

POOL_MEMORY_BYTES_MAX_DEFAULT = 384 * 2**20  # all five exact encodings fit (284 MiB estimated)

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

    def count_with_specials(self, text: str) -> int:
        """Tokens of template text, in which every special token's text is that token (as
        Hugging Face tokenizers read a rendered chat template, content included)."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        pieces = [text] if len(text) <= WHITESPACE_RUN_CHARS_MAX else split_long_whitespace(text)
        try:
            return sum(len(self.encoding.encode(p, allowed_special="all")) for p in pieces)
        except BaseException as e:  # pyo3's PanicException derives from BaseException
            if type(e).__name__ != "PanicException":
                raise
            raise TokenizationError(f"{self.name} failed on {len(text)} chars: {e}") from None

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
        check_known(name)
        raise UnknownEncodingError(f"{name!r} is an estimate, not a loadable encoding")
    return definition


def load_encoding(name: str, data_dir: Path | None = None) -> LoadedEncoding:
    """Build one exact encoding from its verified rank file (TokenizerDataError if absent)."""
    definition = _definition(name)
    started = time.perf_counter()
    encoding = definition.build(read_verified(definition.rank_file, data_dir))
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
        self._verified: dict[str, Path] = {}
        self._last_used: dict[str, int] = {}
        self._clock = itertools.count()
        self._load_locks: dict[str, threading.Lock] = {}
        self._loads = 0
        self._evictions = 0
        self._load_s_total = 0.0

    def verified_file(self, name: str) -> Path:
        """The path of an encoding's verified rank file (TokenizerDataError if absent), checked
        by sha256 once (like a loaded encoding)."""
        found = self._verified.get(name)
        if found is None:
            found = verified_path(_definition(name).rank_file, self._data_dir)
            self._verified[name] = found
        return found

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
