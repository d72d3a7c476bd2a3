"""Meta Llama 3 (3.0 to 3.3): exact, from Meta's rank file, with Meta's chat format."""

from __future__ import annotations

import struct

import tiktoken

from services.context.messages import Role
from services.context.tokenizers.base import (
    MIB,
    ChatFormat,
    EncodingDef,
    K,
    ModelFamily,
    RankFile,
    TokenizerFamily,
)

LLAMA3 = "llama3"

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


# Llama 3.1, 3.2 and 3.3: the official Hugging Face template (templates/llama3.1.jinja) with its
# "Cutting Knowledge Date / Today Date" system block and JSON tool calls; the fields serve the
# messages fitting creates (a cut message, a summary) and the Ollama stack (an estimate).
LLAMA31_CHAT = ChatFormat(
    "llama3.1",
    message_prefix="<|start_header_id|>{role}<|end_header_id|>\n\n",
    message_suffix="<|eot_id|>",
    role_names=((Role.TOOL, "ipython"), (Role.DEVELOPER, "system")),
    specials=LLAMA3_CHAT.specials,
    reply_prefix="<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n",
    strip_content=True,
    whole_chat="llama3.1",
)


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


def _build_llama3(data: bytes) -> tiktoken.Encoding:
    ranks = parse_llama3_vocab(data)
    if len(ranks) != LLAMA3_SPECIALS_BASE:
        raise ValueError(f"llama3 vocab has {len(ranks)} ranks, expected {LLAMA3_SPECIALS_BASE}")
    return tiktoken.Encoding(
        LLAMA3, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=LLAMA3_SPECIALS
    )


LLAMA3_RANKS = RankFile(
    "llama3",
    "llama3.vocab",
    "124bfc185ea93e669e4ce2e1b5aa5733d2e793a910372fa198dfc1597e1220f2",
    "quicktok-v1==0.4.0",
    "quicktok/data/llama3.vocab",
    "Meta Llama 3 Community License (vocabulary, per quicktok's NOTICE)",
)

# 50 MiB measured. Llama 3.0 has an 8K window, 3.1-3.3 have 128K; output cap: the 8K serving
# default (4K on 3.0).
FAMILY = TokenizerFamily(
    "llama",
    encodings=(EncodingDef(LLAMA3, _build_llama3, 52 * MIB, LLAMA3_RANKS, LLAMA3_CHAT),),
    models=(
        ModelFamily("llama-3", LLAMA3, LLAMA3_CHAT, (("llama-3", 8 * K, 4 * K),)),
        ModelFamily(
            "llama-3.1+",
            LLAMA3,
            LLAMA31_CHAT,
            (
                ("llama-3.1", 128 * K, 8 * K),
                ("llama-3.2", 128 * K, 8 * K),
                ("llama-3.3", 128 * K, 8 * K),
            ),
        ),
    ),
    aliases={
        "llama3": "llama-3",
        "llama3.1": "llama-3.1",
        "llama3.2": "llama-3.2",
        "llama3.3": "llama-3.3",
        "meta-llama-3": "llama-3",
        "meta-llama-3.1": "llama-3.1",
    },
)
