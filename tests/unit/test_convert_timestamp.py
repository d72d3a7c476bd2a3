"""services/ledger/convert._timestamp gives what protobuf's Timestamp.FromDatetime gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf import timestamp_pb2

from services.ledger.convert import _timestamp


def test_timestamps_equal_from_datetime_for_aware_naive_and_extreme_times() -> None:
    times = [
        datetime(2026, 12, 6, 11, 48, 51, 390251, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
        datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 3, 29, 1, 30),  # naive: UTC
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]
    for at in times:
        expected = timestamp_pb2.Timestamp()
        expected.FromDatetime(at)
        assert _timestamp(at) == expected, at
