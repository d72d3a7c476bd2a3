"""Money as people type and read it: currency units with up to six decimals ("2.50"), to and
from the ledger's integer micro-units. Parsed as decimals: no float touches money."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

MICROS = 1_000_000


def parser(high: int, *, signed: bool = False) -> Callable[[str], int]:
    """An argparse type: currency units to micro-units, within ±`high` micro-units."""

    def parse(text: str) -> int:
        try:
            value = Decimal(text.replace("_", ""))
        except InvalidOperation:
            raise argparse.ArgumentTypeError(f"{text!r} is not an amount (e.g. 2.50)") from None
        micros = value * MICROS if value.is_finite() else Decimal(-1)
        if micros != micros.to_integral_value() or (micros < 0 and not signed):
            sign = "" if signed else "0 or more, "
            raise argparse.ArgumentTypeError(f"{text!r}: {sign}with at most 6 decimals")
        if abs(micros) > high:
            raise argparse.ArgumentTypeError(f"{text} is beyond {text_of(high)}")
        return int(micros)

    return parse


def text_of(micros: int) -> str:
    """Micro-units as currency units: thousands separated, two to six decimals."""
    sign, whole = ("-" if micros < 0 else ""), abs(micros)
    units, fraction = divmod(whole, MICROS)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{units:,}.{digits}"


def with_currency(micros: int, currency: str) -> str:
    """With its currency, when the answer names it (a write's reply does not)."""
    return f"{text_of(micros)} {currency}" if currency else text_of(micros)
