"""Usage reports shared by `tokenledger usage`/`top` and the web page: the columns a usage row
has, how each is shown, money formatting and a plain-text table that fits a terminal.

A record is one usage row as a dict of column name -> value (str for text, int for counts and
money), built from the `UsageRow` the API returns, so the CLI (over gRPC) and the web page (in
process, through the same conversion) carry the same columns. CSV and JSON carry every column
with every digit; the table shows the columns that matter and shortens only text.

Money is integer micro-units of the tenant's currency (DESIGN §2): it is formatted with int
and Decimal arithmetic, never float. The cost columns (`cost_micros`, `unpriced_tokens`,
`adjusted_micros`, and the tenant's `currency` from the response) are ordinary columns.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.ledger.money_text import money_short

Record = dict[str, Any]
Kind = Literal["text", "period", "count", "money"]


@dataclass(frozen=True)
class Column:
    name: str
    """Its key in a record, CSV header and JSON field."""
    header: str
    """Its table header."""
    kind: Kind


_DIMENSIONS = (
    Column("period", "period", "period"),
    Column("user", "user", "text"),
    Column("conversation", "conversation", "text"),
    Column("model", "model", "text"),
)
_FIELDS = (
    Column("input_tokens", "input", "count"),
    Column("output_tokens", "output", "count"),
    Column("cached_input_tokens", "cached", "count"),
    Column("total_tokens", "total", "count"),
    Column("cost_micros", "cost", "money"),
    Column("unpriced_tokens", "unpriced", "count"),
    Column("currency", "currency", "text"),
    Column("reservations", "reservations", "count"),
    Column("commits", "commits", "count"),
    Column("rollbacks", "rollbacks", "count"),
    Column("expiries", "expiries", "count"),
    Column("late_commits", "late", "count"),
    Column("usage_records", "records", "count"),
    Column("overage_tokens", "overage", "count"),
    Column("adjusted_tokens", "adjusted", "count"),
    Column("adjustments", "adjustments", "count"),
    Column("adjusted_micros", "adjusted cost", "money"),
)
ACCOUNT = Column("account", "account", "text")
"""A table's user/conversation in one column: what a reader calls the account."""
CATALOG = {c.name: c for c in (*_DIMENSIONS, ACCOUNT, *_FIELDS)}

_DECLARED = pb.UsageRow.DESCRIPTOR.fields_by_name
ROW_FIELDS = tuple(c.name for c in _FIELDS if c.name in _DECLARED)
"""The catalogue's fields the API's UsageRow declares."""
FIELDS = (*ROW_FIELDS, "currency")
"""A record's fields: its row's, and the tenant's currency, which the response carries."""
TABLE_FIELDS = ("input_tokens", "output_tokens", "total_tokens", "cost_micros")
"""What a table shows of the fields unless `--columns` says otherwise."""


def dimensions(group_by: Iterable[str]) -> list[str]:
    """The text columns a record grouped by `group_by` (ledger.reads.GROUP_NAMES) has."""
    groups = set(group_by)
    names = ["period"] if groups & {"day", "hour"} else []
    names += ["user"] if groups & {"user", "conversation"} else []
    names += ["conversation"] if "conversation" in groups else []
    return names + (["model"] if "model" in groups else [])


def record(row: pb.UsageRow, group_by: Iterable[str], currency: str = "") -> Record:
    """The columns of `row` grouped by `group_by`: its dimensions, then FIELDS."""
    values = {
        "period": lambda: row.period_start.ToJsonString(),
        "user": lambda: row.user_id,
        "conversation": lambda: row.conversation_id,
        "model": lambda: row.model,
    }
    out: Record = {name: values[name]() for name in dimensions(group_by)}
    return out | {name: getattr(row, name) for name in ROW_FIELDS} | {"currency": currency}


def csv_columns(group_by: Iterable[str]) -> list[str]:
    """Every column of a CSV export, in order: the dimensions, then every field."""
    return [*dimensions(group_by), *FIELDS]


def table_columns(
    group_by: Iterable[str], wanted: str, fields: Sequence[str] = FIELDS
) -> list[Column]:
    """A table's columns: `wanted` ("" for the default, "all", or comma-separated names) of
    the report's dimensions and `fields`, with `account` standing for user and conversation.
    Raises ValueError with a one-line message for a name the report does not have."""
    dims = dimensions(group_by)
    merged = [n for n in dims if n not in ("user", "conversation")]
    if "user" in dims:
        merged.insert(1 if "period" in dims else 0, "account")
    if wanted == "all":
        names = [*merged, *fields]
    elif wanted:
        names = [n.strip() for n in wanted.split(",")]
        choices = list(dict.fromkeys([*merged, *dims, *fields]))
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise ValueError(
                f"unknown column {', '.join(repr(n) for n in unknown)}; "
                f"choose from {','.join(choices)} or all"
            )
    else:
        names = [*merged, *(n for n in TABLE_FIELDS if n in fields)]
    return [CATALOG[n] for n in dict.fromkeys(names)]


def account_of(rec: Mapping[str, Any]) -> str:
    return "/".join(p for p in (rec.get("user", ""), rec.get("conversation", "")) if p) or "-"


