"""Report formatting (services/ledger/reports.py): money as exact integers, the columns a table
shows, and a table that fits its width without ever cutting a number."""

from __future__ import annotations

import re
from zoneinfo import ZoneInfo

import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.ledger import reports
from services.ledger.money_text import money_exact, money_short

UTC = ZoneInfo("UTC")
LONG_USER = "user-0b7e3c1f9a2d4e6f8a0b1c2d3e4f5a6b@customer-support.example.com"


@pytest.mark.parametrize(
    ("micros", "currency", "exact", "short"),
    [
        (12_345_678, "USD", "12.345678 USD", "$12.35"),
        (0, "EUR", "0.000000 EUR", "€0.00"),
        (5_000, "USD", "0.005000 USD", "$0.01"),  # half up, not to even
        (4_999, "GBP", "0.004999 GBP", "£0.00"),
        (-1_000_000, "USD", "-1.000000 USD", "-$1.00"),
        (1_234_500_000, "JPY", "1234.500000 JPY", "¥1,235"),  # no minor unit
        (1_234_567, "KWD", "1.234567 KWD", "1.235 KWD"),  # three
        (98_765_432_100, "CHF", "98765.432100 CHF", "98,765.43 CHF"),
        (1_500_000, "", "1.500000", "1.50"),
    ],
)
def test_money_formats_from_integer_micros(
    micros: int, currency: str, exact: str, short: str
) -> None:
    assert money_exact(micros, currency) == exact
    assert money_short(micros, currency) == short


def test_money_keeps_digits_a_float_would_lose() -> None:
    micros = 2**63 - 1  # the largest int64: 9223372036854.775807 units
    assert float(micros) / 1_000_000 == 9223372036854.775  # what a float makes of it
    assert money_exact(micros, "USD") == "9223372036854.775807 USD"
    assert money_short(micros, "USD") == "$9,223,372,036,854.78"


def test_shorten_cuts_ids_in_the_middle() -> None:
    assert reports.shorten("short", 8) == "short"
    assert reports.shorten("conversation-123456789", 11) == "conve…56789"
    assert len(reports.shorten(LONG_USER, 12)) == 12


def test_record_carries_every_field_the_api_declares() -> None:
    row = pb.UsageRow(user_id="ann", conversation_id="c1", input_tokens=3, total_tokens=4)
    row.period_start.FromJsonString("2026-12-06T15:00:00Z")
    rec = reports.record(row, ["day", "conversation"])
    assert list(rec)[:3] == ["period", "user", "conversation"]
    assert rec["period"] == "2026-12-06T15:00:00Z" and rec["total_tokens"] == 4
    declared = {f.name for f in pb.UsageRow.DESCRIPTOR.fields}
    dimensions = {"user_id", "conversation_id", "model", "period_start"}
    assert set(reports.ROW_FIELDS) == declared - dimensions, "a field without a column"
    assert {"input_tokens", "adjustments"} <= set(rec)


def test_table_columns_default_all_chosen_and_unknown() -> None:
    fields = ("input_tokens", "output_tokens", "total_tokens", "commits")
    names = [c.name for c in reports.table_columns(["day", "conversation"], "", fields)]
    assert names == ["period", "account", "input_tokens", "output_tokens", "total_tokens"]
    every = [c.name for c in reports.table_columns(["model"], "all", fields)]
    assert every == ["model", *fields]
    chosen = reports.table_columns(["user"], "user,commits", fields)
    assert [c.name for c in chosen] == ["user", "commits"]
    with pytest.raises(ValueError, match=r"unknown column 'cost', 'x'; choose from account,"):
        reports.table_columns(["user"], "cost,x,total_tokens", fields)


def _records(n: int, cost: bool, scale: int = 1) -> list[dict[str, object]]:
    out = []
    for i in range(n):
        tokens = 98_765 * scale * (i + 1)
        rec: dict[str, object] = dict.fromkeys(reports.ROW_FIELDS, 0) | {
            "period": f"2026-12-0{i % 9 + 1}T00:00:00Z",
            "user": f"{LONG_USER}-{i}",
            "conversation": f"conversation-{i:04d}-of-a-long-running-support-thread",
            "model": "claude-3-5-sonnet-20241022-with-a-long-deployment-name",
            "input_tokens": tokens,
            "output_tokens": tokens // 3,
            "total_tokens": tokens + tokens // 3,
        }
        if cost:
            rec |= {"cost_micros": 12_345_678 * scale * (i + 1), "currency": "USD",
                    "unpriced_tokens": 77 if i == 1 else 0}  # fmt: skip
        out.append(rec)
    return out


