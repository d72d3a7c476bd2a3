"""OpenAI: cl100k_base (gpt-3.5, gpt-4) and o200k_base (gpt-4o onwards), exact, with the
cookbook's chat format."""

from __future__ import annotations

import tiktoken

from services.context.tokenizers.base import (
    MIB,
    ChatFormat,
    EncodingDef,
    ModelFamily,
    RankFile,
    TokenizerFamily,
    parse_tiktoken_ranks,
)

CL100K = "cl100k_base"
O200K = "o200k_base"

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


_LITELLM = "litellm==1.106.2"
_LITELLM_DIR = "litellm/litellm_core_utils/tokenizers/"
# cl100k/o200k keep tiktoken's cache names (sha1 of the official URL), so the data dir also works
# as TIKTOKEN_CACHE_DIR and a populated TIKTOKEN_CACHE_DIR works as a source.
CL100K_RANKS = RankFile(
    "cl100k_base",
    "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    _LITELLM,
    _LITELLM_DIR + "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "MIT (OpenAI tiktoken data, shipped in litellm)",
)
O200K_RANKS = RankFile(
    "o200k_base",
    "fb374d419588a4632f3f557e76b4b70aebbca790",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    _LITELLM,
    _LITELLM_DIR + "fb374d419588a4632f3f557e76b4b70aebbca790",
    "MIT (OpenAI tiktoken data, shipped in litellm)",
)

# Measured 38 MiB (cl100k) and 74 MiB (o200k).
FAMILY = TokenizerFamily(
    "openai",
    encodings=(
        EncodingDef(CL100K, _build_cl100k, 40 * MIB, CL100K_RANKS, OPENAI_CHAT),
        EncodingDef(O200K, _build_o200k, 76 * MIB, O200K_RANKS, OPENAI_CHAT),
    ),
    models=(
        ModelFamily(
            "gpt-3.5",
            CL100K,
            OPENAI_CHAT,
            (("gpt-3.5-turbo", 16_385, 4_096), ("gpt-3.5-turbo-instruct", 4_096, 4_096)),
        ),
        ModelFamily(
            "gpt-4",
            CL100K,
            OPENAI_CHAT,
            (
                ("gpt-4", 8_192, 8_192),
                ("gpt-4-32k", 32_768, 32_768),
                ("gpt-4-turbo", 128_000, 4_096),
                ("gpt-4-1106", 128_000, 4_096),
                ("gpt-4-0125", 128_000, 4_096),
                ("gpt-4-vision", 128_000, 4_096),
            ),
        ),
        ModelFamily(
            "gpt-4o",
            O200K,
            OPENAI_CHAT,
            (("gpt-4o", 128_000, 16_384), ("gpt-4o-mini", 128_000, 16_384)),
        ),
        ModelFamily(
            "gpt-4.1",
            O200K,
            OPENAI_CHAT,
            (("gpt-4.1", 1_047_576, 32_768),),
        ),
        ModelFamily(
            "o-series",
            O200K,
            OPENAI_CHAT,
            (
                ("o1", 200_000, 100_000),
                ("o1-mini", 128_000, 65_536),
                ("o1-preview", 128_000, 32_768),
                ("o3", 200_000, 100_000),
                ("o3-mini", 200_000, 100_000),
                ("o4-mini", 200_000, 100_000),
            ),
        ),
        ModelFamily(
            "gpt-5",
            O200K,
            OPENAI_CHAT,
            (("gpt-5", 400_000, 128_000), ("gpt-5-chat", 128_000, 16_384)),
        ),
    ),
    aliases={
        "gpt-3.5": "gpt-3.5-turbo",
        "gpt-35-turbo": "gpt-3.5-turbo",
        "chatgpt-4o-latest": "gpt-4o",
        "gpt-4-turbo-preview": "gpt-4-turbo",
    },
)