def cost_cell(rec: Mapping[str, Any]) -> str:
    """The cost, short; `*` when part of the tokens had no price (never a silent 0)."""
    micros, currency = int(rec.get("cost_micros", 0)), str(rec.get("currency", ""))
    unpriced = int(rec.get("unpriced_tokens", 0))
    text = money_short(micros, currency) if micros or (currency and not unpriced) else "-"
    return text + ("*" if unpriced else "")


def cell(column: Column, rec: Mapping[str, Any], zone: ZoneInfo, period: str) -> str:
    """One column of a record as a table or page shows it."""
    if column.name == "account":
        return account_of(rec)
    if column.kind == "money":
        return cost_cell(rec)
    value = rec.get(column.name, "")
    if column.kind == "count":
        return f"{int(value):,}"
    if column.kind == "period" and value:
        at = datetime.fromisoformat(str(value)).astimezone(zone)
        return at.strftime("%Y-%m-%d" if period == "day" else "%Y-%m-%d %H:%M")
    return str(value)


def totals(records: Sequence[Mapping[str, Any]]) -> Record:
    """Each count and money column summed over the records; the currency when they share one."""
    out: Record = {}
    for column in _FIELDS:
        if column.kind in ("count", "money") and any(column.name in r for r in records):
            out[column.name] = sum(int(r.get(column.name, 0)) for r in records)
    currencies = {r["currency"] for r in records if r.get("currency")}
    if len(currencies) == 1:
        out["currency"] = currencies.pop()
    return out


def unpriced_note(records: Sequence[Mapping[str, Any]]) -> str:
    """The footnote of `*`, or "" when every token had a price."""
    unpriced = sum(int(r.get("unpriced_tokens", 0)) for r in records)
    if not unpriced:
        return ""
    return f"* {unpriced:,} tokens were used on models with no price: they are not in the cost"


def shorten(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut in the middle: ids differ at both ends."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    keep = width - 1
    head, tail = (keep + 1) // 2, keep // 2
    return text[:head] + "…" + (text[-tail:] if tail else "")


TEXT_WIDTH_MIN = 12
"""A shortened text column keeps at least this many characters (with its `…`)."""
GAP = "  "


def _natural(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[int]:
    return [max(len(c.header), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]


def _least(column: Column, natural: int) -> int:
    """How narrow a column may get: only text shrinks, down to TEXT_WIDTH_MIN."""
    if column.kind != "text":
        return natural
    return max(len(column.header), min(natural, TEXT_WIDTH_MIN))


def _fit(columns: Sequence[Column], widths: list[int], width: int) -> list[int]:
    """The widths shrunk (the widest text first) until the table fits `width` or every text
    column is at its least."""
    widths = list(widths)
    least = [_least(c, w) for c, w in zip(columns, widths, strict=True)]
    excess = sum(widths) + len(GAP) * (len(columns) - 1) - width
    while excess > 0:
        i = max(range(len(columns)), key=lambda j: widths[j] - least[j])
        if widths[i] <= least[i]:
            break
        widths[i] -= 1
        excess -= 1
    return widths


def _dropped(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int, optional: Sequence[str]
) -> set[str]:
    """The `optional` columns (in their order) to leave out so that the rest fit `width`."""
    natural = _natural(columns, rows)
    least = [_least(c, w) for c, w in zip(columns, natural, strict=True)]
    dropped: set[str] = set()
    for name in optional:
        kept = [i for i, c in enumerate(columns) if c.name not in dropped]
        if sum(least[i] for i in kept) + len(GAP) * (len(kept) - 1) <= width:
            break
        dropped.add(name)
    return dropped


def render_table(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    width: int,
    zone: ZoneInfo,
    period: str = "day",
    optional: Sequence[str] = (),
) -> list[str]:
    """The records as lines of text at most `width` wide when the columns can fit it, with a
    totals row. Only text is ever shortened (in the middle); numbers stay whole, so the
    `optional` columns are left out (in order, and said so) until the rest fit."""
    body = [[cell(c, r, zone, period) for c in columns] for r in records]
    total = totals(records)
    foot = ["" if c.kind in ("text", "period") else cell(c, total, zone, period) for c in columns]
    first_text = next((i for i, c in enumerate(columns) if c.kind in ("text", "period")), None)
    if first_text is not None:
        foot[first_text] = "total"
    headers = [period if c.kind == "period" else c.header for c in columns]
    rows = [headers, *body, foot]
    dropped = _dropped(columns, rows, width, optional)
    keep = [i for i, c in enumerate(columns) if c.name not in dropped]
    shown = [columns[i] for i in keep]
    rows = [[r[i] for i in keep] for r in rows]
    widths = _fit(shown, _natural(shown, rows), width)

    def line(cells: Sequence[str]) -> str:
        parts = []
        for c, text, w in zip(shown, cells, widths, strict=True):
            text = shorten(text, w)
            parts.append(text.ljust(w) if c.kind in ("text", "period") else text.rjust(w))
        return GAP.join(parts).rstrip()

    rule = GAP.join("-" * w for w in widths)
    lines = [line(rows[0]), rule, *(line(r) for r in rows[1:-1]), rule, line(rows[-1])]
    notes = [unpriced_note(records)]
    if dropped:
        left_out = ", ".join(c.name for c in columns if c.name in dropped)
        notes.append(f"{left_out} left out to fit {width} columns; --columns all shows them")
    return lines + [w for note in notes for w in textwrap.wrap(note, width)]
