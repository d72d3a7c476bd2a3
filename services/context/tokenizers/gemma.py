"""Gemma: no public rank file, so an estimate: o200k_base with Gemma's digit splitting."""

from __future__ import annotations

import re

from services.context.messages import Role
from services.context.tokenizers.base import ChatFormat, Estimator, K, ModelFamily, TokenizerFamily
from services.context.tokenizers.openai import O200K

GEMMA_ESTIMATE = "gemma_estimate"

_DIGIT_RUN = re.compile(r"[0-9]+")


def _gemma_correction(base_count: int, text: str) -> int:
    # Gemma's SentencePiece splits every digit; o200k groups up to three per token.
    extra = 0
    for run in _DIGIT_RUN.finditer(text):
        n = run.end() - run.start()
        extra += n - (n + 2) // 3
    return base_count + extra


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

FAMILY = TokenizerFamily(
    "gemma",
    estimators=(
        Estimator(
            GEMMA_ESTIMATE, O200K, "estimate:o200k_base+split_digits", _gemma_correction, GEMMA_CHAT
        ),
    ),
    models=(
        ModelFamily(
            "gemma",
            GEMMA_ESTIMATE,
            GEMMA_CHAT,
            (
                ("gemma-2", 8 * K, 4 * K),
                ("gemma-3", 128 * K, 8 * K),
                ("gemma-3-1b", 32 * K, 8 * K),
                ("gemma-3-270m", 32 * K, 8 * K),
            ),
        ),
    ),
    aliases={"gemma2": "gemma-2", "gemma3": "gemma-3"},
)
