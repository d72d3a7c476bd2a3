"""Mistral's tekken (Mistral NeMo, Pixtral): exact, from mistral-common's file, with its v3
chat format."""

from __future__ import annotations

import base64
import json

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

TEKKEN = "tekken"

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


# mistral-common v3 tekken: <s>[INST]user[/INST]assistant</s>; the system prompt is prepended
# to the last user message with "\n\n"; tool results sit in [TOOL_RESULTS]...[/TOOL_RESULTS].
# Whole chats are encoded by mistral-common itself (mistral_chat.py); these fields serve the
# messages fitting creates (a cut message, a summary).
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
    whole_chat="mistral-common",
    rstrip_assistant=True,
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


TEKKEN_RANKS = RankFile(
    "tekken",
    "tekken_240718.json",
    "eccd1665d2e477697c33cb7f0daa6f6dfefc57a0a6bceb66d4be52952f827516",
    "mistral-common==1.13.1",
    "mistral_common/data/tekken_240718.json",
    "Apache-2.0 (mistral-common)",
)

# 56 MiB measured; loading peaks ~64 MiB higher while the JSON is parsed.
FAMILY = TokenizerFamily(
    "mistral",
    encodings=(EncodingDef(TEKKEN, _build_tekken, 58 * MIB, TEKKEN_RANKS, TEKKEN_CHAT),),
    models=(
        ModelFamily(
            "mistral-tekken",
            TEKKEN,
            TEKKEN_CHAT,
            (("mistral-nemo", 128 * K, 8 * K), ("pixtral-12b", 128 * K, 8 * K)),
        ),
    ),
    aliases={"open-mistral-nemo": "mistral-nemo"},
)
