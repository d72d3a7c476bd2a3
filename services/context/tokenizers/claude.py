"""Claude: no public rank file, so an estimate: o200k_base scaled up, more for code."""

from __future__ import annotations

import math

from services.context.messages import Role
from services.context.tokenizers.base import ChatFormat, Estimator, ModelFamily, TokenizerFamily
from services.context.tokenizers.openai import O200K

CLAUDE_ESTIMATE = "claude_estimate"

_CODE_CHARS = "{}[]();=<>_/\\|*#$&"
CODE_CHAR_SHARE_MIN = 0.05
CLAUDE_PROSE_FACTOR = 1.20
CLAUDE_CODE_FACTOR = 1.30


def looks_like_code(text: str) -> bool:
    symbols = sum(text.count(c) for c in _CODE_CHARS)
    return symbols > CODE_CHAR_SHARE_MIN * len(text)


def _claude_correction(base_count: int, text: str) -> int:
    # Published comparisons (Claude 3.5 Sonnet vs GPT-4o) found ~16 % more tokens on English
    # and ~30 % on Python; we round up on purpose: an over-count only shrinks the window.
    factor = CLAUDE_CODE_FACTOR if looks_like_code(text) else CLAUDE_PROSE_FACTOR
    return math.ceil(base_count * factor)


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


def normalise(name: str) -> str:
    """ "claude-3.5-sonnet" (OpenRouter's spelling) → claude-3-5-sonnet."""
    return name.replace(".", "-") if name.startswith("claude-") else name


FAMILY = TokenizerFamily(
    "claude",
    estimators=(
        Estimator(
            CLAUDE_ESTIMATE,
            O200K,
            f"estimate:o200k_base*{CLAUDE_PROSE_FACTOR:.2f}|code*{CLAUDE_CODE_FACTOR:.2f}",
            _claude_correction,
            CLAUDE_CHAT,
        ),
    ),
    models=(
        ModelFamily(
            "claude",
            CLAUDE_ESTIMATE,
            CLAUDE_CHAT,
            (
                ("claude-3", 200_000, 4_096),
                ("claude-3-5", 200_000, 8_192),
                ("claude-3-7-sonnet", 200_000, 64_000),
                ("claude-sonnet-4", 200_000, 64_000),
                ("claude-sonnet-4-5", 200_000, 64_000),
                ("claude-opus-4", 200_000, 32_000),
                ("claude-opus-4-1", 200_000, 32_000),
                ("claude-opus-4-5", 200_000, 64_000),
                ("claude-haiku-4-5", 200_000, 64_000),
            ),
        ),
    ),
    normalise=normalise,
)
