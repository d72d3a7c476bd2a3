"""What the model adapters (OpenAI SDK, LiteLLM) share and that does no I/O: who pays, the
policy, how much to reserve for a call, how a partial grant shrinks its max tokens, and how
a provider's usage becomes the ledger's disjoint kinds.

The hold is the prompt (counted before the call) plus the most the call may write: its
`max_tokens` / `max_completion_tokens` / `max_output_tokens`, or the policy's
`default_max_tokens` (then sent with the call, so that the hold bounds it). With
`allow_shrink`, a grant smaller than asked (at least the prompt plus `min_output_tokens`) is
taken, and the call's max tokens is cut to what was granted beyond the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client.errors import ClientError

MAX_TOKENS_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
DEFAULT_MAX_TOKENS = 1024
OUTPUT_TOKENS_MAX = 1_000_000


@dataclass(frozen=True)
class Payer:
    """The accounts a call is charged to."""

    tenant_id: str
    user_id: str
    conversation_id: str = ""

    def __post_init__(self) -> None:
        if not self.tenant_id or not self.user_id:
            raise ClientError("a metered call needs a tenant_id and a user_id to charge")


@dataclass(frozen=True)
class Policy:
    """How a call is metered.

    `default_max_tokens`: the output bound sent when the caller gives none. `allow_shrink`:
    accept a partial grant and lower the call's max tokens to fit it, down to
    `min_output_tokens`. `fail_open`: when the ledger cannot be reached, make the call
    anyway and record its usage afterwards if the ledger is back (default: fail closed —
    no call without a hold). `ttl_seconds`: the hold's expiry (0: the ledger's default).
    """

    default_max_tokens: int = DEFAULT_MAX_TOKENS
    allow_shrink: bool = False
    min_output_tokens: int = 1
    fail_open: bool = False
    ttl_seconds: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.default_max_tokens <= OUTPUT_TOKENS_MAX:
            raise ClientError(f"default_max_tokens must be 1 to {OUTPUT_TOKENS_MAX}")
        if not 0 < self.min_output_tokens <= self.default_max_tokens:
            raise ClientError("min_output_tokens must be 1 to default_max_tokens")


@dataclass(frozen=True)
class Plan:
    """The hold a call asks for."""

    prompt_tokens: int
    max_key: str
    max_output: int
    amount: int
    min_amount: int


def plan(kwargs: Mapping[str, Any], prompt_tokens: int, policy: Policy, max_key: str) -> Plan:
    """How much to hold for a call with these arguments; `max_key` is the argument its API
    bounds output with (the caller's own choice among MAX_TOKENS_KEYS wins)."""
    given = next((k for k in MAX_TOKENS_KEYS if kwargs.get(k) is not None), None)
    max_output = int(kwargs[given]) if given else policy.default_max_tokens
    if not 0 < max_output <= OUTPUT_TOKENS_MAX:
        raise ClientError(f"{given or 'max tokens'} must be 1 to {OUTPUT_TOKENS_MAX}")
    floor = min(policy.min_output_tokens, max_output)
    return Plan(
        prompt_tokens=prompt_tokens,
        max_key=given or max_key,
        max_output=max_output,
        amount=prompt_tokens + max_output,
        min_amount=prompt_tokens + floor if policy.allow_shrink else 0,
    )


def bound(kwargs: MutableMapping[str, Any], the_plan: Plan, granted: int) -> None:
    """Send the call's max tokens: what was planned, or less when the grant was partial."""
    kwargs[the_plan.max_key] = max(1, min(the_plan.max_output, granted - the_plan.prompt_tokens))


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def usage_from_openai(usage: Any) -> pb.Usage | None:
    """Chat Completions usage (`prompt_tokens`, `completion_tokens`, cached in
    `prompt_tokens_details`) or Responses usage (`input_tokens`, `output_tokens`, cached in
    `input_tokens_details`) as the ledger's disjoint kinds; None when there is none."""
    if usage is None:
        return None
    prompt = _get(usage, "prompt_tokens")
    if prompt is None:
        prompt = _get(usage, "input_tokens")
    output = _get(usage, "completion_tokens")
    if output is None:
        output = _get(usage, "output_tokens")
    if prompt is None and output is None:
        return None
    details = _get(usage, "prompt_tokens_details") or _get(usage, "input_tokens_details")
    cached = int(_get(details, "cached_tokens") or 0) if details is not None else 0
    prompt_tokens = int(prompt or 0)
    cached = min(cached, prompt_tokens)
    return pb.Usage(
        input_tokens=prompt_tokens - cached,
        output_tokens=int(output or 0),
        cached_input_tokens=cached,
    )


@dataclass
class Settlement:
    """How one metered call ended in the ledger: what was held (`granted` of `requested`),
    the max tokens sent, the usage committed (None when rolled back), and `outcome`:
    "committed", "rolled back", "unmetered" (fail_open while the ledger was away) or
    "unsettled" (the ledger could not be told; the hold expires at its TTL)."""

    reservation_id: str
    requested: int
    granted: int
    max_output_sent: int
    outcome: str = ""
    usage: pb.Usage | None = None
    estimated: bool = False
    """True when the usage was counted here (a stream cut before its usage chunk)."""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


OnSettled = Callable[[Settlement], None]
