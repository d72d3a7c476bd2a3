"""jsonb parameters (ledger/postgres/store.py): orjson's output, and json's for what orjson
refuses, both read back as the same value."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

from ledger.postgres.store import _dumps


def test_values_orjson_takes_and_integers_past_64_bits_both_serialize_to_the_same_value() -> None:
    for value in ({"a": [1, "é", None, 2.5], "b": {"c": True}}, {"big": 2**70, "n": -(2**65)}):
        assert json.loads(_dumps(value)) == value


def test_records_with_dates_and_times_serialize_alike_through_both_paths() -> None:
    at = datetime(2026, 12, 6, 11, 0, 0, 123456, tzinfo=UTC)
    small = {"at": at, "day": date(2026, 12, 6), "n": 1}
    big = {**small, "n": 2**70}
    assert json.loads(_dumps(small))["at"] == json.loads(_dumps(big))["at"]
    assert json.loads(_dumps(big)) == {"at": at.isoformat(), "day": "2026-12-06", "n": 2**70}
    assert datetime.fromisoformat(json.loads(_dumps(small))["at"]) == at
