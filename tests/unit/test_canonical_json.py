"""codec.canonical_json writes json.dumps's bytes (sorted keys, no spaces, UTF-8, times as
codec.ts) whichever of orjson or json writes them: the hash chain of every event depends on
it, for the events already in the log too."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ledger import codec


def _reference(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=codec._encode
    ).encode()


class _Kind(StrEnum):
    A = "a"


_floatless_leaves = (
    st.text()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.booleans()
    | st.none()
    | st.datetimes(timezones=st.just(UTC))
    | st.datetimes(timezones=st.just(timezone(timedelta(hours=5, minutes=30))))
    | st.dates()
    | st.just(_Kind.A)
)


def _nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.tuples(inner, inner)
            | st.dictionaries(st.text(), inner, max_size=4)
            | st.dictionaries(st.integers(), inner, max_size=2)
        ),
        max_leaves=12,
    )


_values = _nested(_floatless_leaves | st.floats(allow_nan=False, allow_infinity=False))


@given(_values)
def test_any_value_is_written_as_json_dumps_writes_it(value: Any) -> None:
    assert codec.canonical_json(value) == _reference(value)


@given(_nested(_floatless_leaves))
def test_a_value_without_a_float_is_written_by_state_json_as_json_dumps_writes_it(
    value: Any,
) -> None:
    assert codec.state_json(value) == _reference(value)


def test_what_an_event_row_holds_goes_the_fast_way_and_is_written_alike() -> None:
    row = {
        "tenant_id": "t-é",
        "version": 2**62,
        "occurred_at": datetime(2026, 12, 6, 14, 0, tzinfo=UTC),
        "data": {"labels": {"k\u2028": 'v\x01"\\'}, "ends": [date(2026, 12, 31), None, True]},
    }
    assert codec._plain(row)
    assert codec.canonical_json(row) == _reference(row)
    assert not codec._plain({"price": 0.5}) and not codec._plain({1: "a"})


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7))])))
def test_a_time_is_written_in_utc_with_microseconds_whatever_its_zone(at: datetime) -> None:
    assert codec.ts(at) == at.astimezone(UTC).isoformat(timespec="microseconds")
    assert codec.ts(at).endswith("+00:00") and codec.parse_ts(codec.ts(at)) == at


_json = st.recursive(
    st.text()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
_copied_rows = st.fixed_dictionaries(
    {
        name: (
            st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=3))]))
            if kind == "timestamptz"
            else st.integers(min_value=-(2**63), max_value=2**63 - 1)
            if kind == "bigint"
            else st.dictionaries(st.text(), _json, max_size=4) | _json
            if kind == "jsonb"
            else st.text()
        )
        for name, kind in codec.EVENT_COLUMNS.items()
    }
)


@given(_copied_rows, st.binary(min_size=32, max_size=32))
def test_a_copied_rows_hash_is_event_hashs(row: dict[str, Any], prev_hash: bytes) -> None:
    """codec.copied_event_hash, for rows typed as a binary COPY gives them (any JSON in
    `data`: floats and integers past 64 bits too), equals codec.event_hash."""
    assert codec.copied_event_hash(row, prev_hash) == codec.event_hash(row, prev_hash)