OPTIONAL = ("input_tokens", "output_tokens")


@pytest.mark.parametrize("cost", [False, True])
def test_table_fits_80_columns_and_totals_are_the_sums(cost: bool) -> None:
    records = _records(6, cost)
    money = ("cost_micros", "unpriced_tokens", "currency") if cost else ()
    fields = ("input_tokens", "output_tokens", "total_tokens", "commits", *money)
    columns = reports.table_columns(["day", "conversation", "model"], "", fields)
    lines = reports.render_table(records, columns, width=80, zone=UTC, optional=OPTIONAL)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert lines[0].split() == ["day", "account", "model", "input", "output", "total"] + (
        ["cost"] if "cost_micros" in fields else []
    )
    for rec in records:  # every number whole, though every id was shortened
        assert any(f"{rec['total_tokens']:,}" in line for line in lines)
    total = next(line for line in lines if line.startswith("total"))
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        assert f" {sum(int(str(r[name])) for r in records):,}" in total
    assert re.search(r"  user-0\S*…\S*hread  claude\S*…\S*-name  ", lines[2])


def test_cost_is_flagged_where_tokens_had_no_price() -> None:
    records = _records(12, True)
    columns = [reports.CATALOG[n] for n in ("model", "total_tokens", "cost_micros")]
    lines = reports.render_table(records, columns, width=80, zone=UTC)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert lines[2].endswith(" $12.35") and lines[3].endswith(" $24.69*")
    assert lines[-2].endswith(" $962.96*")  # 78 * 12.345678 = 962.962884, exactly summed
    assert lines[-1] == "* 77 tokens were used on models with no price: they are not in the cost"


def test_heavy_usage_leaves_out_input_and_output_rather_than_cut_a_number() -> None:
    records = _records(12, True, scale=100)  # a billion tokens in all
    columns = [
        reports.CATALOG[n]
        for n in ("period", "account", "model", *OPTIONAL, "total_tokens", "cost_micros")
    ]
    lines = reports.render_table(records, columns, width=80, zone=UTC, optional=OPTIONAL)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert lines[0].split() == ["day", "account", "model", "output", "total", "cost"]
    assert lines[-1] == "input_tokens left out to fit 80 columns; --columns all shows them"
    assert lines[-2].startswith("* 77 tokens")
    everything = sum(int(str(r["total_tokens"])) for r in records)
    assert everything > 10**9 and re.fullmatch(
        rf"total +[0-9,]+ +{everything:,} +\$96,296.29\*", lines[-3]
    )


def test_cost_without_prices_is_a_flagged_dash_never_zero() -> None:
    rec = {"model": "mystery", "total_tokens": 500, "cost_micros": 0, "currency": "",
           "unpriced_tokens": 500}  # fmt: skip
    assert reports.cost_cell(rec) == "-*"
    assert reports.cost_cell(rec | {"unpriced_tokens": 0}) == "-"
    assert reports.cost_cell(rec | {"currency": "EUR", "unpriced_tokens": 0}) == "€0.00"


def test_period_is_shown_in_the_report_zone() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    column = reports.CATALOG["period"]
    rec = {"period": "2026-12-05T15:00:00Z"}
    assert reports.cell(column, rec, tokyo, "day") == "2026-12-06"
    assert reports.cell(column, rec, tokyo, "hour") == "2026-12-06 00:00"


def test_a_table_wider_than_asked_only_when_its_numbers_need_it() -> None:
    records = _records(2, False)
    columns = reports.table_columns(["day", "user", "model"], "all", reports.ROW_FIELDS)
    lines = reports.render_table(records, columns, width=80, zone=UTC)
    assert len(lines[0]) > 80  # thirteen number columns do not fit; none is cut
    assert re.search(r" 98,765  32,921 ", lines[2])
