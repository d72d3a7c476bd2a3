"""Money in integers: costs against an exact rational reference, the hold's bound against any
usage it covers, and the code read to prove that no float touches money."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from math import ceil
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ledger import limits
from ledger.model import Usage
from ledger.money import HoldPricing, Price, PricePoint, price_at, prices_during

REPO = Path(__file__).resolve().parents[2]
MONEY_MODULES = (
    "ledger/money.py",
    "services/ledger/cli_prices.py",
    "services/ledger/money_text.py",
    "services/ledger/reports.py",
)
"""Modules that are money through and through: no float in them at all."""
MONEY_FUNCTIONS = {
    "ledger/domain.py": ("hold_pricing", "cost_at", "_money_room", "_evolve_money",
                         "_decide_set_prices", "_price_start", "headroom"),
    "ledger/usage.py": ("_cost", "usage_delta"),
    "services/ledger/convert.py": ("set_prices", "price", "balance"),
}  # fmt: skip
"""Functions elsewhere that compute or carry money."""

prices = st.builds(
    Price,
    st.integers(0, limits.price_micros_per_mtok_max),
    st.integers(0, limits.price_micros_per_mtok_max),
    st.integers(0, limits.price_micros_per_mtok_max),
)
tokens = st.integers(0, limits.amount_tokens_max)


def _floats(node: ast.AST) -> list[str]:
    """Where a float could enter: float literals, float(), true division."""
    found = []
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, float):
            found.append(f"line {n.lineno}: literal {n.value!r}")
        elif isinstance(n, ast.Name) and n.id == "float":
            found.append(f"line {n.lineno}: float")
        elif isinstance(n, ast.BinOp | ast.AugAssign) and isinstance(n.op, ast.Div):
            found.append(f"line {n.lineno}: true division")
    return found


def test_no_float_in_the_money_modules() -> None:
    for rel in MONEY_MODULES:
        found = _floats(ast.parse((REPO / rel).read_text()))
        assert not found, (rel, found)


def test_no_float_in_the_functions_that_compute_money() -> None:
    for rel, names in MONEY_FUNCTIONS.items():
        tree = ast.parse((REPO / rel).read_text())
        functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert set(names) <= functions.keys(), (rel, set(names) - functions.keys())
        for name in names:
            assert not _floats(functions[name]), (rel, name, _floats(functions[name]))


def test_the_float_check_catches_each_way_in() -> None:
    """The check above can fail: each of these is found."""
    for source in ("x = 0.5", "x = float(y)", "x = a / b", "x /= 2"):
        assert _floats(ast.parse(source)), source


@given(prices, tokens, tokens, tokens)
def test_cost_is_the_exact_cost_rounded_up_to_a_micro_unit(
    price: Price, inp: int, out: int, cached: int
) -> None:
    exact = Fraction(inp * price.input + out * price.output + cached * price.cached_input, 10**6)
    assert price.cost(Usage(inp, out, cached)) == ceil(exact)


@given(prices, tokens, st.data())
def test_a_holds_bound_covers_any_usage_of_its_tokens(
    price: Price, amount: int, data: st.DataObject
) -> None:
    """Whatever split of the held tokens the call reports (prompt as input or cached)."""
    prompt = data.draw(st.integers(0, amount))
    pricing = HoldPricing.over([price], prompt)
    cached = data.draw(st.integers(0, prompt))
    usage = Usage(prompt - cached, amount - prompt, cached)
    assert price.cost(usage) <= pricing.bound(amount)


@given(prices, st.integers(0, 10**9), st.integers(1, limits.amount_tokens_max), st.data())
def test_affordable_is_the_most_tokens_whose_bound_fits(
    price: Price, money: int, tokens_max: int, data: st.DataObject
) -> None:
    pricing = HoldPricing.over([price], data.draw(st.integers(0, tokens_max)))
    fits = pricing.affordable(money, tokens_max)
    assert pricing.bound(fits) <= money
    assert fits == tokens_max or pricing.bound(fits + 1) > money


T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _point(hours: int, input_price: int) -> PricePoint:
    return PricePoint("m", T0 + timedelta(hours=hours), "USD", Price(input_price, 0, 0))


def test_the_price_in_force_is_the_last_that_started() -> None:
    points = [_point(0, 1), _point(2, 5), _point(4, 3)]
    assert price_at(points, T0 - timedelta(seconds=1)) is None
    assert price_at(points, T0 + timedelta(hours=2)) == points[1]
    assert price_at(points, T0 + timedelta(hours=3, minutes=59)) == points[1]
    assert [
        p.input for p in prices_during(points, T0 + timedelta(hours=1), T0 + timedelta(hours=4))
    ] == [1, 5, 3]
    assert [
        p.input for p in prices_during(points, T0 + timedelta(hours=4), T0 + timedelta(days=9))
    ] == [3]


def test_a_hold_over_a_scheduled_change_is_bounded_by_the_dearer_price() -> None:
    cheap, dear = Price(1_000_000, 2_000_000, 0), Price(3_000_000, 9_000_000, 0)
    pricing = HoldPricing.over([cheap, dear], prompt_tokens=600)
    assert pricing.bound(1_000) == ceil(Fraction(600 * 3_000_000 + 400 * 9_000_000, 10**6))
