"""Money: prices per model and token kind, and the cost of usage, in integers only.

A price is in micro-units of the tenant's currency per million tokens (µ/Mtok), so the cost of
a call is a whole number of micro-units after one rounding: up, per event (at most one
micro-unit above the exact figure, and a budget never counts less than was spent). No float
touches money here or anywhere in the ledger (tests/unit/test_money.py reads the code to
prove it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ledger.model import PriceSet, Usage

TOKENS_PER_PRICE_UNIT = 1_000_000
"""A price is per this many tokens."""


@dataclass(frozen=True)
class Price:
    """Micro-units per million tokens, by usage kind."""

    input: int
    output: int
    cached_input: int

    @property
    def highest(self) -> int:
        return max(self.input, self.output, self.cached_input)

    @property
    def highest_prompt(self) -> int:
        """The most a prompt token may cost: it is billed as input or as cached input."""
        return max(self.input, self.cached_input)

    def cost(self, usage: Usage) -> int:
        """What `usage` costs, in micro-units, rounded up."""
        exact = (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cached_input_tokens * self.cached_input
        )
        return _ceil_div(exact, TOKENS_PER_PRICE_UNIT)

    def rises_from(self, old: Price) -> bool:
        """Whether some kind costs more than under `old`."""
        return (
            self.input > old.input
            or self.output > old.output
            or self.cached_input > old.cached_input
        )


@dataclass(frozen=True)
class PricePoint:
    """A model's price in force from `effective_from` until the next point's."""

    model: str
    effective_from: datetime
    currency: str
    price: Price


def point_of(event: PriceSet) -> PricePoint:
    """The price point a PriceSet event sets."""
    price = Price(event.input_per_mtok, event.output_per_mtok, event.cached_input_per_mtok)
    return PricePoint(event.model, event.effective_from, event.currency, price)


def with_point(points: tuple[PricePoint, ...], point: PricePoint) -> tuple[PricePoint, ...]:
    """A model's points with `point` added (replacing one at the same time), oldest first."""
    kept = [p for p in points if p.effective_from != point.effective_from]
    return tuple(sorted((*kept, point), key=lambda p: p.effective_from))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def price_at(points: Sequence[PricePoint], at: datetime) -> PricePoint | None:
    """The point in force at `at` (points of one model, oldest first), or None."""
    found = None
    for p in points:
        if p.effective_from > at:
            break
        found = p
    return found


def prices_during(points: Sequence[PricePoint], start: datetime, end: datetime) -> list[Price]:
    """Every price in force at some time in [start, end]: the one at `start` and those that
    take effect later, until `end`."""
    first = price_at(points, start)
    later = [p.price for p in points if start < p.effective_from <= end]
    return ([first.price] if first else []) + later


@dataclass(frozen=True)
class HoldPricing:
    """How a hold is priced: its tokens' upper bound in money.

    The prompt part (`prompt_tokens`, as the caller states it) at the highest prompt price,
    the rest at the highest price of any kind, each taken over every price in force during
    the hold's life (so a price change scheduled before it expires is covered)."""

    prompt: int
    any_kind: int
    prompt_tokens: int = 0

    @classmethod
    def over(cls, prices: Sequence[Price], prompt_tokens: int) -> HoldPricing:
        return cls(
            prompt=max(p.highest_prompt for p in prices),
            any_kind=max(p.highest for p in prices),
            prompt_tokens=prompt_tokens,
        )

    def bound(self, tokens: int) -> int:
        """The most `tokens` of the hold can cost, in micro-units (rounded up)."""
        prompt = min(self.prompt_tokens, tokens)
        exact = prompt * self.prompt + (tokens - prompt) * self.any_kind
        return _ceil_div(exact, TOKENS_PER_PRICE_UNIT)

    def affordable(self, money: int, tokens_max: int) -> int:
        """The most tokens (≤ tokens_max) whose bound fits in `money` micro-units."""
        if self.bound(tokens_max) <= money:
            return tokens_max
        low, high = 0, tokens_max  # bound(low) <= money < bound(high)
        while high - low > 1:
            mid = (low + high) // 2
            if self.bound(mid) <= money:
                low = mid
            else:
                high = mid
        return low
