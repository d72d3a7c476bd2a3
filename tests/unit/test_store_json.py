"""jsonb parameters (ledger/postgres/store.py): orjson's output, and json's for what orjson
refuses, both read back as the same value."""

from __future__ import annotations

import json

from ledger.postgres.store import _dumps


def test_values_orjson_takes_and_integers_past_64_bits_both_serialize_to_the_same_value() -> None:
    for value in ({"a": [1, "é", None, 2.5], "b": {"c": True}}, {"big": 2**70, "n": -(2**65)}):
        assert json.loads(_dumps(value)) == value
