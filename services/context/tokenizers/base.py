"""What a tokenizer family declares: its exact encodings (with their rank files), its estimated
ones, its chat formats and the models it serves. Each family module fills in one
TokenizerFamily; the registry collects them.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import tiktoken

from services.context.messages import Role

MIB = 2**20
K = 1024  # as model cards count windows: 8K = 8192 tokens


class UnknownEncodingError(KeyError):
    """An encoding name that no family declares."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class RankFile:
    """One verified data file: its name in the data dir and the wheel member it is taken from."""

    encoding: str
    file_name: str
    sha256: str
    requirement: str
    member: str
    licence: str


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
    whole_chat: str = ""
    """Counted as a whole by an engine (chats.ENGINES: an official template, mistral-common)
    rather than message by message; the fields above then serve messages fitting creates."""
    rstrip_assistant: bool = False

    def template(self, role: Role) -> tuple[str, str]:
        prefix, suffix = self.message_prefix, self.message_suffix
        for r, p, s in self.role_templates:
            if r is role:
                prefix, suffix = p, s
        name = dict(self.role_names).get(role, role.value)
        return prefix.replace("{role}", name), suffix.replace("{role}", name)


# memory_bytes: resident-set growth after loading each encoding alone in a fresh Python 3.11
# process with tiktoken 0.14 (rounded up; the Python rank dict plus tiktoken's Rust tables).
# The pool sums these figures instead of sampling RSS, which is noisy in a threaded server.
@dataclass(frozen=True, slots=True)
class EncodingDef:
    """How to build one exact encoding, what it costs to hold, and the chat format used when a
    caller counts with the bare encoding name."""

    name: str
    build: Callable[[bytes], tiktoken.Encoding]
    memory_bytes: int
    rank_file: RankFile
    chat: ChatFormat
    nfc: bool = False


@dataclass(frozen=True, slots=True)
class Estimator:
    """A stand-in for a tokenizer we do not have: an exact count, then a correction."""

    name: str
    base: str
    method: str
    correct: Callable[[int, str], int]
    chat: ChatFormat


@dataclass(frozen=True, slots=True)
class ModelFamily:
    """Models that share an encoding and a chat format."""

    name: str
    encoding: str
    chat: ChatFormat
    models: tuple[tuple[str, int, int], ...]  # (name or prefix, context window, max output)


def _same(name: str) -> str:
    return name


@dataclass(frozen=True, slots=True)
class TokenizerFamily:
    """One family module's declaration.

    `aliases` are other spellings of its models (after lower-casing and dropping any "org/"
    prefix); `normalise` rewrites a lower-cased model name before lookup (e.g. a provider's
    punctuation) and must leave other families' names alone.
    """

    name: str
    encodings: tuple[EncodingDef, ...] = ()
    estimators: tuple[Estimator, ...] = ()
    models: tuple[ModelFamily, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    normalise: Callable[[str], str] = _same


def parse_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """The `.tiktoken` format: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks
