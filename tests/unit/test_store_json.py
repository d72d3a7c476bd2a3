"""jsonb parameters (ledger/postgres/store.py): orjson's output, and json's for what orjson
refuses, both read back as the same value; json and jsonb read back (services/platform/db.py)
as json reads them."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

from ledger.codec import json_loads
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


def test_json_read_from_the_database_is_what_json_reads_integers_past_64_bits_included() -> None:
    """codec.json_loads (the pools' and the verifier's reader of json and jsonb columns) reads
    through orjson, which would read an integer past 64 bits as a float and refuses a number
    past a double's range: such texts go through json."""
    texts = [
        b'{"a": [1, "\\u00e9", null, 2.5, true], "b": {"c": -9223372036854775808}}',
        b'{"limit": 18446744073709551615, "spent": 123456789012345678901234567890}',
        b'[-123456789012345678901, 0.1, 1e300, "9999999999999999999"]',
        b'{"a": 1, "a": 2}',
        b"[1e400, -1e400, 12]",
        '{"text": "\u00e9t\u00e9", "n": 18446744073709551616}',
    ]
    for text in texts:
        read = json_loads(text)
        assert read == json.loads(text)
        assert [type(v) for v in _leaves(read)] == [type(v) for v in _leaves(json.loads(text))]


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
