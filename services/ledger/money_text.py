"""Money as people type and read it: currency units with up to six decimals ("2.50"), to and
from the ledger's integer micro-units, and shown three ways: exact (`money_exact`, for
exports), trimmed (`text_of`, for the CLI's answers) and rounded to the currency's minor unit
(`money_short`, for tables and the page). Integers and decimals only: no float touches money."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

MICROS = 1_000_000
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
_MINOR_UNITS = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "BHD": 3, "KWD": 3,
                "OMR": 3, "JOD": 3, "TND": 3}  # fmt: skip
"""ISO 4217 digits after the point where they are not 2."""


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


def money_exact(micros: int, currency: str = "") -> str:
    """`12.345678 USD`: every micro-unit, for exports and tooltips."""
    whole, fraction = divmod(abs(micros), MICROS)
    text = f"{'-' if micros < 0 else ''}{whole}.{fraction:06d}"
    return f"{text} {currency}" if currency else text


def money_short(micros: int, currency: str = "") -> str:
    """`$12.35`, `¥1,235`, `12.35 CHF`: rounded half up to the currency's minor unit, for
    tables and pages (exports keep `money_exact`'s digits)."""
    places = _MINOR_UNITS.get(currency, 2)
    amount = Decimal(micros).scaleb(-6).quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP)
    text = f"{abs(amount):,.{places}f}"
    sign = "-" if amount < 0 else ""
    symbol = _SYMBOLS.get(currency)
    if symbol:
        return f"{sign}{symbol}{text}"
    return f"{sign}{text} {currency}" if currency else f"{sign}{text}"
